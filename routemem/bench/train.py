"""Trainer overhead: ``Trainer.fit`` time per step against a minimal hand-written PyTorch loop on the
same model shape, data, precision and device, measured in alternating rounds in one process.
Target: the Trainer's tokens/s at least 90% of the plain loop's (overhead <= 10%). Under
``--compile`` both sides are compiled (the Trainer with ``train.compile=true``, the plain loop's
model through the same ``compile_model``), so the target judges the Trainer's overhead when compiled.

Always, compiled against eager (rows ``op="train_step_compiled"``, modes ``<mechanism>-eager`` and
``<mechanism>-compiled``): the plain loop on two copies of one TransformerLM (the same initial
weights), one eager and one through ``torch.compile(model, fullgraph=True)``, for the attention,
palimpsa and fast_slow mixers (dense FFN) and the apn FFN (attention mixer), each pair timed in
alternating rounds after the compile (its first call, timed alone: ``info["compiled"][...]
["first_step_s"]``). No target: ``info["compiled"]`` reports each mechanism's compiled/eager
tokens/s. A mechanism that does not compile gets two skipped rows with the reason. The compiles
are most of a quick run's time on a CPU: on a 2-core VM (Intel Xeon) 15-35 s per mechanism the
first time its shapes compile (a quick run took 2.3 min), 1-6 s once torch's on-disk compile cache
holds them (40 s); measured numbers in docs/benchmarks.md.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import tempfile

import torch

from routemem.bench.common import (
    CUDA_PEAK,
    FWD_BWD,
    all_met,
    cuda_peak_bytes,
    first_call,
    row,
    seconds,
    sync,
    target,
)
from routemem.config import from_dict
from routemem.models import TransformerLM
from routemem.train import RunConfig, Trainer
from routemem.train.evaluate import autocast_context
from routemem.train.trainer import compile_model

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

# The compiled-vs-eager pairs: mechanism -> the LMConfig fields it sets on the bench model.
COMPILED_MECHANISMS = {"attention": {"mixer": "attention"}, "palimpsa": {"mixer": "palimpsa"},
                       "fast_slow": {"mixer": "fast_slow"}, "apn": {"ffn": "apn"}}
# Sequences per step of the pairs: a quick run uses 8 (the compiles dominate its time anyway).
COMPILED_BATCH = {"quick": 8, "full": 32}
# (steps per round, rounds) of each pair; no eval or checkpoint here, so a round needs few steps.
COMPILED_ROUNDS = {"quick": (3, 3), "full": (10, 5), "quick_cuda": (20, 3), "full_cuda": (100, 5)}
COMPILED_OP = "train_step_compiled"


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


def run(quick: bool = False, device: torch.device | str = "cpu", compile: bool = False) -> dict:
    device = torch.device(device)
    key = ("quick" if quick else "full") + ("_cuda" if device.type == "cuda" else "")
    steps, rounds = ROUNDS[key]
    config = {**BENCH_CONFIG, "train": {**BENCH_CONFIG["train"], "device": device.type, "compile": bool(compile)}}
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = from_dict(RunConfig, config)
        trainer = Trainer(cfg, out_dir)
        tokens = torch.from_numpy(trainer.splits["train"].astype("int64"))
        torch.manual_seed(0)
        plain_model = TransformerLM(trainer.model_config).to(device)
        plain = _plain_loop(compile_model(plain_model, bool(compile)), tokens, trainer.cfg, trainer.bf16, device)

        def trainer_run(n: int) -> None:
            trainer.cfg.train.stop_at = trainer.step + n
            trainer.fit()

        plain(2), trainer_run(2)  # warm-up: allocator, autocast caches (and the compiles, under --compile)
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
        del plain_model, plain
        if compile:  # the pairs' compiles start from an empty dynamo cache, as without --compile
            torch._dynamo.reset()
        compiled_rows, compiled_info = compiled_pairs(trainer.model_config, tokens, trainer.cfg, trainer.bf16,
                                                      device, quick)

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
            "tokens_per_s": {name: tokens_per_step / r["median_s"] for name, r in zip(loops, rows)},
            **compiled_info}
    return {"rows": rows + compiled_rows, "targets": targets, "all_targets_met": all_met(targets), "info": info}


def compiled_pairs(model_config, tokens: torch.Tensor, cfg: RunConfig, bf16: bool, device: torch.device,
                   quick: bool) -> tuple[list[dict], dict]:
    """Per mechanism of COMPILED_MECHANISMS: the plain loop's time per step on an eager model and on
    a compiled copy of it, in alternating rounds after each side's first step (the compiled side's
    is its compile, reported); the rows and ``info["compiled"]``."""
    key = ("quick" if quick else "full") + ("_cuda" if device.type == "cuda" else "")
    steps, rounds = COMPILED_ROUNDS[key]
    batch = COMPILED_BATCH["quick" if quick else "full"]
    pair_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch))
    tokens_per_step = batch * pair_cfg.seq_len
    rows, report = [], {}
    for mechanism, fields in COMPILED_MECHANISMS.items():
        config = dataclasses.replace(model_config, **{"mixer": "attention", "mixer_kwargs": {}, "ffn": "dense",
                                                      "ffn_kwargs": {}, **fields})
        names = {"op": COMPILED_OP, "mixer": config.mixer, "ffn": config.ffn, "n_layer": config.n_layer,
                 "d_model": config.d_model, "n_head": config.n_head, "batch_size": batch,
                 "seq_len": pair_cfg.seq_len, "tokens_per_step": tokens_per_step, "bf16": bf16,
                 "steps_per_round": steps}
        torch.manual_seed(0)
        eager_model = TransformerLM(config).to(device)
        compiled_model = copy.deepcopy(eager_model)
        loops = {"eager": _plain_loop(eager_model, tokens, pair_cfg, bf16, device),
                 "compiled": _plain_loop(compile_model(compiled_model, True), tokens, pair_cfg, bf16, device)}
        loops["eager"](1)  # warm-up: allocator, autocast caches
        first_step, failure = first_call(functools.partial(loops["compiled"], 1), device)  # the compile
        if failure is not None:
            paired = f"not timed: its compiled pair failed ({failure})"
            rows += [row({**names, "mode": f"{mechanism}-{side}"}, FWD_BWD,
                         skipped=failure if side == "compiled" else paired) for side in loops]
            report[mechanism] = {"skipped": failure}
        else:
            per_step = {side: [] for side in loops}
            for _ in range(rounds):  # alternate, so drifts in machine load hit both sides alike
                for side, fn in loops.items():
                    per_step[side].append(seconds(lambda fn=fn: fn(steps), device) / steps)
            peak = {side: None for side in loops}
            if device.type == "cuda":
                peak = {side: cuda_peak_bytes(lambda fn=fn: fn(MEMORY_STEPS), device)
                        for side, fn in loops.items()}
            pair = [row({**names, "mode": f"{mechanism}-{side}"}, FWD_BWD, per_step[side], peak[side], CUDA_PEAK)
                    for side in loops]
            rows += pair
            speed = {side: tokens_per_step / r["median_s"] for side, r in zip(loops, pair)}
            report[mechanism] = {"eager_tokens_per_s": speed["eager"], "compiled_tokens_per_s": speed["compiled"],
                                 "compiled_over_eager": speed["compiled"] / speed["eager"],
                                 "first_step_s": first_step,
                                 "compile_s": max(0.0, first_step - pair[1]["median_s"])}
        del loops, eager_model, compiled_model
        torch._dynamo.reset()  # each mechanism's compile starts afresh (and its graphs are freed)
    setup = {"batch_size": batch, "seq_len": pair_cfg.seq_len, "steps_per_round": steps, "rounds": rounds,
             "mechanisms": {name: dict(fields) for name, fields in COMPILED_MECHANISMS.items()},
             "timed": "the plain loop (forward, backward, clip, AdamW, loss.item()) on an eager model and on "
                      "torch.compile(model, fullgraph=True) of a copy with the same weights, alternating rounds; "
                      "first_step_s is the compiled side's first step (its compile), timed alone before the "
                      "rounds, compile_s that minus its median step"}
    return rows, {"compiled": report, "compiled_setup": setup}
