"""Palimpsa on multi-query associative recall (MQAR): does metaplasticity help recall?

Protocol. Six mixers (softmax attention, GLA, Mamba2, MetaMamba2, Palimpsa, Gated DeltaNet), two
layers, no FFN, trained on a mixture of MQAR settings plus the in-context overwrite variant (some
keys re-bound to a new value later in the sequence), a learning-rate grid per mixer (picked per seed
by validation accuracy), then tested on a grid of (seq_len, num_kv_pairs). The filler between
queries is zeros, as in the authors' MQAR configurations (zoology's ``random_non_queries=False``;
``Setting.random_filler`` switches to random tokens), and palimpsa, gla and gated_deltanet use the
paper's ``expand_v = 2``. Attention gets a short causal convolution on q|k|v (width 4: the
recurrent mixers have one inside, zoology's attention baseline has its short-conv hybrid; without
it, 2-layer attention stayed on the plateau in the pilots). Beside the main runs, ``state_sweep`` trains every mixer at other widths
(d_model) for the accuracy-vs-state-size plot.

Every run records whether it left the "answer with some value seen in the context" plateau
(``palimpsa_claims.left_plateau``), so the report separates optimisation failures from capacity
limits. Claims and their rules are in ``routemem.experiments.palimpsa_claims``:
1. metaplastic beats non-metaplastic on MQAR at the decisive test cells: palimpsa vs gla and
   meta_mamba2 vs mamba2 (disjoint mean ± std, or a one-sided paired sign test over seeds);
2. the special cases reduce: beta = 0 gives GLA with v / I_prior exactly, and the gap to that limit
   shrinks monotonically as I_prior grows (measured on the ops);
3. on the overwrite variant, metaplasticity improves the balance of stability (keys bound once)
   and plasticity (re-bound keys): mean of the two, palimpsa vs gla and meta_mamba2 vs mamba2.

Settings: QUICK (minutes), FULL (the CPU study, sized from the pilots in docs/palimpsa_pilots.md),
PAPER (``--setting paper``: the paper's MQAR scale, for a GPU).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from routemem.data.mqar import multiquery_ar, multiquery_ar_overwrite, recall_accuracy
from routemem.errors import TrainingDiverged, UserError
from routemem.experiments.palimpsa import checks as palimpsa_checks
from routemem.experiments.palimpsa import claims as palimpsa_claims
from routemem.experiments.palimpsa import report as palimpsa_report
from routemem.experiments.shared.cache import RunCache, run_key
from routemem.experiments.shared.common import best_per_seed, compile_fields, write_outputs
from routemem.experiments.shared.runner import Execution, Unit, compiled, run_units
from routemem.machine import machine_header
from routemem.models import LMConfig, TransformerLM
from routemem.train.config import TrainConfig
from routemem.train.supervised import fit_steps

MIXERS = ("attention", "gla", "mamba2", "meta_mamba2", "palimpsa", "gated_deltanet")
PAIRS = palimpsa_claims.PAIRS  # (metaplastic, its non-metaplastic twin)


EXPAND_V_MIXERS = ("palimpsa", "gla", "gated_deltanet")  # the mixers with an expand_v option


@dataclass(frozen=True)
class Setting:
    """Everything that sizes the study; QUICK, FULL and PAPER below are the shipped settings."""

    mixers: tuple[str, ...]
    d_model: int
    n_head: int
    vocab_size: int
    train_tasks: tuple[tuple[int, int, int], ...]  # (seq_len, num_kv_pairs, num_rebound), round-robin
    steps: int
    batch_size: int
    lrs: tuple[float, ...]  # every mixer's grid, unless ``lr_grid`` names the mixer
    seeds: tuple[int, ...]
    test_grid: tuple[tuple[int, int], ...]  # (seq_len, num_kv_pairs)
    overwrite_test: tuple[int, int, int]  # (seq_len, num_kv_pairs, num_rebound)
    n_val: int
    n_test: int
    n_layer: int = 2
    warmup_steps: int = 50
    weight_decay: float = 0.1
    random_filler: bool = False  # False: zeros between the queries, the authors' MQAR data
    expand_v: int = 2  # value head width of palimpsa, gla, gated_deltanet (the paper's MQAR runs)
    attention_conv: int | None = 4  # attention's short conv on q|k|v (zoology's hybrid; None: plain)
    lr_grid: tuple[tuple[str, tuple[float, ...]], ...] = ()  # (mixer, its learning rates) overrides
    decisive: tuple[tuple[int, int], ...] = ()  # the test cells claims 1 is decided on (default: hardest)
    plateau_threshold: float = 0.5  # accuracy on the easiest val cell that counts as off the plateau
    state_sweep: tuple[int, ...] = ()  # other d_model values, for accuracy vs state size
    state_sweep_seeds: tuple[int, ...] = (0,)
    state_sweep_lrs: tuple[float, ...] = ()  # the sweep's learning rates (empty: each mixer's grid)

    @property
    def max_seq_len(self) -> int:
        return max([s for s, _ in self.test_grid] + [self.overwrite_test[0]] + [t[0] for t in self.train_tasks])

    @property
    def hardest(self) -> tuple[int, int]:
        """The test setting with the most pairs, longest sequence breaking ties."""
        return max(self.test_grid, key=lambda s: (s[1], s[0]))

    @property
    def decisive_cells(self) -> tuple[tuple[int, int], ...]:
        return self.decisive or (self.hardest,)

    @property
    def easiest(self) -> tuple[int, int]:
        """The test setting with the fewest pairs (shortest breaking ties): the plateau check's cell."""
        return min(self.test_grid, key=lambda s: (s[1], s[0]))

    def lrs_of(self, mixer: str) -> tuple[float, ...]:
        return dict(self.lr_grid).get(mixer, self.lrs)


QUICK = Setting(
    mixers=MIXERS, d_model=64, n_head=4, vocab_size=128,
    train_tasks=((32, 2, 0), (32, 4, 0), (64, 8, 0), (64, 8, 4)), steps=500, batch_size=48,
    lrs=(1e-2,), seeds=(0,), test_grid=((32, 4), (64, 8), (96, 8), (96, 16)),
    overwrite_test=(64, 8, 4), n_val=64, n_test=256,
)
# Sized from the pilots (docs/palimpsa_pilots.md): zero filler, 3000 steps with 200 warmup; with a
# width-4 conv attention is at 1.000 on every cell at either learning rate, gla and palimpsa leave
# the plateau and are limited at (128, 32) (0.85 and 0.70 on seed 0), so that cell decides claim 1.
# One learning rate per mixer and 5 seeds: 3e-3, where attention, gla and palimpsa left the plateau,
# and 1e-2 for mamba2 and meta_mamba2 (mamba2 stayed on it at 1e-3 and 3e-3, left it at 1e-2);
# the state sweep adds d_model 32 and 96 (seed 0). A 2-point grid ({3e-3, 1e-2}) was the plan, but
# the first full runs took 6-10 min each here (one thread, 2 workers), which put it near 4 h:
# over the 3 h budget. The full run's runs took 280-530 s at d 64 and up to 780 s at d 96 (one
# thread), which adds up to about 2.2 h of wall time here with --jobs 2 (README).
FULL = Setting(
    mixers=MIXERS, d_model=64, n_head=4, vocab_size=256,
    train_tasks=((64, 4, 0), (64, 8, 0), (64, 16, 0), (128, 16, 0), (128, 32, 0), (64, 8, 4)),
    steps=3000, batch_size=48, lrs=(3e-3,), lr_grid=(("mamba2", (1e-2,)), ("meta_mamba2", (1e-2,))),
    seeds=(0, 1, 2, 3, 4),
    test_grid=((64, 4), (64, 8), (64, 16), (128, 16), (128, 32)), overwrite_test=(64, 8, 4),
    n_val=128, n_test=512, warmup_steps=200, decisive=((128, 32),),
    state_sweep=(32, 96), state_sweep_seeds=(0,),
)
# The paper's MQAR (papers/palimpsa.md; zoology's standard grid, the authors' zero filler): vocab 8192,
# d_model 128, 2 layers of 8 heads, no MLP; zoology's training mixture (100k sequences of (64, 4),
# 20k of each other shape: 22.5k steps of 256 is its 32 epochs) and learning-rate sweep
# (logspace(-3, -1.5, 4)); tested up to (1024, 256). A GPU job: see README for the expected time.
PAPER = Setting(
    mixers=MIXERS, d_model=128, n_head=8, vocab_size=8192,
    train_tasks=((64, 4, 0), (128, 8, 0), (256, 16, 0), (256, 32, 0), (256, 64, 0), (256, 32, 16)),
    steps=22_500, batch_size=256, lrs=tuple(float(x) for x in np.logspace(-3, -1.5, 4)), seeds=(0, 1, 2),
    test_grid=((64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256)),
    overwrite_test=(256, 32, 16), n_val=256, n_test=1000, warmup_steps=500,
    decisive=((512, 128), (1024, 256)),
)
SETTING_NAMES = ("quick", "full", "paper")  # the module's QUICK, FULL, PAPER (looked up when asked)


def model_config(setting: Setting, mixer: str, d_model: int | None = None) -> LMConfig:
    # Attention gets RoPE so it can be tested past its training length; the recurrent mixers carry
    # position in their decays and short convolutions.
    kwargs = {"expand_v": setting.expand_v} if mixer in EXPAND_V_MIXERS else {}
    if mixer == "attention" and setting.attention_conv is not None:
        kwargs = {"conv_width": setting.attention_conv}
    return LMConfig(vocab_size=setting.vocab_size, n_layer=setting.n_layer, d_model=d_model or setting.d_model,
                    n_head=setting.n_head, max_seq_len=setting.max_seq_len, norm="rmsnorm",
                    pos="rope" if mixer == "attention" else "none", mixer=mixer, mixer_kwargs=kwargs, ffn="none")


def task_batch(setting: Setting, task: tuple[int, int, int], n: int, seed: int):
    seq_len, pairs, rebound = task
    filler = {"random_filler": setting.random_filler}
    if rebound:
        inputs, labels, kinds = multiquery_ar_overwrite(setting.vocab_size, seq_len, pairs, rebound, n, seed=seed,
                                                        **filler)
    else:
        inputs, labels = multiquery_ar(setting.vocab_size, seq_len, pairs, n, seed=seed, **filler)
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


def train_one(setting: Setting, mixer: str, lr: float, seed: int, device: str = "cpu",
              d_model: int | None = None, compile: bool = False) -> dict:
    """One (mixer, lr, seed[, d_model]) run on ``device``: train, then validation and test scores,
    the state size and whether it left the plateau. The model is built on the CPU (the same initial
    weights everywhere), then moved. Every mixer sees the same batches for the same seed.
    ``compile``: train through torch.compile (``reproduce --compile``; scoring stays eager)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    device = torch.device(device)
    model = TransformerLM(model_config(setting, mixer, d_model)).to(device)
    cfg = TrainConfig(batch_size=setting.batch_size, max_steps=setting.steps, lr=lr, min_lr=lr / 10,
                      warmup_steps=setting.warmup_steps, weight_decay=setting.weight_decay, seed=seed,
                      compile=compile)

    def batch_at(step: int):
        task = setting.train_tasks[step % len(setting.train_tasks)]
        inputs, labels, _ = task_batch(setting, task, setting.batch_size, seed=1_000_003 * (seed + 1) + step)
        return inputs, labels

    run = {"arm": mixer, "lr": lr, "seed": seed, "d_model": d_model or setting.d_model,
           "params": model.num_params(include_embeddings=False)}
    try:
        losses = fit_steps(compiled(model, cfg.compile), batch_at, cfg, device=device,
                           progress=f"{mixer} d={run['d_model']} lr={lr:g} seed={seed}")
    except TrainingDiverged as err:
        return {**run, "diverged": str(err), "left_plateau": False, "seconds": time.perf_counter() - start}
    hard_len = setting.hardest[0]
    run.update(
        final_loss=float(np.mean(losses[-20:])),
        state_size=sum(block.mixer.state_size(hard_len) for block in model.blocks),
        val=score(model, setting, setting.n_val, seed=7_000 + seed),
        metrics=score(model, setting, setting.n_test, seed=9_000 + seed),
        seconds=time.perf_counter() - start,
    )
    run["left_plateau"] = palimpsa_claims.left_plateau(run, setting)
    return run


# the setting's grid lists: a run reads only its own mixer, lr, seed (and sweep width), so these
# stay out of its key (cache.run_key) and adding a value trains only the new runs
GRID = ("mixers", "lrs", "lr_grid", "seeds", "state_sweep", "state_sweep_seeds", "state_sweep_lrs")


def units(setting: Setting, device: torch.device) -> list[Unit]:
    """One unit per (seed, mixer, lr), then per (state-sweep width, seed, mixer, lr): each trains one
    model from scratch, independent of the rest."""
    main = [Unit(f"{mixer}-lr{lr:g}-seed{seed}", train_one, (setting, mixer, lr, seed, device.type),
                 run_key(setting, GRID, mixer=mixer, lr=lr, seed=seed), compiles=True)
            for seed in setting.seeds for mixer in setting.mixers for lr in setting.lrs_of(mixer)]
    sweep = [Unit(f"{mixer}-d{d}-lr{lr:g}-seed{seed}", train_one, (setting, mixer, lr, seed, device.type, d),
                  run_key(setting, GRID, mixer=mixer, lr=lr, seed=seed, d_model=d), compiles=True)
             for d in setting.state_sweep if d != setting.d_model for seed in setting.state_sweep_seeds
             for mixer in setting.mixers for lr in (setting.state_sweep_lrs or setting.lrs_of(mixer))]
    return main + sweep


def pick_setting(quick: bool, setting: Setting | str | None) -> tuple[Setting, str]:
    """(the Setting, its name): an explicit Setting, a shipped one by name, or QUICK / FULL."""
    if isinstance(setting, Setting):
        return setting, "quick" if quick else "full"
    name = setting or ("quick" if quick else "full")
    if name not in SETTING_NAMES:
        raise UserError(f"unknown palimpsa setting '{name}' (available: {', '.join(SETTING_NAMES)})")
    if quick and name != "quick":
        raise UserError(f"--quick and --setting {name} contradict each other: give one")
    return globals()[name.upper()], name


def run(out: Path, quick: bool = False, data_dir: str | None = None, setting: Setting | str | None = None,
        device: str | torch.device = "auto", jobs: int = 1, shard=None,
        threads: int | None = None, compile: bool = False) -> dict:
    """``routemem reproduce palimpsa [--quick | --setting paper] [--compile]``: writes OUT/palimpsa/{results.json,
    report.md, *.png}. Each finished run is kept in OUT/palimpsa/runs/, so running the same command
    again after an interruption resumes. With ``shard`` it trains only that shard's runs and returns a
    summary (``{"shard", "trained", "reused", "runs_dir"}``) without writing the report. MQAR is
    synthetic, so ``data_dir`` is unused."""
    setting, mode = pick_setting(quick, setting)
    execution = Execution.make(device, jobs, shard, threads, compile)
    study_dir = Path(out) / "palimpsa"
    started = time.perf_counter()
    cache = RunCache(study_dir / "runs", asdict(setting))
    todo = units(setting, execution.device)
    outcome = run_units(todo, cache, execution)
    if execution.shard is not None:
        return outcome.shard_summary(execution.shard, cache)
    runs = [outcome.records[u.name] for u in todo]
    main = [r for r in runs if r.get("d_model", setting.d_model) == setting.d_model]
    chosen = best_per_seed(main, setting.mixers, setting.seeds, lambda r: r["val"]["grid_mean"])  # best LR
    results = {
        "study": "palimpsa",
        "mode": mode,
        "env": machine_header(execution.device),
        "execution": {"jobs": execution.jobs, "trained_on": cache.trained_on()},
        **compile_fields(execution.compile, "every training run (scoring, the special-case checks eager)"),
        "data": {"train": "mqar (synthetic)", "filler": "random tokens" if setting.random_filler else "zeros",
                 "setting": asdict(setting)},
        "claims": palimpsa_claims.claims(setting, chosen, palimpsa_checks.special_case_claim(),
                                         chance_accuracy(setting)),
        "chance_accuracy": chance_accuracy(setting),
        "regime": palimpsa_claims.regime(setting, chosen),
        "plateau": palimpsa_claims.plateau_table(runs, setting),
        "runs": runs,
        "runs_reused": outcome.reused,  # finished in an earlier invocation (interrupted, or a shard)
        "seconds": time.perf_counter() - started,
    }
    sweep = palimpsa_claims.state_sweep(runs, setting)
    write_outputs(study_dir, results, palimpsa_report.report(results, setting, chosen, sweep))
    palimpsa_report.plots(study_dir, setting, chosen, sweep)
    return results
