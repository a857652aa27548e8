"""The pretrain-then-adapt pipeline, shared by the APN study and absorption's router claim.

Stage 1 pretrains a byte-level language model on domain A with one FFN kind: the APN patch bank,
or a dense GELU FFN whose hidden width makes its parameter count equal. Stage 2 adapts it to
domain B for a fixed number of steps, one arm per choice of what trains:

    dense-global     every parameter of the dense model (the paper's baseline)
    apn-patches      only the patch parameters U, a, b of the APN model (the paper's method);
                     embeddings, attention, norms, prototypes and the code V stay frozen
    dense-ffn-only   only the dense FFNs                                   (our control)
    dense-lora       rank-r adapters on the dense FFNs, base frozen        (our control)
    apn-global       every parameter of the APN model                      (our control)

``Setting`` holds both stages' sizes; ``QUICK`` and ``FULL`` are the two the APN study runs, and
absorption borrows them for its APN runs. ``train_kind`` is one self-contained unit of work.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from routemem.data import ByteTokenizer, WindowSampler, load_corpus, load_splits
from routemem.errors import ConfigError, DataError, TrainingDiverged
from routemem.experiments.shared.common import use_bf16
from routemem.experiments.shared.runner import compiled
from routemem.layers import AttractorPatchFFN, LayerSpec
from routemem.layers.lora import LoRALinear, add_lora
from routemem.models import LMConfig, TransformerLM
from routemem.train.config import TrainConfig
from routemem.train.evaluate import evaluate
from routemem.train.supervised import fit_steps

ARMS = ("dense-global", "apn-patches", "dense-ffn-only", "dense-lora", "apn-global")
PAIRS = ("shakespeare:warandpeace", "pydocs:pycode")


@dataclass(frozen=True)
class Setting:
    d_model: int = 128
    n_layer: int = 2
    n_head: int = 4
    seq_len: int = 128
    batch_size: int = 32
    apn: dict = field(default_factory=lambda: {"n_patches": 64, "rank": 16, "top_k": 4, "tau": 0.1,
                                               "load_balance": 0.01})
    pretrain_steps: int = 2000
    pretrain_lr: float = 3e-3
    adapt_steps: int = 400
    adapt_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    seeds: tuple[int, ...] = (0, 1, 2)
    curve_points: int = 8  # evaluations along the adaptation
    curve_tokens: int = 8192  # tokens per curve evaluation (each of A-test, B-test)
    test_tokens: int = 65536  # tokens for the before/after and B-validation scores
    lora_rank: int = 16
    bf16: bool = True
    arms: tuple[str, ...] = ARMS


FULL = Setting()
QUICK = replace(FULL, d_model=64, batch_size=16, pretrain_steps=600, adapt_steps=150, adapt_lrs=(1e-3,),
                seeds=(0, 1), curve_points=5, curve_tokens=4096, test_tokens=16384,
                apn={"n_patches": 32, "rank": 8, "top_k": 4, "tau": 0.1, "load_balance": 0.01})


# --- data and models -------------------------------------------------------------------------


def default_pair(data_dir: str | None) -> str:
    """The paper's corpus when the data folder holds it, else the built-in pair (runs anywhere)."""
    try:
        load_corpus("shakespeare", data_dir)
        load_corpus("warandpeace", data_dir)
    except DataError:
        return "pydocs:pycode"
    return "shakespeare:warandpeace"


def load_domains(pair: str, data_dir: str | None) -> dict:
    """{"A": splits, "B": splits, "names": (a, b), "sha256": {...}} with one byte tokenizer, so
    both domains share a vocabulary."""
    names = pair.split(":")
    if len(names) != 2 or not all(names):
        raise ConfigError(f"pair must be 'A:B' (e.g. {' or '.join(PAIRS)}), got {pair!r}")
    tokenizer = ByteTokenizer()
    corpora = [load_corpus(name, data_dir) for name in names]
    return {"A": load_splits(corpora[0], tokenizer), "B": load_splits(corpora[1], tokenizer),
            "names": tuple(names), "sha256": {c.name: c.sha256 for c in corpora}}


@functools.lru_cache(maxsize=2)
def cached_domains(pair: str, data_dir: str | None) -> dict:
    """``load_domains``, once per process (a worker runs several units on the same pair)."""
    return load_domains(pair, data_dir)


def model_config(setting: Setting, kind: str) -> LMConfig:
    """kind "apn", or "dense" with the hidden width that matches the APN FFN's parameter count."""
    base = LMConfig(vocab_size=256, n_layer=setting.n_layer, d_model=setting.d_model, n_head=setting.n_head,
                    max_seq_len=setting.seq_len)
    if kind == "apn":
        return replace(base, ffn="apn", ffn_kwargs=dict(setting.apn))
    return replace(base, ffn="dense", ffn_kwargs={"hidden": matched_dense_hidden(setting)})


def matched_dense_hidden(setting: Setting) -> int:
    spec = LayerSpec(d_model=setting.d_model, n_head=setting.n_head, max_seq_len=setting.seq_len)
    apn_params = sum(p.numel() for p in AttractorPatchFFN(spec, **setting.apn).parameters())
    return round(apn_params / (2 * setting.d_model))  # the dense FFN has 2 * d * hidden weights


def ffn_size(model: TransformerLM) -> dict:
    """Total FFN parameters and those one token uses (all of them for a dense FFN)."""
    total = sum(p.numel() for block in model.blocks for p in block.ffn.parameters())
    active = sum(block.ffn.active_params_per_token() if isinstance(block.ffn, AttractorPatchFFN)
                 else sum(p.numel() for p in block.ffn.parameters()) for block in model.blocks)
    return {"params": model.num_params(include_embeddings=False), "ffn_params": total,
            "ffn_active_per_token": active}


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def perplexity(model, tokens: np.ndarray, setting: Setting, max_tokens: int) -> float:
    device = device_of(model)
    return evaluate(model, tokens, seq_len=setting.seq_len, batch_size=setting.batch_size,
                    max_tokens=max_tokens, device=device, bf16=use_bf16(setting.bf16, device))["ppl"]


def train_config(setting: Setting, steps: int, lr: float, seed: int, weight_decay: float,
                 compile: bool = False) -> TrainConfig:
    return TrainConfig(batch_size=setting.batch_size, max_steps=steps, lr=lr, min_lr=lr / 10,
                       warmup_steps=max(1, steps // 20), weight_decay=weight_decay, seed=seed, compile=compile)


# --- stage 1 ---------------------------------------------------------------------------------


def pretrain(setting: Setting, kind: str, domains: dict, seed: int,
             device: str | torch.device = "cpu", compile: bool = False) -> tuple[TransformerLM, dict]:
    """The model is built on the CPU (the same initial weights on every device), then moved.
    ``compile``: train through torch.compile (``reproduce --compile``); evaluations stay eager."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    device = torch.device(device)
    model = TransformerLM(model_config(setting, kind)).to(device)
    sampler = WindowSampler(domains["A"]["train"], setting.seq_len, seed=seed, name="domain A train")
    cfg = train_config(setting, setting.pretrain_steps, setting.pretrain_lr, seed, weight_decay=0.1,
                       compile=compile)
    losses = fit_steps(compiled(model, cfg.compile), lambda step: sampler.get_batch(step, setting.batch_size), cfg,
                       bf16=use_bf16(setting.bf16, device), progress=f"pretrain {kind} seed={seed}")
    record = {"arm": f"pretrain-{kind}", "seed": seed, "lr": setting.pretrain_lr, **ffn_size(model),
              "metrics": {"a_test_ppl": perplexity(model, domains["A"]["test"], setting, setting.test_tokens),
                          "b_test_ppl": perplexity(model, domains["B"]["test"], setting, setting.test_tokens),
                          "final_train_loss": float(np.mean(losses[-20:])),
                          # the forgetting curves' step 0, on the same token budget as their other points
                          "a_curve": perplexity(model, domains["A"]["test"], setting, setting.curve_tokens),
                          "b_curve": perplexity(model, domains["B"]["test"], setting, setting.curve_tokens)},
              "seconds": time.perf_counter() - start}
    if kind == "apn":
        record["patch_usage"] = patch_usage(model, domains, setting)
    return model, record


@torch.no_grad()
def patch_usage(model: TransformerLM, domains: dict, setting: Setting) -> dict:
    """Per layer: the share of routing slots each patch gets on A-test and on B-test, and their
    overlap sum_i min(a_i, b_i) (1 = the same patches equally used, 0 = disjoint)."""
    layers = [block.ffn for block in model.blocks]
    usage = {}
    for domain in ("A", "B"):
        for ffn in layers:
            ffn.usage = torch.zeros(ffn.n_patches, device=device_of(model))
        perplexity(model, domains[domain]["test"], setting, setting.test_tokens)
        usage[domain] = [(ffn.usage / ffn.usage.sum()).tolist() for ffn in layers]
        for ffn in layers:
            ffn.usage = None
    overlap = [float(np.minimum(a, b).sum()) for a, b in zip(usage["A"], usage["B"])]
    return {"A": usage["A"], "B": usage["B"], "overlap": overlap}


# --- stage 2 ---------------------------------------------------------------------------------


def prepare_arm(base: TransformerLM, arm: str, setting: Setting) -> TransformerLM:
    """A copy of the pretrained model with exactly the arm's parameters trainable."""
    model = copy.deepcopy(base)
    if arm in ("dense-global", "apn-global"):
        return model
    model.requires_grad_(False)
    for block in model.blocks:
        if arm == "apn-patches":
            block.ffn.update_prototypes = False
            for param in block.ffn.patch_parameters():
                param.requires_grad_(True)
        elif arm == "dense-ffn-only":
            block.ffn.requires_grad_(True)
        elif arm == "dense-lora":
            add_lora(block.ffn, setting.lora_rank)  # adapters are created trainable
        else:
            raise ConfigError(f"unknown arm {arm!r} (known: {', '.join(ARMS)})")
    return model


def effective_parameters(model: TransformerLM) -> dict[str, torch.Tensor]:
    """The pretrained model's parameters as this model now computes them: LoRA folded in."""
    params = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" not in name}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            params[f"{name}.base.weight"] = module.merged_weight().detach()
    return {name.replace(".base.", "."): value for name, value in params.items()}


def changed(before: dict[str, torch.Tensor], model: TransformerLM) -> dict:
    """Fraction of the pretrained parameters whose value changed, and for APN the fraction of
    patches (U_i, any layer) that changed."""
    after = effective_parameters(model)
    n_changed = sum(int((after[name] != value).sum()) for name, value in before.items())
    out = {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "changed_fraction": n_changed / sum(v.numel() for v in before.values())}
    ups = [name for name in before if name.endswith("ffn.up") and before[name].dim() == 3]
    if ups:
        moved = [(after[n] != before[n]).flatten(1).any(1).float().mean().item() for n in ups]
        out["patches_changed_fraction"] = float(np.mean(moved))
    return out


def train_arm(base: TransformerLM, arm: str, lr: float, seed: int, domains: dict, setting: Setting,
              after_step=None, compile: bool = False) -> TransformerLM:
    """The arm's copy of the pretrained model, trained on B-train for ``adapt_steps`` steps (the
    batches depend on the seed only, so every arm and rate sees the same data)."""
    torch.manual_seed(seed)
    model = prepare_arm(base, arm, setting)
    sampler = WindowSampler(domains["B"]["train"], setting.seq_len, seed=1000 + seed, name="domain B train")
    cfg = train_config(setting, setting.adapt_steps, lr, seed, weight_decay=0.0, compile=compile)
    fit_steps(compiled(model, cfg.compile), lambda step: sampler.get_batch(step, setting.batch_size), cfg,
              bf16=use_bf16(setting.bf16, device_of(model)),
              progress=f"{arm} lr={lr:g} seed={seed}", after_step=lambda step: after_step(model, step)
              if after_step else None)
    return model


def adapt(base: TransformerLM, arm: str, lr: float, seed: int, domains: dict, setting: Setting,
          before: dict, compile: bool = False) -> dict:
    """One (arm, lr, seed) adaptation run with its forgetting curve; ``before`` is the pretrained
    model's metrics (the curve's step 0)."""
    start = time.perf_counter()
    marks = {round(i * setting.adapt_steps / setting.curve_points) for i in range(1, setting.curve_points + 1)}
    curve = [{"step": 0, "a_ppl": before["a_curve"], "b_ppl": before["b_curve"]}]

    def after_step(model: TransformerLM, step: int) -> None:
        if step + 1 in marks:
            curve.append({"step": step + 1,
                          "a_ppl": perplexity(model, domains["A"]["test"], setting, setting.curve_tokens),
                          "b_ppl": perplexity(model, domains["B"]["test"], setting, setting.curve_tokens)})

    record = {"arm": arm, "seed": seed, "lr": lr}
    try:
        model = train_arm(base, arm, lr, seed, domains, setting, after_step, compile)
    except TrainingDiverged as err:  # a too-large rate in the grid: recorded, never chosen
        return {**record, "diverged": str(err), "curve": curve, "seconds": time.perf_counter() - start}
    return {**record, **changed(effective_parameters(base), model),
            "val": {"b_val_ppl": perplexity(model, domains["B"]["val"], setting, setting.test_tokens)},
            "metrics": {"a_test_ppl": perplexity(model, domains["A"]["test"], setting, setting.test_tokens),
                        "b_test_ppl": perplexity(model, domains["B"]["test"], setting, setting.test_tokens)},
            "curve": curve, "seconds": time.perf_counter() - start}


def train_kind(setting: Setting, kind: str, pair: str, data_dir: str | None, seed: int,
               device: str = "cpu", compile: bool = False) -> list[dict]:
    """One unit of work: pretrain ``kind`` ("dense" or "apn") on A with ``seed``, then adapt that
    model with each of the setting's arms of this kind at every rate. Its run records.
    ``compile``: every training (pretraining and adaptations) through torch.compile."""
    domains = cached_domains(pair, data_dir)
    model, record = pretrain(setting, kind, domains, seed, device, compile)
    runs = [record]
    for arm in setting.arms:
        if arm.split("-")[0] == kind:
            runs += [adapt(model, arm, lr, seed, domains, setting, record["metrics"], compile)
                     for lr in setting.adapt_lrs]
    return runs
