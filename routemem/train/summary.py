"""The few lines ``routemem train`` prints when it ends: how good, how fast, where the files are."""

from __future__ import annotations

from pathlib import Path


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def format_summary(result: dict, out_dir: str | Path, max_steps: int) -> str:
    """Human-readable end of a run; the same numbers are in ``final.json`` for scripts."""
    out = Path(out_dir)
    lines = [f"trained {result['step']} steps ({result['tokens']:,} tokens) in "
             f"{format_duration(result['wall_time_s'])}, {result['tokens_per_s']:,.0f} tokens/s"]
    for split in ("val", "test"):
        if split in result:
            m = result[split]
            lines.append(f"  {split:<4} loss {m['loss']:.4f}  perplexity {m['ppl']:.3f}"
                         + (f"  bits/byte {m['bits_per_byte']:.3f}" if "bits_per_byte" in m else ""))
    if result["step"] < max_steps:
        lines.append(f"  stopped at step {result['step']} of {max_steps} (train.stop_at); "
                     f"continue with: routemem train --out {out} --resume")
    files = [name for name in ("final.json", "metrics.jsonl", "loss.png", "config.yaml") if (out / name).exists()]
    lines.append(f"  run folder {out}: {', '.join(files)}, ckpt/ (checkpoint)")
    return "\n".join(lines)
