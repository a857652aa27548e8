"""The small ViT with and without prompts: images/s of its forward and forward+backward at the size
the class-incremental study uses (ViTConfig's defaults: 32x32 grayscale, 4x4 patches, d_model 192,
6 blocks, 3 heads; a 100-class head), batch 64.

Modes (the prompt modules of routemem/layers/prompts.py at their defaults for this ViT):

- ``plain``: no prompts (sequential fine-tuning, linear probe, replay).
- ``l2p``: L2P, top 5 of a pool of 10 prompts of 5 tokens: 25 tokens inserted at the input and kept
  through every block (sequence 1 + 25 + 64), the head reading their mean.
- ``dualprompt``: DualPrompt, prefix keys/values of 5 tokens at block 0 (general) and blocks 1-2
  (expert, top 1 of 10); the sequence stays 65.
- ``coda``: CODA-Prompt (10 tasks, 100 components), prefixes of 4 keys / 4 values at blocks 0-2,
  each a weighted sum of the components.

Timed: one call of the prompt module on a fixed query [B, 192] plus the ViT's forward with its
prompts (``fwd``: under torch.no_grad), or that and the backward of the cross-entropy (plus the
module's auxiliary loss) into every ViT and prompt parameter (``fwd+bwd``: a training step without
the optimizer; all parameters trainable in every mode, so that the modes differ in prompts only).
Not timed: the query itself, which the prompt methods compute with one more forward of the frozen
backbone without prompts: that is the ``plain`` ``fwd`` row. Precision: bf16 autocast where the
device runs it natively (the Trainer's ``precision: auto``), else float32; rows record which.

Variants are built once and timed in interleaved rounds (``interleaved_runs``). ``info`` gives
images/s per mode and direction and each prompted mode's images/s over the plain ViT's.

Under ``--compile`` each mode's timed forward (prompt module and ViT, as above) runs through
``torch.compile(forward, fullgraph=True)``, compiled in an untimed first call per direction (its
seconds in ``info["compile_s"]``); a mode that does not compile gets skipped rows with the reason.

Targets (modest; the issue names none): a prompted ViT's fwd+bwd time at most ``SLACK`` (1.25)
times the plain ViT's time scaled by the share of tokens the prompts add to every block's
sequence: 1.25 x 90/65 for L2P, 1.25 for the prefix methods (their prefixes lengthen the keys of
3 of 6 blocks only; the sequence is unchanged). Prompting should cost what its tokens cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from routemem.bench.common import (
    FWD,
    FWD_BWD,
    all_met,
    backward_memory,
    first_call,
    interleaved_runs,
    maybe_compile,
    memory_measure,
    row,
    target,
    timed_call,
)
from routemem.layers.prompts import L2P, CodaPrompt, DualPrompt
from routemem.models.vit import VisionTransformer, ViTConfig
from routemem.train.evaluate import autocast_context
from routemem.train.trainer import bf16_supported

SHAPE = {"B": 64, "image_size": 32, "patch": 4, "in_chans": 1, "d_model": 192, "n_layer": 6, "n_head": 3}
N_CLASSES = 100
CODA_TASKS = 10
MODES = ("plain", "l2p", "dualprompt", "coda")
SLACK = 1.25  # a prompted ViT's time over the plain ViT's, per unit of token share: see the docstring
ROUNDS = {"quick": 1, "full": 3}
REPEATS = {"quick": 2, "full": 3, "full_cuda": 10}
SEED = 0


def vit_config() -> ViTConfig:
    return ViTConfig(image_size=SHAPE["image_size"], patch_size=SHAPE["patch"], in_chans=SHAPE["in_chans"],
                     d_model=SHAPE["d_model"], n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"],
                     mlp_hidden=4 * SHAPE["d_model"], n_classes=N_CLASSES)


def _prompt_module(mode: str):
    D, L = SHAPE["d_model"], SHAPE["n_layer"]
    if mode == "l2p":
        return L2P(D)
    if mode == "dualprompt":
        return DualPrompt(D, L)
    if mode == "coda":
        return CodaPrompt(D, L, n_tasks=CODA_TASKS)
    return None


def build(device: torch.device) -> tuple[VisionTransformer, dict]:
    """The ViT and each mode's prompt module (None for plain), seeded, on ``device``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        vit = VisionTransformer(vit_config()).to(device).train()
        modules = {mode: _prompt_module(mode) for mode in MODES}
    return vit, {mode: m.to(device).train() if m is not None else None for mode, m in modules.items()}


def make_inputs(device: torch.device) -> dict:
    g = torch.Generator().manual_seed(SEED)
    B, S, C = SHAPE["B"], SHAPE["image_size"], SHAPE["in_chans"]
    return {"images": torch.rand(B, C, S, S, generator=g).to(device),
            "labels": torch.randint(0, N_CLASSES, (B,), generator=g).to(device),
            "query": F.normalize(torch.randn(B, SHAPE["d_model"], generator=g), dim=-1).to(device)}


def step_fn(vit: VisionTransformer, module, inputs: dict, bf16: bool):
    """-> forward() returning the loss (prompts built from the query inside it), as timed."""
    device = inputs["images"].device

    def forward() -> torch.Tensor:
        with autocast_context(device, bf16):
            if module is None:
                logits, aux = vit(inputs["images"]), 0.0
            else:
                prompts, aux = module(inputs["query"])
                logits = vit(inputs["images"], prompts=prompts, pool=module.pool)
        return F.cross_entropy(logits.float(), inputs["labels"]) + aux

    return forward


def sequence_lengths(vit: VisionTransformer, module, inputs: dict) -> dict:
    """Per block: the tokens it runs on (queries) and the keys its attention sees."""
    with torch.no_grad():
        prompts = module(inputs["query"])[0] if module is not None else {}
    n = 1 + vit.config.n_patches
    queries, keys, kept = [], [], 0
    for layer in range(vit.config.n_layer):
        kind, value = prompts.get(layer, (None, None))
        if kind == "input":
            kept += value.shape[-2]
        queries.append(n + kept)
        keys.append(n + kept + (value[0].shape[-2] if kind == "prefix" else 0))
    return {"queries": queries, "keys": keys}


def run(quick: bool = False, device: torch.device | str = "cpu", compile: bool = False) -> dict:
    device = torch.device(device)
    key = "quick" if quick else "full"
    repeats = REPEATS["full_cuda" if device.type == "cuda" and not quick else key]
    bf16 = bf16_supported(device)
    precision = "bf16" if bf16 else "fp32"
    vit, modules = build(device)
    inputs = make_inputs(device)
    directions = ((FWD, False), (FWD_BWD, True))
    forwards, params = {}, {}
    for mode, module in modules.items():
        forwards[mode] = maybe_compile(step_fn(vit, module, inputs, bf16), compile)
        params[mode] = list(vit.parameters()) + (list(module.parameters()) if module is not None else [])
    skipped, compile_s = {}, {}  # (mode, direction) -> why, for a mode that does not compile
    if compile:  # the compiles, untimed, before the rounds
        for mode in MODES:
            for d, backward in directions:
                took, why = first_call(timed_call(forwards[mode], backward, params[mode]), device)
                if why:
                    skipped[mode, d] = why
                else:
                    compile_s[f"{mode}/{d}"] = took
    runs = interleaved_runs({(mode, d): (timed_call(forwards[mode], backward, params[mode]), repeats)
                             for mode in MODES for d, backward in directions if (mode, d) not in skipped},
                            ROUNDS[key], device=device)
    rows = []
    for mode in MODES:
        names = {"op": "vit", "mode": mode, "precision": precision, **SHAPE}
        for direction, backward in directions:
            if (mode, direction) in skipped:
                rows.append(row(names, direction, skipped=skipped[mode, direction]))
                continue
            memory = backward_memory(timed_call(forwards[mode], backward, params[mode]), forwards[mode],
                                     [inputs["images"], *params[mode]], backward, device)
            rows.append(row(names, direction, runs[mode, direction], memory, memory_measure(device)))

    B = SHAPE["B"]
    images_per_s = {mode: {} for mode in MODES}
    for r in rows:
        if not r.get("skipped"):
            images_per_s[r["mode"]][r["direction"]] = B / r["median_s"]
    lengths = {mode: sequence_lengths(vit, modules[mode], inputs) for mode in MODES}
    factors = {mode: sum(lengths[mode]["queries"]) / sum(lengths["plain"]["queries"]) for mode in MODES}
    info = {
        "setup": {**SHAPE, "n_classes": N_CLASSES, "precision": precision, "modes": list(MODES),
                  "timed": "the prompt module on a fixed query, then the ViT with its prompts; fwd under "
                           "torch.no_grad; fwd+bwd backpropagates the cross-entropy (plus the module's aux "
                           "loss) into every ViT and prompt parameter (no optimizer step); the query's own "
                           "forward (frozen backbone, no prompts) is the plain fwd row, not included",
                  "rounds": ROUNDS[key], "repeats_per_round": repeats, "warmup": 1},
        "images_per_s": images_per_s,
        "ratio_vs_plain": {mode: {d: images_per_s[mode][d] / images_per_s["plain"][d] for d in images_per_s[mode]
                                  if d in images_per_s["plain"]}
                           for mode in MODES if mode != "plain"},
        "sequence": lengths,
        "token_factor": factors,
        "prompt_params": {mode: sum(p.numel() for p in m.parameters() if p.requires_grad)
                          for mode, m in modules.items() if m is not None},
        "vit_params": vit.num_params(),
    }
    if compile:
        info["compile_s"] = compile_s
    targets = [target(rows, f"{mode}_over_plain_fwd_bwd",
                      f"the ViT with {mode} prompts at most {SLACK:g} x {factors[mode]:.3f} (the share of tokens "
                      "its prompts add to every block) the fwd+bwd time of the plain ViT",
                      {"op": "vit", "mode": mode, "direction": FWD_BWD},
                      {"op": "vit", "mode": "plain", "direction": FWD_BWD},
                      round(SLACK * factors[mode], 3), "<=")
               for mode in MODES if mode != "plain"]
    return {"rows": rows, "targets": targets, "all_targets_met": all_met(targets), "info": info}
