"""Routing absorption: ``routemem reproduce absorption [--quick]`` (papers/routing_absorption.md).

Byte-level language models on tiny Shakespeare (pydocs when ``$ROUTEMEM_DATA`` lacks it), the same
size, token budget, batches and initial weights per seed for every arm; they differ only in how
attention picks its keys (the ``gated_sparse`` mixer, layers/gated_sparse.py):

    dense         plain causal attention (the ``attention`` mixer)
    soft-learned  logits += log sigmoid(s / tau), s the learned low-rank gate
    soft-random   the same gate frozen at its random init
    hard          each query keeps its k best keys by the learned gate (zero gradient to the gate)
    mask-random   no gate; each training step attends through random masks of k keys per query
                  with probability ``mask_p``; evaluated dense

and at block granularity (query blocks choose key blocks, layers/block_routing.py), at the token
arms' sparsity: a query reads at most (top_k_blocks + 1) * block_size = k keys:

    block-moba         MoBA's parameter-free gate (q . k block means), hard top-k blocks
    block-soft-learned logits += log sigmoid(s / tau) per key block, s the learned gate on block means
    block-soft-random  the same gate frozen at its random init
    block-hard         the learned block gate, hard top-k blocks (zero gradient to the gate)
    block-own          a control, added after the first full run showed every block arm beating
                       dense: the own block only (top_k_blocks 0), a block-local window with no
                       routing. No claim reads it; the report shows it beside the others.

Claim 1 compares dense and the soft arms; claim 2 reads the gate's gradient norm, logged at every
step of the soft-learned and hard arms; claim 3 distils a fresh gate onto the frozen dense and hard
models (experiments/absorption/distill.py) and deploys it; claim 4 evaluates mask-random dense;
claim 5 measures the dense model's attention concentration per layer. Claims B1-B4 ask the same at
block granularity (claims.py): learned vs random block gate, moba against dense, a post-hoc block
gate distilled onto the dense and the block-hard models, and block concentration. Claim 6 tests the paper's
link to Mixture-of-Experts on our own router: APN with learned vs frozen random prototypes,
pretrained and adapted with the APN study's pipeline (experiments/shared/adaptation.py). The rules are in
experiments/absorption/claims.py, fixed before the full run.

Units of work (``--jobs`` / ``--shard``): one per (arm, seed) for the soft, mask-random, block-moba,
block-soft and block-own arms; one per seed for dense + hard + block-hard and the four distillations (they
need those models' weights, kept in memory); one per (router, seed) for APN.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from routemem.errors import TrainingDiverged
from routemem.experiments.absorption import claims as absorption_claims
from routemem.experiments.absorption import distill as absorption_distill
from routemem.experiments.absorption import report as absorption_report
from routemem.experiments.absorption.arms import ARMS, BLOCK_ARMS, LEARNED_GATES
from routemem.experiments.shared import adaptation
from routemem.experiments.shared.cache import RunCache, run_key
from routemem.experiments.shared.common import compile_fields, use_bf16, write_outputs
from routemem.experiments.shared.runner import Execution, Unit, compiled, run_units
from routemem.experiments.shared.text_lm import cached_splits, default_corpus, text_task
from routemem.machine import machine_header
from routemem.models import LMConfig, TransformerLM
from routemem.train.config import TrainConfig
from routemem.train.supervised import fit_steps

ROUTERS = ("learned", "random")  # claim 6: APN prototypes trained (sgd) or frozen at init


@dataclass(frozen=True)
class Setting:
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    seq_len: int = 256
    k: int = 32  # keys per query: T / 8, the paper's 64 of 512
    # Block arms: at most (top_k_blocks + 1) * block_size = k keys per query, as the token arms.
    block_size: int = 16
    top_k_blocks: int = 1
    rank: int = 16  # the gate's rank r
    tau: float = 1.0
    # Random masks on a share of the training steps, dense on the rest: "stochastic" randomisation.
    # With p = 1 the model would never see dense attention before being evaluated with it.
    mask_p: float = 0.5
    batch_size: int = 16
    lr: float = 3e-3
    # Training tokens per run: ~245 steps of 16 x 256. The full study (15 LM runs, 6 distillations,
    # 6 APN pipelines) took 30 min on the 2-core VM with --jobs 2; at 2M tokens one seed's dense and
    # hard runs alone took 23 min on the busy machine, ~4 h projected for the study.
    tokens: int = 1_000_000
    seeds: tuple[int, ...] = (0, 1, 2)
    val_tokens: int = 65_536
    curve_points: int = 8
    curve_tokens: int = 8_192
    # Distillation: only the gate trains, KL(dense attention row || softmax of the gate's scores).
    distill_steps: int = 150
    distill_lr: float = 3e-3
    distill_batch: int = 8
    # Claim 6 runs the APN study's pretrain + adapt pipeline with these changes to its setting.
    apn_pretrain_steps: int = 600
    apn_adapt_steps: int = 200
    apn_adapt_lr: float = 1e-3
    apn: dict = field(default_factory=lambda: dict(adaptation.FULL.apn))
    bf16: bool = True

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.seq_len))


FULL = Setting()
QUICK = replace(FULL, d_model=64, n_layer=2, seq_len=128, k=16, block_size=8, rank=8, batch_size=8, tokens=150_000, seeds=(0, 1),
                val_tokens=16_384, curve_points=4, curve_tokens=4_096, distill_steps=60, apn_pretrain_steps=150,
                apn_adapt_steps=60, apn=dict(adaptation.QUICK.apn))


# --- models ----------------------------------------------------------------------------------


def model_config(setting: Setting, arm: str) -> LMConfig:
    """The arm's LM: every arm has the same embeddings, FFNs, norms and q/k/v/out projections."""
    base = LMConfig(vocab_size=256, n_layer=setting.n_layer, d_model=setting.d_model, n_head=setting.n_head,
                    max_seq_len=setting.seq_len)
    if arm == "dense":
        return base
    if arm in BLOCK_ARMS:
        blocks = {"granularity": "block", "block_size": setting.block_size, "top_k_blocks": setting.top_k_blocks,
                  "rank": setting.rank, "tau": setting.tau}
        kwargs = {"block-moba": {"gate": "moba", "mode": "hard"},
                  "block-soft-learned": {"gate": "learned", "mode": "soft"},
                  "block-soft-random": {"gate": "random", "mode": "soft"},
                  "block-hard": {"gate": "learned", "mode": "hard"},
                  "block-own": {"gate": "moba", "mode": "hard", "top_k_blocks": 0}}[arm]
        return replace(base, mixer="gated_sparse", mixer_kwargs={**blocks, **kwargs})
    gated = {"k": setting.k, "rank": setting.rank, "tau": setting.tau, "hard_form": "mask"}
    kwargs = {"soft-learned": {"gate": "learned", "mode": "soft"},
              "soft-random": {"gate": "random", "mode": "soft"},
              "hard": {"gate": "learned", "mode": "hard"},
              "mask-random": {"gate": "none", "mask_randomisation": setting.mask_p, "deploy": "dense"}}[arm]
    return replace(base, mixer="gated_sparse", mixer_kwargs={**gated, **kwargs})


def build_model(setting: Setting, arm: str, seed: int) -> TransformerLM:
    """The arm's model, its shared weights (embeddings, qkv, out, FFNs, norms) equal to the dense
    arm's for the same seed: the gate's own weights are drawn between them otherwise, shifting
    every later draw."""
    torch.manual_seed(seed)
    model = TransformerLM(model_config(setting, arm))
    if arm != "dense":
        torch.manual_seed(seed)
        dense = TransformerLM(model_config(setting, "dense"))
        missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
        if unexpected or any(".gate_" not in name for name in missing):
            raise RuntimeError(f"arm {arm!r} does not share the dense arm's weights: {missing} {unexpected}")
    return model


def gate_parameters(model: TransformerLM) -> list[torch.nn.Parameter]:
    return [p for b in model.blocks if hasattr(b.mixer, "gate_q") for p in (b.mixer.gate_q.weight, b.mixer.gate_k.weight)]


def gate_grad_norm(model: TransformerLM) -> tuple[float, int]:
    """The gate's gradient norm after a backward pass (a parameter with no gradient counts as 0),
    and how many gate parameters had a gradient tensor at all."""
    grads = [p.grad for p in gate_parameters(model) if p.grad is not None]
    norm = float(torch.stack([g.float().norm() for g in grads]).norm()) if grads else 0.0
    return norm, len(grads)


# --- one LM run ------------------------------------------------------------------------------


def train_lm(setting: Setting, arm: str, seed: int, corpus: str, data_dir: str | None,
             device: str = "cpu", compile: bool = False) -> tuple[TransformerLM, dict]:
    """Train one arm; returns the model and its record: val loss along training and at the end
    (for gated arms, deployed with each of the gate, dense attention and the oracle), and the
    gate's gradient norm at every step where the gate is learned. ``compile``: train through
    torch.compile (``reproduce --compile``; evaluations and probes stay eager)."""
    start = time.perf_counter()
    device = torch.device(device)
    task = text_task(setting, corpus, data_dir, seed)
    model = build_model(setting, arm, seed).to(device)
    steps, bf16 = setting.steps, use_bf16(setting.bf16, device)
    cfg = TrainConfig(batch_size=setting.batch_size, max_steps=steps, lr=setting.lr, min_lr=setting.lr / 10,
                      warmup_steps=max(1, steps // 20), weight_decay=0.1, seed=seed, compile=compile)
    curve_at = {round(steps * (i + 1) / setting.curve_points) - 1 for i in range(setting.curve_points)}
    learned_gate = arm in LEARNED_GATES
    record = {"arm": arm, "seed": seed, "steps": steps, "batch_tokens": setting.batch_size * setting.seq_len,
              "params": model.num_params(include_embeddings=False), "curve": {"step": [], "val_loss": []},
              "gate_grad": {"norm": [], "with_grad": []} if learned_gate else None}

    def after_backward(step: int) -> None:
        if learned_gate:
            norm, with_grad = gate_grad_norm(model)
            record["gate_grad"]["norm"].append(norm)
            record["gate_grad"]["with_grad"].append(with_grad)

    def after_step(step: int) -> None:
        if step in curve_at:
            record["curve"]["step"].append(step + 1)
            record["curve"]["val_loss"].append(task.val_loss(model, setting.curve_tokens, bf16))

    train_start = time.perf_counter()
    try:
        losses = fit_steps(compiled(model, cfg.compile), task.batch_at, cfg, bf16=bf16,
                           progress=f"{arm} seed={seed}", after_step=after_step, after_backward=after_backward)
    except TrainingDiverged as err:
        return model, {**record, "diverged": str(err), "seconds": time.perf_counter() - start}
    record["train_seconds"] = time.perf_counter() - train_start
    deployed = {}
    paths = {"dense": ("dense",), "mask-random": ("dense", "oracle")}.get(arm, ("gate", "dense", "oracle"))
    for path in paths:
        absorption_distill.set_deploy(model, path)
        deployed[path] = task.val_loss(model, setting.val_tokens, bf16)
    absorption_distill.set_deploy(model, "dense" if arm == "mask-random" else "gate")
    probe = task.probe.to(device)
    record.update(
        metrics={"val_loss": deployed["dense" if arm in ("dense", "mask-random") else "gate"],
                 "deployed": deployed, "train_loss_final": float(np.mean(losses[-20:]))},
        concentration=absorption_distill.concentration(model, probe, setting.k),
        block_concentration=absorption_distill.block_concentration(model, probe, setting.block_size))
    if arm in BLOCK_ARMS:
        record["block_map"] = absorption_distill.selected_blocks(model, probe)
    record["seconds"] = time.perf_counter() - start
    return model, record


# --- units -----------------------------------------------------------------------------------


def lm_unit(setting: Setting, arm: str, seed: int, corpus: str, data_dir: str | None, device: str,
            compile: bool = False) -> list[dict]:
    return [train_lm(setting, arm, seed, corpus, data_dir, device, compile)[1]]


# distillations: (source arm, the student's arm: a fresh learned hard gate of that granularity)
DISTILLATIONS = (("dense", "hard"), ("hard", "hard"), ("dense", "block-hard"), ("block-hard", "block-hard"))


def coadaptation_unit(setting: Setting, seed: int, corpus: str, data_dir: str | None, device: str,
                      compile: bool = False) -> list[dict]:
    """Dense, hard and block-hard models of one seed, then a token gate distilled onto the dense and
    hard models (claim 3) and a block gate onto the dense and block-hard models (claim B3).
    ``compile`` applies to the models' training; the distillation stays eager."""
    records, models = [], {}
    for arm in ("dense", "hard", "block-hard"):
        models[arm], record = train_lm(setting, arm, seed, corpus, data_dir, device, compile)
        records.append(record)
    if any("diverged" in r for r in records):
        return records
    task = text_task(setting, corpus, data_dir, seed)
    for source, student in DISTILLATIONS:
        records.append(absorption_distill.distill(setting, models[source], source, model_config(setting, student),
                                                  task, seed))
    return records


def apn_setting(setting: Setting, router: str) -> adaptation.Setting:
    """The APN study's setting (its model, data pair and adaptation) at this study's budget, with
    the prototypes trained (``learned``) or frozen at their random init (``random``)."""
    base = adaptation.QUICK if setting.d_model < adaptation.FULL.d_model else adaptation.FULL
    update = {"learned": "sgd", "random": "frozen"}[router]
    return replace(base, apn={**setting.apn, "prototype_update": update}, pretrain_steps=setting.apn_pretrain_steps,
                   adapt_steps=setting.apn_adapt_steps, adapt_lrs=(setting.apn_adapt_lr,), arms=("apn-patches",),
                   seeds=setting.seeds, bf16=setting.bf16)


def apn_unit(setting: Setting, router: str, seed: int, pair: str, data_dir: str | None, device: str,
             compile: bool = False) -> list[dict]:
    runs = adaptation.train_kind(apn_setting(setting, router), "apn", pair, data_dir, seed, device, compile)
    return [{**run, "router": router, "study_arm": f"apn-{router}"} for run in runs]


def units(setting: Setting, corpus: str, pair: str, data_dir: str | None, device: torch.device) -> list[Unit]:
    # only the seeds are a grid; the data's names and sha256 (as results.json records them) are in every key
    sha = {corpus: cached_splits(corpus, data_dir)["sha256"], **adaptation.cached_domains(pair, data_dir)["sha256"]}
    data = {**asdict(setting), "corpus": corpus, "pair": pair, "sha256": sha}
    todo = []
    for seed in setting.seeds:
        todo.append(Unit(f"dense-hard-distill-seed{seed}", coadaptation_unit, (setting, seed, corpus, data_dir, device.type),
                         run_key(data, ("seeds",), arms=["dense", "hard", "block-hard"], seed=seed), compiles=True))
        for arm in ("soft-learned", "soft-random", "mask-random", "block-moba", "block-soft-learned", "block-soft-random",
                    "block-own"):
            todo.append(Unit(f"{arm}-seed{seed}", lm_unit, (setting, arm, seed, corpus, data_dir, device.type),
                             run_key(data, ("seeds",), arm=arm, seed=seed), compiles=True))
        for router in ROUTERS:
            todo.append(Unit(f"apn-{router}-seed{seed}", apn_unit, (setting, router, seed, pair, data_dir, device.type),
                             run_key(data, ("seeds",), router=router, seed=seed), compiles=True))
    return todo


def run(out: Path, quick: bool = False, data_dir: str | None = None, setting: Setting | None = None,
        device: str | torch.device = "auto", jobs: int = 1, shard=None,
        threads: int | None = None, compile: bool = False) -> dict:
    """Writes OUT/absorption/{results.json, report.md, *.png}; finished units are kept in
    OUT/absorption/runs/ (an interrupted study resumes; shards add up). With ``shard`` it trains
    only that shard's units and returns a summary instead of writing the report."""
    setting = setting or (QUICK if quick else FULL)
    execution = Execution.make(device, jobs, shard, threads, compile)
    corpus, pair = default_corpus(data_dir), adaptation.default_pair(data_dir)
    study_dir = Path(out) / "absorption"
    started = time.perf_counter()
    cache = RunCache(study_dir / "runs", {**asdict(setting), "corpus": corpus, "pair": pair})
    todo = units(setting, corpus, pair, data_dir, execution.device)
    outcome = run_units(todo, cache, execution)
    if execution.shard is not None:
        return outcome.shard_summary(execution.shard, cache)
    records = [r for u in todo for r in outcome.records[u.name]]
    lm_runs = [r for r in records if r.get("arm") in ARMS]
    distilled = [r for r in records if r.get("kind") == "distill"]
    apn_runs = [r for r in records if "router" in r]
    sha = {corpus: cached_splits(corpus, data_dir)["sha256"], **adaptation.cached_domains(pair, data_dir)["sha256"]}
    results = {
        "study": "absorption",
        "mode": "quick" if quick else "full",
        "env": machine_header(execution.device),
        "execution": {"jobs": execution.jobs, "trained_on": cache.trained_on(),
                      "bf16": use_bf16(setting.bf16, execution.device)},
        **compile_fields(execution.compile, "every LM and APN training run; not the gate distillation "
                                            "(claim 3), which stays eager"),
        "data": {"train": corpus, "apn_pair": pair, "tokenizer": "bytes", "sha256": sha},
        "setting": asdict(setting),
        "claims": absorption_claims.claims(setting, lm_runs, distilled, apn_runs),
        "runs": lm_runs,
        "distilled": distilled,
        "apn_runs": apn_runs,
        "runs_reused": outcome.reused,
        "seconds": time.perf_counter() - started,
    }
    write_outputs(study_dir, results, absorption_report.report(results, setting))
    absorption_report.plots(study_dir, setting, lm_runs, distilled)
    return results
