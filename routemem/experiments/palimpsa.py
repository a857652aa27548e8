"""Palimpsa on multi-query associative recall (MQAR): does metaplasticity help recall?

Protocol. Six mixers (softmax attention, GLA, Mamba2, MetaMamba2, Palimpsa, Gated DeltaNet), two
layers, no FFN, trained on a mixture of MQAR settings plus the in-context overwrite variant (some
keys re-bound to a new value later in the sequence), a small learning-rate grid per mixer and seed
(picked by validation accuracy), then tested on a grid of (seq_len, num_kv_pairs) that includes
sequences longer than any seen in training.

Claims (each verdict is computed by the rule in ``routemem.experiments.common``):
1. metaplastic beats non-metaplastic on MQAR at the hardest test setting: palimpsa vs gla and
   meta_mamba2 vs mamba2;
2. the special cases reduce: beta = 0 gives GLA with v / I_prior exactly, and the gap to that limit
   shrinks monotonically as I_prior grows (measured on the ops);
3. on the overwrite variant, metaplasticity improves the balance of stability (keys bound once)
   and plasticity (re-bound keys): mean of the two, palimpsa vs gla and meta_mamba2 vs mamba2.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from routemem.data.mqar import multiquery_ar, multiquery_ar_overwrite, recall_accuracy
from routemem.errors import TrainingDiverged
from routemem.experiments import palimpsa_checks, palimpsa_report
from routemem.experiments.common import (
    RunCache,
    best_per_seed,
    combine_verdicts,
    directional_verdict,
    summarize,
    write_outputs,
)
from routemem.experiments.runner import Execution, Unit, run_units
from routemem.machine import machine_header
from routemem.models import LMConfig, TransformerLM
from routemem.train.config import TrainConfig
from routemem.train.supervised import fit_steps

MIXERS = ("attention", "gla", "mamba2", "meta_mamba2", "palimpsa", "gated_deltanet")
PAIRS = (("palimpsa", "gla"), ("meta_mamba2", "mamba2"))  # (metaplastic, its non-metaplastic twin)


@dataclass(frozen=True)
class Setting:
    """Everything that sizes the study; QUICK and FULL below are the two shipped settings."""

    mixers: tuple[str, ...]
    d_model: int
    n_head: int
    vocab_size: int
    train_tasks: tuple[tuple[int, int, int], ...]  # (seq_len, num_kv_pairs, num_rebound), round-robin
    steps: int
    batch_size: int
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    test_grid: tuple[tuple[int, int], ...]  # (seq_len, num_kv_pairs)
    overwrite_test: tuple[int, int, int]  # (seq_len, num_kv_pairs, num_rebound)
    n_val: int
    n_test: int
    n_layer: int = 2
    warmup_steps: int = 50
    weight_decay: float = 0.1

    @property
    def max_seq_len(self) -> int:
        return max([s for s, _ in self.test_grid] + [self.overwrite_test[0]] + [t[0] for t in self.train_tasks])

    @property
    def hardest(self) -> tuple[int, int]:
        """The test setting with the most pairs, longest sequence breaking ties."""
        return max(self.test_grid, key=lambda s: (s[1], s[0]))


QUICK = Setting(
    mixers=MIXERS, d_model=64, n_head=4, vocab_size=128,
    train_tasks=((32, 2, 0), (32, 4, 0), (64, 8, 0), (64, 8, 4)), steps=500, batch_size=48,
    lrs=(1e-2,), seeds=(0,), test_grid=((32, 4), (64, 8), (96, 8), (96, 16)),
    overwrite_test=(64, 8, 4), n_val=64, n_test=256,
)
# Sized from measured step times on the 2-core CPU (estimate ~2.5 h there; see the issue note).
# d_model 64 rather than 128: at 128 the same budget allows too few steps to get past the
# "guess a value seen in context" plateau (measured: none of the mixers does in 500 steps).
FULL = Setting(
    mixers=MIXERS, d_model=64, n_head=4, vocab_size=256,
    train_tasks=((32, 4, 0), (64, 8, 0), (64, 16, 0), (128, 16, 0), (128, 32, 0), (64, 8, 4)),
    steps=2000, batch_size=48, lrs=(3e-3, 1e-2), seeds=(0, 1, 2),
    test_grid=((64, 8), (64, 16), (128, 16), (128, 32), (192, 32), (192, 48)),
    overwrite_test=(64, 8, 4), n_val=128, n_test=512,
)


def model_config(setting: Setting, mixer: str) -> LMConfig:
    # Attention gets RoPE so it can be tested past its training length; the recurrent mixers carry
    # position in their decays and short convolutions.
    return LMConfig(vocab_size=setting.vocab_size, n_layer=setting.n_layer, d_model=setting.d_model,
                    n_head=setting.n_head, max_seq_len=setting.max_seq_len, norm="rmsnorm",
                    pos="rope" if mixer == "attention" else "none", mixer=mixer, ffn="none")


def task_batch(setting: Setting, task: tuple[int, int, int], n: int, seed: int):
    seq_len, pairs, rebound = task
    if rebound:
        inputs, labels, kinds = multiquery_ar_overwrite(setting.vocab_size, seq_len, pairs, rebound, n, seed=seed)
    else:
        inputs, labels = multiquery_ar(setting.vocab_size, seq_len, pairs, n, seed=seed)
        kinds = None
    return torch.from_numpy(inputs), torch.from_numpy(labels), kinds


def chance_accuracy(setting: Setting) -> float:
    """Recall accuracy of a uniform guess among the values (the upper half of the vocabulary)."""
    return 1.0 / (setting.vocab_size - setting.vocab_size // 2)


@torch.no_grad()
def predict(model: TransformerLM, inputs: torch.Tensor, batch_size: int = 128) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    out = [model(inputs[i : i + batch_size].to(device)).argmax(-1).cpu() for i in range(0, len(inputs), batch_size)]
    model.train()
    return torch.cat(out).numpy()


def score(model: TransformerLM, setting: Setting, n: int, seed: int) -> dict:
    """Recall accuracy on every grid point and on the overwrite variant (stability/plasticity)."""
    metrics = {}
    for seq_len, pairs in setting.test_grid:
        inputs, labels, _ = task_batch(setting, (seq_len, pairs, 0), n, seed)
        metrics[f"acc_L{seq_len}_kv{pairs}"] = recall_accuracy(predict(model, inputs), labels.numpy())["accuracy"]
    inputs, labels, kinds = task_batch(setting, setting.overwrite_test, n, seed)
    split = recall_accuracy(predict(model, inputs), labels.numpy(), kinds)
    metrics.update(overwrite_stability=split["stability"], overwrite_plasticity=split["plasticity"],
                   overwrite_balance=(split["stability"] + split["plasticity"]) / 2)
    metrics["grid_mean"] = float(np.mean([metrics[f"acc_L{s}_kv{p}"] for s, p in setting.test_grid]))
    return metrics


def train_one(setting: Setting, mixer: str, lr: float, seed: int, device: str = "cpu") -> dict:
    """One (mixer, lr, seed) run on ``device``: train, then validation and test scores and the
    state size. The model is built on the CPU (the same initial weights everywhere), then moved."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    device = torch.device(device)
    model = TransformerLM(model_config(setting, mixer)).to(device)
    cfg = TrainConfig(batch_size=setting.batch_size, max_steps=setting.steps, lr=lr, min_lr=lr / 10,
                      warmup_steps=setting.warmup_steps, weight_decay=setting.weight_decay, seed=seed)

    def batch_at(step: int):
        task = setting.train_tasks[step % len(setting.train_tasks)]
        inputs, labels, _ = task_batch(setting, task, setting.batch_size, seed=1_000_003 * (seed + 1) + step)
        return inputs, labels

    run = {"arm": mixer, "lr": lr, "seed": seed, "params": model.num_params(include_embeddings=False)}
    try:
        losses = fit_steps(model, batch_at, cfg, device=device, progress=f"{mixer} lr={lr:g} seed={seed}")
    except TrainingDiverged as err:
        return {**run, "diverged": str(err), "seconds": time.perf_counter() - start}
    hard_len = setting.hardest[0]
    run.update(
        final_loss=float(np.mean(losses[-20:])),
        state_size=sum(block.mixer.state_size(hard_len) for block in model.blocks),
        val=score(model, setting, setting.n_val, seed=7_000 + seed),
        metrics=score(model, setting, setting.n_test, seed=9_000 + seed),
        seconds=time.perf_counter() - start,
    )
    return run


def claims(setting: Setting, chosen: dict[str, list[dict]], checks: dict) -> list[dict]:
    hard = "acc_L{}_kv{}".format(*setting.hardest)
    chance = chance_accuracy(setting)

    def measured(mixer: str, key: str) -> dict:
        return summarize([r["metrics"][key] for r in chosen.get(mixer, [])])

    def paired_claim(claim_id: str, key: str, statement: str, description: str, paper: dict) -> dict:
        comparisons, measured_all = [], {}
        for ours, base in PAIRS:
            m_ours, m_base = measured(ours, key), measured(base, key)
            verdict, why = directional_verdict(m_ours, m_base)
            comparisons.append({"ours": ours, "baseline": base, "verdict": verdict, "why": why})
            measured_all[ours], measured_all[base] = m_ours, m_base
        return {"id": claim_id, "statement": statement, "description": description, "paper": paper,
                "measured": measured_all, "chance": chance,
                "comparisons": comparisons, "verdict": combine_verdicts([c["verdict"] for c in comparisons]),
                "why": "; ".join(f"{c['ours']} vs {c['baseline']}: {c['why']}" for c in comparisons)}

    return [
        paired_claim("mqar_metaplastic_beats_non_metaplastic", hard,
                     "Making a mixer metaplastic improves associative recall: Palimpsa beats GLA and "
                     "MetaMamba2 beats Mamba2 on the hardest MQAR setting",
                     f"MQAR accuracy at the hardest test setting (seq_len, kv pairs) = {setting.hardest}; "
                     f"chance (a uniform guess among the {setting.vocab_size - setting.vocab_size // 2} values) "
                     f"= {chance:.4f}",
                     {"ours": "palimpsa > gla and meta_mamba2 > mamba2 on MQAR",
                      "number": "not reported at this setting (the paper's MQAR runs use vocab 8192, "
                                "seq 512/1024; our notes hold no per-setting numbers)",
                      "numbers": "MAD suite averages (a different benchmark): Palimpsa 71.9, GLA 72.0, Mamba2 66.0"}),
        checks,
        paired_claim("overwrite_stability_plasticity", "overwrite_balance",
                     "Metaplasticity balances keeping old bindings and taking new ones: when keys are re-bound "
                     "in context, Palimpsa and MetaMamba2 recall both kinds better than GLA and Mamba2",
                     "mean of stability (keys bound once) and plasticity (re-bound keys) accuracy on the "
                     f"overwrite variant (seq_len, kv pairs, re-bound) = {setting.overwrite_test}; chance "
                     f"= {chance:.4f}",
                     {"ours": "metaplasticity resolves the stability-plasticity dilemma in context",
                      "number": "not reported (the overwrite variant is our test of the paper's qualitative claim)"}),
    ]


def units(setting: Setting, device: torch.device) -> list[Unit]:
    """One unit per (seed, mixer, lr): each trains one model from scratch, independent of the rest."""
    return [Unit(f"{mixer}-lr{lr:g}-seed{seed}", train_one, (setting, mixer, lr, seed, device.type))
            for seed in setting.seeds for mixer in setting.mixers for lr in setting.lrs]


def run(out: Path, quick: bool = False, data_dir: str | None = None, setting: Setting | None = None,
        device: str | torch.device = "auto", jobs: int = 1, shard=None) -> dict:
    """``routemem reproduce palimpsa [--quick]``: writes OUT/palimpsa/{results.json, report.md, *.png}.
    Each finished run is kept in OUT/palimpsa/runs/, so running the same command again after an
    interruption resumes. With ``shard`` it trains only that shard's runs and returns a summary
    (``{"shard", "trained", "reused", "runs_dir"}``) without writing the report. MQAR is synthetic,
    so ``data_dir`` is unused."""
    setting = setting or (QUICK if quick else FULL)
    execution = Execution.make(device, jobs, shard)
    study_dir = Path(out) / "palimpsa"
    started = time.perf_counter()
    cache = RunCache(study_dir / "runs", asdict(setting))
    todo = units(setting, execution.device)
    outcome = run_units(todo, cache, execution)
    if execution.shard is not None:
        return outcome.shard_summary(execution.shard, cache)
    runs = [outcome.records[u.name] for u in todo]
    chosen = best_per_seed(runs, setting.mixers, setting.seeds, lambda r: r["val"]["grid_mean"])  # best LR
    results = {
        "study": "palimpsa",
        "mode": "quick" if quick else "full",
        "env": machine_header(execution.device),
        "execution": {"jobs": execution.jobs, "trained_on": cache.trained_on()},
        "data": {"train": "mqar (synthetic)", "setting": asdict(setting)},
        "claims": claims(setting, chosen, palimpsa_checks.special_case_claim()),
        "chance_accuracy": chance_accuracy(setting),
        "runs": runs,
        "runs_reused": outcome.reused,  # finished in an earlier invocation (interrupted, or a shard)
        "seconds": time.perf_counter() - started,
    }
    write_outputs(study_dir, results, palimpsa_report.report(results, setting, chosen))
    palimpsa_report.plots(study_dir, setting, chosen)
    return results
