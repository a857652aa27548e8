"""Trainer overhead: ``Trainer.fit`` tokens/s against a minimal plain PyTorch loop on the same
model, data and precision, measured in alternating rounds in one process. Target: <= 10%."""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

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


def _plain_loop(model: TransformerLM, tokens: torch.Tensor, cfg: RunConfig, bf16: bool):
    """The loop a researcher would write by hand: random windows, forward, backward, clip, step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    generator = torch.Generator().manual_seed(0)
    B, T = cfg.train.batch_size, cfg.seq_len
    offsets = torch.arange(T + 1)

    def run(steps: int) -> None:
        for _ in range(steps):
            starts = torch.randint(0, len(tokens) - T - 1, (B,), generator=generator)
            window = tokens[starts[:, None] + offsets]
            x, y = window[:, :-1], window[:, 1:]
            with autocast_context(torch.device("cpu"), bf16):
                _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # the trainer reads the loss every step (divergence check)

    return run


def run(quick: bool = False) -> dict:
    steps, rounds = (10, 3) if quick else (30, 5)
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = from_dict(RunConfig, BENCH_CONFIG)
        trainer = Trainer(cfg, out_dir)
        tokens = torch.from_numpy(trainer.splits["train"].astype("int64"))
        torch.manual_seed(0)
        plain_model = TransformerLM(trainer.model_config)
        plain = _plain_loop(plain_model, tokens, trainer.cfg, trainer.bf16)

        def trainer_run(n: int) -> None:
            trainer.cfg.train.stop_at = trainer.step + n
            trainer.fit()

        tokens_per_step = cfg.train.batch_size * cfg.seq_len
        plain(2), trainer_run(2)  # warm-up: allocator, autocast caches
        plain_tps, trainer_tps = [], []
        for _ in range(rounds):  # alternate, so drifts in machine load hit both sides alike
            for fn, sink in ((plain, plain_tps), (trainer_run, trainer_tps)):
                start = time.perf_counter()
                fn(steps)
                sink.append(steps * tokens_per_step / (time.perf_counter() - start))
        trainer.close()
    plain_med, trainer_med = statistics.median(plain_tps), statistics.median(trainer_tps)
    overhead = 1.0 - trainer_med / plain_med
    return {
        "config": BENCH_CONFIG,
        "bf16": trainer.bf16,
        "steps_per_round": steps,
        "rounds": rounds,
        "plain_tokens_per_s": {"median": plain_med, "runs": plain_tps},
        "trainer_tokens_per_s": {"median": trainer_med, "runs": trainer_tps},
        "ratio_trainer_over_plain": trainer_med / plain_med,
        "overhead": overhead,
        "target_overhead": OVERHEAD_TARGET,
        "pass": overhead <= OVERHEAD_TARGET,
    }
