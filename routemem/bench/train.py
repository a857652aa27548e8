"""Trainer overhead: ``Trainer.fit`` time per step against a minimal hand-written PyTorch loop on the
same model shape, data, precision and device, measured in alternating rounds in one process.
Target: the Trainer's tokens/s at least 90% of the plain loop's (overhead <= 10%)."""

from __future__ import annotations

import tempfile

import torch

from routemem.bench.common import (
    CUDA_PEAK,
    FWD_BWD,
    all_met,
    cuda_peak_bytes,
    row,
    seconds,
    sync,
    target,
)
from routemem.config import from_dict
from routemem.models import TransformerLM
from routemem.train import RunConfig, Trainer
from routemem.train.evaluate import autocast_context

OVERHEAD_TARGET = 0.10

# The charlm-quick model shape, on the built-in corpus so the benchmark runs anywhere.
BENCH_CONFIG = {
    "model": {"n_layer": 4, "d_model": 192, "n_head": 6, "max_seq_len": 128},
    "data": {"corpus": "pydocs", "tokenizer": "byte"},
    "train": {"batch_size": 32, "max_steps": 1_000_000, "warmup_steps": 10, "log_interval": 10,
              "eval_interval": 1_000_000, "eval_tokens": 128, "progress": False},
}
# (steps per round, rounds). Each fit() call ends with a short val eval and a checkpoint, as a run
# does every eval_interval steps; a GPU's steps are fast, so its rounds are longer to keep that end
# cost as small a share of a round as on a CPU (where a round of 30 steps takes many seconds).
ROUNDS = {"quick": (10, 3), "full": (30, 5), "quick_cuda": (50, 3), "full_cuda": (200, 5)}
MEMORY_STEPS = 3  # on a GPU, the peak memory of each loop is read over a few more steps, untimed


def _plain_loop(model: TransformerLM, tokens: torch.Tensor, cfg: RunConfig, bf16: bool, device: torch.device):
    """The loop a researcher would write by hand: random windows, forward, backward, clip, step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    generator = torch.Generator().manual_seed(0)
    B, T = cfg.train.batch_size, cfg.seq_len
    offsets = torch.arange(T + 1)

    def run(steps: int) -> None:
        for _ in range(steps):
            starts = torch.randint(0, len(tokens) - T - 1, (B,), generator=generator)
            window = tokens[starts[:, None] + offsets].to(device, non_blocking=True)
            x, y = window[:, :-1], window[:, 1:]
            with autocast_context(device, bf16):
                _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # the trainer reads the loss every step (divergence check)

    return run


def run(quick: bool = False, device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    key = ("quick" if quick else "full") + ("_cuda" if device.type == "cuda" else "")
    steps, rounds = ROUNDS[key]
    config = {**BENCH_CONFIG, "train": {**BENCH_CONFIG["train"], "device": device.type}}
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = from_dict(RunConfig, config)
        trainer = Trainer(cfg, out_dir)
        tokens = torch.from_numpy(trainer.splits["train"].astype("int64"))
        torch.manual_seed(0)
        plain_model = TransformerLM(trainer.model_config).to(device)
        plain = _plain_loop(plain_model, tokens, trainer.cfg, trainer.bf16, device)

        def trainer_run(n: int) -> None:
            trainer.cfg.train.stop_at = trainer.step + n
            trainer.fit()

        plain(2), trainer_run(2)  # warm-up: allocator, autocast caches
        sync(device)
        loops = {"plain": plain, "trainer": trainer_run}
        per_step = {name: [] for name in loops}
        peak = {name: None for name in loops}  # measured on a GPU only
        for _ in range(rounds):  # alternate, so drifts in machine load hit both sides alike
            for name, fn in loops.items():
                per_step[name].append(seconds(lambda fn=fn: fn(steps), device) / steps)
        if device.type == "cuda":  # after the timed rounds, so timing stays unperturbed
            peak = {name: cuda_peak_bytes(lambda fn=fn: fn(MEMORY_STEPS), device) for name, fn in loops.items()}
        trainer.close()

    tokens_per_step = cfg.train.batch_size * cfg.seq_len
    shape = {**BENCH_CONFIG["model"], "batch_size": cfg.train.batch_size, "seq_len": cfg.seq_len,
             "tokens_per_step": tokens_per_step, "bf16": trainer.bf16, "steps_per_round": steps}
    rows = [row({"op": "train_step", "mode": name, **shape}, FWD_BWD, per_step[name],
                peak[name], CUDA_PEAK)
            for name in loops]
    targets = [target(
        rows, "trainer_overhead",
        f"Trainer.fit at least {1 - OVERHEAD_TARGET:.0%} of the tokens/s of a minimal hand-written loop "
        f"(overhead <= {OVERHEAD_TARGET:.0%}); ratio = plain loop time per step / Trainer time per step",
        {"op": "train_step", "mode": "plain"}, {"op": "train_step", "mode": "trainer"},
        1 - OVERHEAD_TARGET, ">=")]
    info = {"config": config, "rounds": rounds,
            "tokens_per_s": {name: tokens_per_step / r["median_s"] for name, r in zip(loops, rows)}}
    return {"rows": rows, "targets": targets, "all_targets_met": all_met(targets), "info": info}
