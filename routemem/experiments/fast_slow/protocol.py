"""Fast-slow coupled attention: ``routemem reproduce fast-slow [--quick]`` (papers/fast_slow.md).

Byte-level language models on tiny Shakespeare (pydocs when ``$ROUTEMEM_DATA`` lacks it) that
differ only in the mixer, trained at equal token budgets and seeds (same initial embeddings and
batches per seed):

    dense      causal attention alone
    coupled    fast_slow: attention + block-pooled slow attention behind a zero-init gate
    frozen     fast_slow with the slow path and phi frozen at init (only the gate trains)

Budgets: the paper's 500k training tokens and 10x that. Positive control (ours): the same three
arms with the fast path limited to a short window (``control_window``), at the long budget; there
the slow path is the only channel to anything further back, so a working layer should open its
gate and beat the other two. A second, decisive control trains the three arms on synthetic topic
sequences (data/topics.py) with a 1-token fast window: there the slow path is worth ~0.6 nats by
construction, so a layer that cannot show it is broken. Plus a cost measurement (training-step
time of coupled vs dense, one process, interleaved) and the paper's theorem checked numerically
(experiments/fast_slow/theorem.py). The claims' rules are in experiments/fast_slow/claims.py,
fixed before the full run; the data each run trains on is in fast_slow/tasks.py (topics) and shared/text_lm.py (text).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from routemem.errors import TrainingDiverged
from routemem.experiments.fast_slow import claims as fast_slow_claims
from routemem.experiments.fast_slow import report as fast_slow_report
from routemem.experiments.fast_slow import theorem as fast_slow_theorem
from routemem.experiments.shared.cache import RunCache, run_key
from routemem.experiments.shared.common import compile_fields, use_bf16, write_outputs
from routemem.experiments.fast_slow.tasks import TOPICS, topic_levels, topic_task
from routemem.experiments.shared.runner import Execution, Unit, compiled, run_units
from routemem.experiments.shared.text_lm import cached_splits, default_corpus, text_task
from routemem.machine import machine_header
from routemem.models import LMConfig, TransformerLM
from routemem.train.config import TrainConfig
from routemem.train.evaluate import autocast_context
from routemem.train.optim import make_optimizer
from routemem.train.supervised import fit_steps

ARMS = ("dense", "coupled", "frozen")


@dataclass(frozen=True)
class Setting:
    d_model: int = 128
    n_layer: int = 2
    n_head: int = 4
    seq_len: int = 256
    block: int = 16  # P: one slow update per P tokens
    batch_size: int = 16
    lr: float = 3e-3
    budgets: tuple[int, ...] = (500_000, 5_000_000)  # training tokens: the paper's, and 10x
    # The fast path's window in the positive control. Not 16: two layers of a 16-token window reach
    # 31 tokens back, which covers the last complete block, so the slow path has little to add
    # (pilot, 5M tokens, seed 0: coupled - dense = -0.006 nats at window 16, -0.040 at window 4).
    control_window: int = 4
    # The decisive control: topic sequences (data/topics.py) where one token says little and a pooled
    # block names the topic; a 1-token fast window, so only the slow path sees past the current token.
    topic_vocab: int = 64
    topic_count: int = 16
    topic_size: int = 32
    topic_window: int = 1
    # Small batches, many steps: the slow path's signal passes through g = 0 and four small-init
    # matrices, and leaving that plateau takes steps, not tokens (pilot, seed 0: no gain after 244
    # steps of 16 sequences; 0.15 nats after 1220; 0.22 after 1953 steps of 4 sequences).
    topic_tokens: int = 4_000_000
    topic_batch_size: int = 4
    seeds: tuple[int, ...] = (0, 1, 2)
    val_tokens: int = 65_536  # final validation loss
    curve_points: int = 10  # validation evaluations along each run
    curve_tokens: int = 8_192
    gate_every: int = 10  # steps between gate statistics
    cost_steps: int = 10  # timed steps per arm and round in the cost measurement
    cost_rounds: int = 3
    bf16: bool = True

    def steps(self, tokens: int, batch_size: int | None = None) -> int:
        return max(1, tokens // ((batch_size or self.batch_size) * self.seq_len))

    @property
    def control_budget(self) -> int:
        return max(self.budgets)


FULL = Setting()
QUICK = replace(FULL, d_model=64, seq_len=128, batch_size=8, budgets=(100_000, 400_000), seeds=(0, 1),
                topic_tokens=300_000, val_tokens=16_384, curve_points=5, curve_tokens=4_096, cost_steps=5, cost_rounds=2)


# --- data and models -------------------------------------------------------------------------


def model_config(setting: Setting, arm: str, window: int | None) -> LMConfig:
    if arm == "dense":
        mixer, kwargs = "attention", ({"window": window} if window else {})
    else:
        mixer = "fast_slow"
        kwargs = {"block": setting.block, "freeze_slow": arm == "frozen", **({"window": window} if window else {})}
    return LMConfig(vocab_size=256, n_layer=setting.n_layer, d_model=setting.d_model, n_head=setting.n_head,
                    max_seq_len=setting.seq_len, mixer=mixer, mixer_kwargs=kwargs)


def gate_stats(model: TransformerLM) -> dict[str, list[float]]:
    """Per layer: rms and mean |g| of the gate (empty lists for the dense arm)."""
    mixers = [b.mixer for b in model.blocks if hasattr(b.mixer, "gate_values")]
    stats = [m.metrics() for m in mixers]
    return {"rms": [s["gate_rms"] for s in stats], "mean_abs": [s["gate_mean_abs"] for s in stats]}


@torch.no_grad()
def slow_share(model: TransformerLM, inputs: torch.Tensor) -> list[float]:
    """Per layer: rms of what the slow path adds (g * message) over rms of the mixer's output, on
    ``inputs``: how much of the layer the gate lets through, whatever the scale of g."""
    shares, seen = [], []
    hooks = [b.mixer.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0], out)))
             for b in model.blocks if hasattr(b.mixer, "gate_values")]
    try:
        model.eval()
        model(inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train()
    for mixer, x, out in seen:
        fast = mixer.fast(x)
        shares.append(float((out - fast).float().pow(2).mean().sqrt() / out.float().pow(2).mean().sqrt()))
    return shares


# --- one training run ------------------------------------------------------------------------


def train_one(setting: Setting, arm: str, tokens: int, window: int | None, seed: int, corpus: str,
              data_dir: str | None, device: str = "cpu", compile: bool = False) -> dict:
    """Train one model for ``tokens`` training tokens of ``corpus`` (or of topic sequences when
    ``corpus`` is ``TOPICS``); validation loss along the way and at the end, the gate's
    statistics every ``gate_every`` steps, and the slow path's share. Built on the CPU (the same
    initial weights on every device), then moved. ``compile``: train through torch.compile
    (``reproduce --compile``; the evaluations and probes stay eager)."""
    start = time.perf_counter()
    device = torch.device(device)
    task = topic_task(setting, seed) if corpus == TOPICS else text_task(setting, corpus, data_dir, seed)
    torch.manual_seed(seed)
    model = TransformerLM(model_config(setting, arm, window)).to(device)
    batch_size = setting.topic_batch_size if corpus == TOPICS else setting.batch_size
    steps = setting.steps(tokens, batch_size)
    bf16 = use_bf16(setting.bf16, device)
    cfg = TrainConfig(batch_size=batch_size, max_steps=steps, lr=setting.lr, min_lr=setting.lr / 10,
                      warmup_steps=max(1, steps // 20), weight_decay=0.1, seed=seed, compile=compile)
    curve_at = {round(steps * (i + 1) / setting.curve_points) - 1 for i in range(setting.curve_points)}
    probe = task.probe.to(device)
    record = {"arm": arm, "task": TOPICS if corpus == TOPICS else "text", "tokens": tokens, "window": window,
              "seed": seed, "steps": steps, "batch_tokens": batch_size * setting.seq_len,
              "params": model.num_params(include_embeddings=False),
              "curve": {"step": [], "val_loss": [], "slow_share": []}, "gate_trace": {"step": [], "rms": []}}

    def after_step(step: int) -> None:
        if arm != "dense" and (step % setting.gate_every == 0 or step == steps - 1):
            record["gate_trace"]["step"].append(step + 1)
            record["gate_trace"]["rms"].append(gate_stats(model)["rms"])
        if step in curve_at:
            record["curve"]["step"].append(step + 1)
            record["curve"]["val_loss"].append(task.val_loss(model, setting.curve_tokens, bf16))
            record["curve"]["slow_share"].append(slow_share(model, probe) if arm != "dense" else [])

    label = f"{arm}{f'-w{window}' if window else ''} {record['task']} {tokens:,} tokens seed={seed}"
    train_start = time.perf_counter()
    try:
        losses = fit_steps(compiled(model, cfg.compile), task.batch_at, cfg, bf16=bf16, progress=label,
                           after_step=after_step)
    except TrainingDiverged as err:
        return {**record, "diverged": str(err), "seconds": time.perf_counter() - start}
    train_seconds = time.perf_counter() - train_start
    record.update(
        metrics={"val_loss": task.val_loss(model, setting.val_tokens, bf16),
                 "train_loss_final": float(np.mean(losses[-20:]))},
        gate=gate_stats(model),
        slow_share=slow_share(model, probe) if arm != "dense" else [],
        train_seconds=train_seconds,
        seconds=time.perf_counter() - start,
    )
    return record


# --- cost: training-step time, coupled vs dense, in one process ------------------------------


def measure_cost(setting: Setting, device: str = "cpu") -> dict:
    """Median seconds per training step (forward, backward, AdamW) of each arm at the study's size,
    the arms interleaved round by round in this one process, so a slower or busier machine moves
    them together; the claim is the ratio coupled / dense. Each round's ratio is kept (the spread
    the claim reports), and so is how much CPU the process got while timing: on a busy CPU the
    ratio moves by more than the margin the claim tests (1.21x idle vs 0.83x beside another job,
    measured on the 2-core VM), so the claim must know whether the machine was loaded."""
    device = torch.device(device)
    bf16 = use_bf16(setting.bf16, device)
    batch = torch.randint(0, 256, (setting.batch_size, setting.seq_len + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = batch[:, :-1].to(device), batch[:, 1:].to(device)
    models = {}
    for arm in ARMS:
        torch.manual_seed(0)
        model = TransformerLM(model_config(setting, arm, None)).to(device)
        for mixer in (b.mixer for b in model.blocks if hasattr(b.mixer, "gate")):
            with torch.no_grad():
                mixer.gate.fill_(0.1)  # open: time the slow path in use
        cfg = TrainConfig(batch_size=setting.batch_size, max_steps=1, lr=1e-4)
        models[arm] = (model, make_optimizer(model, cfg))
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}

    def one_step(model, optimizer) -> None:
        with autocast_context(device, bf16):
            _, loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # waits for the device

    round_ratios = []
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(setting.cost_rounds):
        this_round: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for arm, (model, optimizer) in models.items():
            for _ in range(2):  # warm-up (and AdamW's state) outside the timing
                one_step(model, optimizer)
            for _ in range(setting.cost_steps):
                started = time.perf_counter()
                one_step(model, optimizer)
                this_round[arm].append(time.perf_counter() - started)
            times[arm] += this_round[arm]
        round_ratios.append(statistics.median(this_round["coupled"]) / statistics.median(this_round["dense"]))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    median = {arm: statistics.median(t) for arm, t in times.items()}
    return {"step_seconds": median, "samples": {arm: len(t) for arm, t in times.items()},
            "ratio_coupled_dense": median["coupled"] / median["dense"],
            "ratio_frozen_dense": median["frozen"] / median["dense"],
            "round_ratios": round_ratios,
            # the CPU time this process got per second of timing and per thread: near 1 on an idle
            # CPU, well below when another process shares the cores (on a GPU it says nothing)
            "cpu_share": cpu / (wall * torch.get_num_threads()), "device": device.type,
            "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "cpu_count": os.cpu_count()}


# --- the study -------------------------------------------------------------------------------


def run_name(arm: str, tokens: int, window: int | None, seed: int, task: str = "text") -> str:
    return f"{arm}{f'-w{window}' if window else ''}{'-topics' if task == TOPICS else ''}-{tokens}-seed{seed}"


def units(setting: Setting, corpus: str, data_dir: str | None, device: torch.device) -> list[Unit]:
    """The cost measurement, then one unit per run: main arms at every budget, the text control,
    the topic control."""
    # budgets and seeds are grids: a run reads its own tokens and seed (the control's budget,
    # max(budgets), is its tokens); the corpus's sha256, as results.json records it, is in every key
    data = {**asdict(setting), "corpus": corpus, "sha256": cached_splits(corpus, data_dir)["sha256"]}
    grid = ("budgets", "seeds")
    todo = [Unit("cost", measure_cost, (setting, device.type), run_key(data, grid))]
    plan = [(arm, tokens, None, corpus) for tokens in setting.budgets for arm in ARMS]
    plan += [(arm, setting.control_budget, setting.control_window, corpus) for arm in ARMS]
    plan += [(arm, setting.topic_tokens, setting.topic_window, TOPICS) for arm in ARMS]
    for arm, tokens, window, source in plan:
        for seed in setting.seeds:
            task = TOPICS if source == TOPICS else "text"
            todo.append(Unit(run_name(arm, tokens, window, seed, task), train_one,
                             (setting, arm, tokens, window, seed, source, data_dir, device.type),
                             run_key(data, grid, arm=arm, tokens=tokens, window=window, seed=seed, task=task),
                             compiles=True))
    return todo


def run(out: Path, quick: bool = False, data_dir: str | None = None, setting: Setting | None = None,
        device: str | torch.device = "auto", jobs: int = 1, shard=None,
        threads: int | None = None, compile: bool = False) -> dict:
    """Writes OUT/fast-slow/{results.json, report.md, *.png}; finished runs are kept in
    OUT/fast-slow/runs/ (an interrupted study resumes; shards add up). With ``shard`` it trains
    only that shard's units and returns a summary instead of writing the report."""
    setting = setting or (QUICK if quick else FULL)
    execution = Execution.make(device, jobs, shard, threads, compile)
    corpus = default_corpus(data_dir)
    study_dir = Path(out) / "fast-slow"
    started = time.perf_counter()
    cache = RunCache(study_dir / "runs", {**asdict(setting), "corpus": corpus})
    todo = units(setting, corpus, data_dir, execution.device)
    outcome = run_units(todo, cache, execution)
    if execution.shard is not None:
        return outcome.shard_summary(execution.shard, cache)
    cost = outcome.records["cost"]
    runs = [outcome.records[u.name] for u in todo if u.name != "cost"]
    theorem = fast_slow_theorem.tracking_study()
    results = {
        "study": "fast-slow",
        "mode": "quick" if quick else "full",
        "env": machine_header(execution.device),
        "execution": {"jobs": execution.jobs, "trained_on": cache.trained_on(),
                      "bf16": use_bf16(setting.bf16, execution.device)},
        **compile_fields(execution.compile, "every training run; not the cost unit, which times the eager "
                                            "training step of each arm (the claim on cost is about eager)"),
        "data": {"train": corpus, "tokenizer": "bytes", "sha256": {corpus: cached_splits(corpus, data_dir)["sha256"]}},
        "setting": asdict(setting),
        "claims": fast_slow_claims.claims(setting, runs, cost, theorem, topic_levels(setting)),
        "topic_levels": topic_levels(setting),
        "cost": cost,
        "theorem": theorem,
        "runs": runs,
        "runs_reused": outcome.reused,
        "seconds": time.perf_counter() - started,
    }
    write_outputs(study_dir, results, fast_slow_report.report(results, setting))
    fast_slow_report.plots(study_dir, setting, runs, theorem)
    return results
