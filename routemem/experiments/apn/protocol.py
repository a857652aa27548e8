"""APN study: ``routemem reproduce apn [--quick]`` (papers/apn.md).

Stage 1 pretrains two byte-level language models on domain A that differ only in the FFN (APN
or a same-parameter dense FFN); stage 2 adapts each to domain B, one arm per choice of what
trains. The pipeline and its arms are in ``experiments/shared/adaptation.py`` (absorption
uses it too).

Every arm gets the same learning-rate grid; per arm and seed the rate with the best B-validation
perplexity is kept. Perplexity on A-test (retention) and B-test (adaptation) is measured before,
along the way (forgetting curves) and after; plus the fraction of parameters each arm changed and
how much the patches used on A and on B overlap. Adaptation uses no weight decay, so a parameter
changes only if its gradient (or its Adam moment) says so.

Unit of work (``--jobs`` / ``--shard``): one seed's pretraining of one FFN kind followed by every
adaptation of that pretrained model (its arms at every rate). Stage 2 needs the stage-1 weights,
so splitting the stages would make a shard wait for (or redo) another machine's pretraining; a
(kind, seed) pipeline is self-contained, keeps the weights in memory, and its record is cached as
one file. The price: at most 2 x seeds units run at once.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from routemem.experiments.apn import claims as apn_claims
from routemem.experiments.apn import report as apn_report
from routemem.experiments.shared.adaptation import (  # the pipeline; Setting, QUICK, FULL are its sizes
    ARMS,
    FULL,
    PAIRS,
    QUICK,
    Setting,
    cached_domains,
    default_pair,
    train_kind,
)
from routemem.experiments.shared.cache import RunCache, run_key
from routemem.experiments.shared.common import best_per_seed, compile_fields, use_bf16, write_outputs
from routemem.experiments.shared.runner import Execution, Unit, run_units
from routemem.machine import machine_header

__all__ = ["ARMS", "FULL", "PAIRS", "QUICK", "Setting", "run", "units", "ordered"]


def units(setting: Setting, pair: str, data_dir: str | None, device: torch.device) -> list[Unit]:
    # A unit pretrains one kind and adapts it with every arm at every rate, so only the seeds are a
    # grid here: arms and adapt_lrs stay in its key (the domains' sha256 too: same pair, new text).
    data = {**asdict(setting), "pair": pair, "sha256": cached_domains(pair, data_dir)["sha256"]}
    return [Unit(f"{kind}-seed{seed}", train_kind, (setting, kind, pair, data_dir, seed, device.type),
                 run_key(data, ("seeds",), kind=kind, seed=seed), compiles=True)
            for seed in setting.seeds for kind in ("dense", "apn")]


def ordered(runs: list[dict], setting: Setting) -> list[dict]:
    """Per seed: both pretrainings, then the arms in the setting's order, each at every rate."""
    arms = [f"pretrain-{kind}" for kind in ("dense", "apn")] + list(setting.arms)
    return sorted(runs, key=lambda r: (list(setting.seeds).index(r["seed"]), arms.index(r["arm"]),
                                       0 if r["arm"].startswith("pretrain") else list(setting.adapt_lrs).index(r["lr"])))


def run(out: Path, quick: bool = False, data_dir: str | None = None, setting: Setting | None = None,
        pair: str | None = None, device: str | torch.device = "auto", jobs: int = 1, shard=None,
        threads: int | None = None, compile: bool = False) -> dict:
    """Writes OUT/apn/{results.json, report.md, forgetting_curves.png, patch_usage.png, tradeoff.png}.
    Each finished (kind, seed) unit is kept in OUT/apn/runs/, so a rerun resumes; with ``shard`` only
    that shard's units are trained and a summary (``{"shard", "trained", "reused", "runs_dir"}``)
    is returned without writing the report."""
    setting = setting or (QUICK if quick else FULL)
    execution = Execution.make(device, jobs, shard, threads, compile)
    pair = pair or default_pair(data_dir)
    domains = cached_domains(pair, data_dir)  # a bad pair or missing corpus fails here, before any training
    study_dir = Path(out) / "apn"
    started = time.perf_counter()
    cache = RunCache(study_dir / "runs", {"setting": asdict(setting), "pair": pair, "sha256": domains["sha256"]})
    todo = units(setting, pair, data_dir, execution.device)
    outcome = run_units(todo, cache, execution)
    if execution.shard is not None:
        return outcome.shard_summary(execution.shard, cache)
    runs = ordered([r for u in todo for r in outcome.records[u.name]], setting)
    # per arm and seed, the learning rate with the best B-validation perplexity
    chosen = best_per_seed(runs, setting.arms, setting.seeds, lambda r: r["val"]["b_val_ppl"], higher_is_better=False)
    results = {
        "study": "apn",
        "mode": "quick" if setting == QUICK else "full" if setting == FULL else "custom",
        "env": machine_header(execution.device),
        "execution": {"jobs": execution.jobs, "bf16": use_bf16(setting.bf16, execution.device),
                      "trained_on": cache.trained_on()},
        **compile_fields(execution.compile, "every pretraining and adaptation run (evaluations eager)"),
        "data": {"train": domains["names"][0], "shift": domains["names"][1], "tokenizer": "bytes",
                 "sha256": domains["sha256"], "setting": asdict(setting)},
        "claims": apn_claims.claims(runs, chosen),
        "runs": runs,
        "runs_reused": outcome.reused,  # units finished in an earlier invocation (interrupted, or a shard)
        "seconds": time.perf_counter() - started,
    }
    results["tradeoff"] = {"mean_ppl_by_arm_and_lr": apn_report.by_rate(results),
                           "apn_patches_vs_dense_global": apn_report.dominated(results, chosen)}
    write_outputs(study_dir, results, apn_report.report(results, setting, chosen))
    apn_report.plots(study_dir, results, setting, chosen)
    return results
