"""What every study shares: mean/std summaries, the verdict rule for a
directional claim, and writing results.json / report.md atomically (the results format in
docs/architecture.md). The per-run cache is in cache.py."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Callable

import torch

from routemem.experiments.shared.cache import json_default as _jsonable
from routemem.fileio import write_text_atomic

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


def summarize(values: list[float]) -> dict:
    """mean, sample std (0 for a single value) and n."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values) if values else math.nan, "std": std, "n": len(values)}


def directional_verdict(ours: dict, baseline: dict, higher_is_better: bool = True) -> tuple[str, str]:
    """The rule for "ours beats baseline": reproduced when the means differ in the paper's direction
    and the mean ± std intervals do not overlap; not reproduced when they differ the other way
    without overlap; inconclusive otherwise, and always with fewer than two seeds per side."""
    if min(ours["n"], baseline["n"]) < 2:
        return INCONCLUSIVE, f"n={min(ours['n'], baseline['n'])} seed(s): one seed cannot separate an effect from noise"
    sign = 1.0 if higher_is_better else -1.0
    gap = sign * (ours["mean"] - baseline["mean"])
    spread = ours["std"] + baseline["std"]
    text = f"{ours['mean']:.3f} ± {ours['std']:.3f} vs {baseline['mean']:.3f} ± {baseline['std']:.3f}"
    if gap > spread:
        return REPRODUCED, f"{text}: in the paper's direction, intervals disjoint"
    if -gap > spread:
        return NOT_REPRODUCED, f"{text}: against the paper's direction, intervals disjoint"
    return INCONCLUSIVE, f"{text}: intervals overlap"


def combine_verdicts(verdicts: list[str]) -> str:
    """A claim made of several comparisons holds only if all do; one contrary result refutes it."""
    if any(v == NOT_REPRODUCED for v in verdicts):
        return NOT_REPRODUCED
    if verdicts and all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    return INCONCLUSIVE


def best_per_seed(runs: list[dict], arms, seeds, score: Callable[[dict], float],
                  higher_is_better: bool = True) -> dict[str, list[dict]]:
    """For each arm and seed, the run with the best validation ``score(run)`` among those that
    finished (have a "val" entry): the learning-rate choice of a grid search."""
    pick = max if higher_is_better else min
    chosen: dict[str, list[dict]] = {arm: [] for arm in arms}
    for arm in arms:
        for seed in seeds:
            done = [r for r in runs if r["arm"] == arm and r["seed"] == seed and "val" in r]
            if done:
                chosen[arm].append(pick(done, key=score))
    return chosen


def write_outputs(study_dir: Path, results: dict, report: str) -> None:
    study_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(study_dir / "results.json", json.dumps(results, indent=2, default=_jsonable))
    write_text_atomic(study_dir / "report.md", report)


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(x):
        return f"{x:.3f}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def use_bf16(wanted: bool, device: torch.device) -> bool:
    """bf16 autocast where the study asks for it and the device has it: every CPU torch runs (the
    setting the shipped numbers were measured with) and CUDA GPUs with bf16 (Ampere and later);
    an older GPU trains in float32 rather than in slow emulation."""
    if not wanted:
        return False
    return device.type != "cuda" or torch.cuda.is_bf16_supported()


def verdict_lines(results: dict, report_path: Path) -> list[str]:
    """What ``routemem reproduce`` prints at the end: one line per claim, then the report's path."""
    width = max(len(c["verdict"]) for c in results["claims"]) if results["claims"] else 0
    lines = [f"{c['verdict']:<{width}}  {c.get('statement') or c['description']}" for c in results["claims"]]
    return lines + [f"report: {report_path}"]


def where_trained(results: dict) -> str:
    """The report's "on ..." phrase: this machine, its worker processes, or the machines that trained
    the runs when that is not (only) this one (a sharded study, or a report assembled from a cache
    filled elsewhere)."""
    env, execution = results["env"], results.get("execution", {})
    text = f"{env.get('gpu') or env['cpu']} ({env['device']}, {env['threads']} threads)"
    if execution.get("jobs", 1) > 1:
        text += f", {execution['jobs']} worker processes"
    if results.get("compile"):
        text += ", training through torch.compile"
    machines = execution.get("trained_on", [])
    elsewhere = any((m.get("device"), m.get("gpu") or m.get("cpu")) != (env["device"], env.get("gpu") or env["cpu"])
                    for m in machines)
    if len(machines) > 1 or elsewhere:
        text += "; runs trained on " + "; ".join(_machine_runs(m) for m in machines)
    return text


def invocation_text(results: dict) -> str:
    """The reports' "X min (N runs reused from the cache), on <machines>": this invocation's wall
    time, which is not the study's once runs come from the cache (an interrupted run, shards)."""
    reused = results["runs_reused"]
    return (f"{results['seconds'] / 60:.1f} min ({reused} run{'' if reused == 1 else 's'} reused from the cache), "
            f"on {where_trained(results)}")


def _machine_runs(machine: dict) -> str:
    # the commit tells apart two entries of one machine (runs cached before and after a change)
    commit = f", commit {machine['git_commit'][:7]}" if machine.get("git_commit") else ""
    runs = f"{machine['runs']} run" + ("s" if machine["runs"] != 1 else "")
    compiled = ", compiled" if machine.get("compile") else ""
    return f"{machine.get('gpu') or machine.get('cpu')} ({machine.get('device')}{commit}{compiled}): {runs}"


# compile_note of the studies whose training --compile does not reach (ocl-baselines, rwf)
NOT_COMPILED = ("not applied: the runs are continual learners on a ViT, trained by the stream loop of "
                "routemem/train/continual (the backbone by pretrain-vit), which take no torch.compile")


def compile_fields(requested: bool, note: str | None = None) -> dict:
    """results.json's ``compile`` (whether the study's training runs went through torch.compile,
    ``reproduce --compile``) and, when it was asked for, ``compile_note``: what was compiled and
    what was not (``note``), or why nothing was."""
    fields = {"compile": bool(requested) and not (note or "").startswith("not applied")}
    if requested and note:
        fields["compile_note"] = note
    return fields
