"""Attractor Patch Network FFN: the layer in ``grouped`` mode (and the ``fused`` C++ kernel, the
default on a CPU) against ``reference`` mode, and against a dense GELU FFN with the same total
parameter count; time and memory, forward alone and forward+backward, on the device asked for.

Targets (the issue's ``routemem bench apn``), at 8192 tokens, d=128, K=64, r=16, top_k=4, each
for fwd and for fwd+bwd:

- grouped >= 5x faster than reference. ``mode`` selects only how the patch mixture is computed
  (routing is the same code in both), so this compares ``patch_mixture`` in its two modes on one
  fixed routing; the whole layer's ratio (diluted by the shared routing) is reported beside it.
- the layer in grouped mode within 1.5x of a dense GELU FFN with the same total parameter count:
  the whole ``AttractorPatchFFN`` forward in train mode (routing, the patch mixture, the
  load-balance aux loss and the router statistics: what a training step runs).

The same two thresholds are judged for the fused kernel as their own targets (skipped, not failed,
where it does not run: on a GPU, or without a C++ compiler), and for ``grouped_mm`` (torch's jagged
grouped matmul, ops/apn/grouped_mm.py); ``info["grouped_mm_ratios"]`` gives its time over grouped's
and over fused's for every pair of rows (below 1: grouped_mm is faster).
fwd+bwd backpropagates a fixed random output gradient (plus the aux loss) into the input and every
parameter. The plain 4d-hidden dense FFN is timed too, as a reference point outside the targets.

``compile=True`` (``routemem bench apn --compile``) times every form under
``torch.compile(fullgraph=True)``, compiled by one untimed call in each direction before timing; a
form that does not compile is a skipped row whose reason is the error, and the others still run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from routemem.bench.common import (
    CPU_ONLY_FUSED,
    FWD,
    FWD_BWD,
    all_met,
    backward_memory,
    find_row,
    first_call,
    interleaved_runs,
    maybe_compile,
    memory_measure,
    row,
    target,
    timed_call,
)
from routemem.layers.apn import AttractorPatchFFN
from routemem.layers.ffn import DenseFFN
from routemem.layers.registry import LayerSpec
from routemem.ops.apn import fused, patch_mixture, route
from routemem.ops.apn.grouped import TILE

TOKENS = 8192
D = 128
K = 64
R = 16
TOP_K = 4
TAU = 0.1
LOAD_BALANCE = 0.01  # the layer's default aux-loss weight
SPEEDUP_TARGET = 5.0  # reference time / grouped time, at least
DENSE_RATIO_TARGET = 1.5  # grouped time / same-parameter dense FFN time, at most
SKEW_MAX_LOAD = 3.0  # the skewed-routing variant: busiest patch's expected load / mean load
# Timing: ROUNDS rounds, each timing every variant in turn (so drift in machine load hits all of
# them alike), REPEATS timed calls per variant per round after one warm-up; the median is over
# all rounds' runs. The reference is slow, so it gets fewer repeats.
ROUNDS = {"quick": 1, "full": 5}
REPEATS = {"quick": 2, "full": 7}
REFERENCE_REPEATS = {"quick": 1, "full": 3}
SEED = 0


def _spec() -> LayerSpec:
    return LayerSpec(d_model=D, n_head=1, max_seq_len=TOKENS)


def make_input(device: torch.device, seed: int = SEED) -> torch.Tensor:
    """[TOKENS, D] unit-scale tokens, as a block's pre-FFN norm hands them over."""
    g = torch.Generator().manual_seed(seed)
    return F.layer_norm(torch.randn(TOKENS, D, generator=g), (D,)).to(device)


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _build(device: torch.device) -> dict:
    """The modules: the APN layer in each mode (identical weights) and the two dense FFNs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        grouped = AttractorPatchFFN(_spec(), n_patches=K, rank=R, top_k=TOP_K, tau=TAU,
                                    load_balance=LOAD_BALANCE, mode="grouped")
        reference = AttractorPatchFFN(_spec(), n_patches=K, rank=R, top_k=TOP_K, tau=TAU,
                                      load_balance=LOAD_BALANCE, mode="reference")
        reference.load_state_dict(grouped.state_dict())
        fused_layer = AttractorPatchFFN(_spec(), n_patches=K, rank=R, top_k=TOP_K, tau=TAU,
                                        load_balance=LOAD_BALANCE, mode="fused")
        fused_layer.load_state_dict(grouped.state_dict())
        grouped_mm = AttractorPatchFFN(_spec(), n_patches=K, rank=R, top_k=TOP_K, tau=TAU,
                                       load_balance=LOAD_BALANCE, mode="grouped_mm")
        grouped_mm.load_state_dict(grouped.state_dict())
        apn_params = _n_params(grouped)
        hidden = max(1, round(apn_params / (2 * D)))  # DenseFFN: D*h + h*D weights, no bias
        dense = DenseFFN(_spec(), hidden=hidden)
        dense_4d = DenseFFN(_spec(), hidden=4 * D)
    modules = {"grouped": grouped, "reference": reference, "grouped_mm": grouped_mm, "dense": dense,
               "dense_4d": dense_4d}
    if device.type == "cpu" and fused.available():  # the compiled kernel: CPU, needs a C++ compiler
        modules["fused"] = fused_layer
    for module in modules.values():
        module.to(device).train()
    return modules


def skewed_indices(device: torch.device, seed: int = SEED) -> torch.Tensor:
    """[TOKENS, TOP_K] distinct patches per token, drawn with probabilities falling geometrically
    from patch 0 to patch K-1, the fall chosen so patch 0 expects SKEW_MAX_LOAD x the mean load."""
    # p_i proportional to q^i with p_0 = SKEW_MAX_LOAD / K, i.e. sum_{i<K} q^i = K / SKEW_MAX_LOAD
    target, low, high = K / SKEW_MAX_LOAD, 0.0, 1.0
    for _ in range(60):  # bisection: the sum grows with q
        q = (low + high) / 2
        low, high = (q, high) if (1 - q**K) / (1 - q) < target else (low, q)
    probs = q ** torch.arange(K, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(probs.expand(TOKENS, K), TOP_K, generator=g).to(device)


LAYER, OP, DENSE = "apn_layer", "patch_mixture", "dense_ffn"  # a row's "op"
NEAR_UNIFORM, SKEWED = "near_uniform", "skewed"  # a row's "routing"


def _fused_skip(device: torch.device) -> str | None:
    if device.type != "cpu":
        return CPU_ONLY_FUSED
    return None if fused.available() else "the fused C++ kernel did not build here (no C++ compiler?)"


def _variants(modules: dict, z: torch.Tensor, compile: bool = False) -> dict:
    """(op, mode, routing) -> (description, forward(x) -> (out, aux loss or None), parameters to
    clear, repeats key, reason it is skipped here or None). ``compile``: each forward is wrapped
    in torch.compile(fullgraph=True) (not compiled yet: ``_compile_or_skip``)."""

    def layer(module):
        def forward(x):
            out = module(x)
            return out, getattr(module, "aux_loss", None)
        return maybe_compile(forward, compile)

    apn = modules["grouped"]
    with torch.no_grad():
        routing = route(z, apn.prototypes, TOP_K, apn.tau)
    indices = routing.indices
    weights = routing.weights.detach().requires_grad_()
    op_params = [apn.code, apn.up, apn.gate_scale, apn.gate_bias]

    skewed = skewed_indices(z.device)

    def op(mode, idx=indices):
        def forward(x):
            return patch_mixture(x, idx, weights, *op_params, mode=mode), None
        return maybe_compile(forward, compile)

    def params(name):
        return list(modules[name].parameters()) if name in modules else []

    fused_skip = _fused_skip(z.device)
    skew = f"busiest patch {SKEW_MAX_LOAD:g}x the mean load, as in early training"
    return {
        (LAYER, "grouped", NEAR_UNIFORM): (
            "AttractorPatchFFN, mode=grouped, train mode (routing + mixture + aux loss + stats)",
            layer(apn), params("grouped"), "repeats", None),
        (LAYER, "reference", NEAR_UNIFORM): (
            "AttractorPatchFFN, mode=reference, train mode, same weights",
            layer(modules["reference"]), params("reference"), "reference", None),
        (LAYER, "fused", NEAR_UNIFORM): (
            "AttractorPatchFFN, mode=fused (C++ kernel), train mode, same weights",
            layer(modules["fused"]) if "fused" in modules else None, params("fused"), "repeats", fused_skip),
        (LAYER, "grouped_mm", NEAR_UNIFORM): (
            "AttractorPatchFFN, mode=grouped_mm (torch grouped_mm), train mode, same weights",
            layer(modules["grouped_mm"]), params("grouped_mm"), "repeats", None),
        (DENSE, "same_params", None): (
            "DenseFFN (GELU, no bias) with hidden sized to the APN's total parameters",
            layer(modules["dense"]), params("dense"), "repeats", None),
        (DENSE, "4d_hidden", None): (
            "DenseFFN (GELU, no bias), 4d hidden", layer(modules["dense_4d"]), params("dense_4d"), "repeats", None),
        (OP, "grouped", NEAR_UNIFORM): (
            "patch_mixture only, mode=grouped, on a fixed routing (grads into V, U, a, b, weights)",
            op("grouped"), op_params + [weights], "repeats", None),
        (OP, "reference", NEAR_UNIFORM): (
            "patch_mixture only, mode=reference, on the same fixed routing",
            op("reference"), op_params + [weights], "reference", None),
        (OP, "fused", NEAR_UNIFORM): (
            "patch_mixture only, mode=fused, on the same fixed routing",
            op("fused"), op_params + [weights], "repeats", fused_skip),
        (OP, "grouped_mm", NEAR_UNIFORM): (
            "patch_mixture only, mode=grouped_mm, on the same fixed routing",
            op("grouped_mm"), op_params + [weights], "repeats", None),
        (OP, "grouped", SKEWED): (
            f"patch_mixture only, mode=grouped, skewed routing ({skew})",
            op("grouped", skewed), op_params + [weights], "repeats", None),
        (OP, "reference", SKEWED): (
            "patch_mixture only, mode=reference, the same skewed routing",
            op("reference", skewed), op_params + [weights], "reference", None),
        (OP, "fused", SKEWED): (
            "patch_mixture only, mode=fused, the same skewed routing",
            op("fused", skewed), op_params + [weights], "repeats", fused_skip),
        (OP, "grouped_mm", SKEWED): (
            "patch_mixture only, mode=grouped_mm, the same skewed routing",
            op("grouped_mm", skewed), op_params + [weights], "repeats", None),
    }


def _once(forward, x: torch.Tensor, params: list, backward: bool, grad: torch.Tensor):
    leaf = x.detach().requires_grad_(backward)

    def backprop(out_aux):
        out, aux = out_aux
        tensors, grads = [out], [grad]
        if aux is not None:
            tensors.append(aux)
            grads.append(torch.ones_like(aux))
        torch.autograd.backward(tensors, grads)

    return timed_call(lambda: forward(leaf), backward, [leaf, *params], backprop)


def _memory(forward, x: torch.Tensor, params: list, backward: bool, grad: torch.Tensor) -> int | None:
    leaf = x.detach().requires_grad_()
    return backward_memory(_once(forward, x, params, backward, grad), lambda: forward(leaf), [leaf, *params],
                           backward, x.device)


def _routing_info(apn: AttractorPatchFFN, z: torch.Tensor) -> dict:
    with torch.no_grad():
        indices = route(z, apn.prototypes, TOP_K, apn.tau).indices
    counts = torch.bincount(indices.flatten(), minlength=K).cpu()
    assignments = indices.numel()
    rows = int(((counts + TILE - 1) // TILE).sum()) * TILE  # the grouped buffer: whole tiles per patch
    load = counts.double() / assignments
    return {
        "routing": "random prototypes, near-uniform load",
        "assignments": assignments,
        "mean_load": assignments / K,
        "max_load": int(counts.max()),
        "min_load": int(counts.min()),
        "tile_rows": TILE,
        "buffer_rows": rows,
        "padding_fraction": 1.0 - assignments / rows if rows else 0.0,
        "load_entropy": float(-(load * load.clamp_min(1e-12).log()).sum()),
        "max_load_entropy": math.log(K),
        "unused_patches": int((counts == 0).sum()),
    }


def _compile_or_skip(variants: dict, z: torch.Tensor, grad: torch.Tensor) -> dict:
    """Compile each measured variant by one call in each direction (dynamo keys its graphs on the
    grad mode, so fwd and fwd+bwd compile apart). One that fails is skipped, the error its reason:
    a form that does not trace yet must not stop the others being timed."""
    checked = {}
    for name, (desc, forward, params, rep, skip) in variants.items():
        for backward in (False, True):
            if skip is None:
                _, skip = first_call(_once(forward, z, params, backward, grad), z.device)
        checked[name] = (desc, forward, params, rep, skip)
    return checked


def run(quick: bool = False, device: torch.device | str = "cpu", compile: bool = False) -> dict:
    device = torch.device(device)
    key = "quick" if quick else "full"
    z = make_input(device)
    grad = torch.randn(TOKENS, D, generator=torch.Generator().manual_seed(SEED + 1)).to(device)
    modules = _build(device)
    variants = _variants(modules, z, compile)
    if compile:
        variants = _compile_or_skip(variants, z, grad)
    measured = {name: v for name, v in variants.items() if v[4] is None}
    repeats = {"repeats": REPEATS[key], "reference": REFERENCE_REPEATS[key]}
    directions = ((FWD, False), (FWD_BWD, True))

    runs = interleaved_runs({(name, direction): (_once(forward, z, params, backward, grad), repeats[rep])
                             for name, (_, forward, params, rep, _) in measured.items()
                             for direction, backward in directions}, ROUNDS[key], device=device)

    shape = {"tokens": TOKENS, "d": D, "n_patches": K, "rank": R, "top_k": TOP_K}
    rows = []
    for (op, mode, routing), (_, forward, params, _, skip) in variants.items():
        names = {"op": op, "mode": mode, "routing": routing, **shape}
        for direction, backward in directions:
            if skip:
                rows.append(row(names, direction, skipped=skip))
                continue
            rows.append(row(names, direction, runs[(op, mode, routing), direction],
                            _memory(forward, z, params, backward, grad), memory_measure(device)))

    with torch.no_grad():
        want = modules["reference"](z)
        diff = {mode: float((modules[mode](z) - want).abs().max()) for mode in ("grouped", "grouped_mm")}
    apn = modules["grouped"]
    info = {
        "setup": {"tau": TAU, "load_balance": LOAD_BALANCE, "dtype": str(z.dtype),
                  "timed": "layer forward in train mode incl. load-balance aux loss and router stats; "
                           "fwd under torch.no_grad; fwd+bwd backpropagates a fixed random output "
                           "gradient (+ the aux loss) into the input and all parameters",
                  "rounds": ROUNDS[key], "repeats_per_round": repeats["repeats"],
                  "reference_repeats_per_round": repeats["reference"], "warmup": 1,
                  "compile": compile},
        "variants": {f"{op}/{mode}" + (f"/{routing}" if routing else ""): desc
                     for (op, mode, routing), (desc, *_) in variants.items()},
        "routing": _routing_info(apn, z),
        "params": {
            "apn_total": _n_params(apn),
            "apn_active_per_token": apn.active_params_per_token(),
            "dense_same_params_hidden": modules["dense"].up.out_features,
            "dense_same_params_total": _n_params(modules["dense"]),
            "dense_4d_hidden": modules["dense_4d"].up.out_features,
            "dense_4d_total": _n_params(modules["dense_4d"]),
        },
        "max_abs_diff_grouped_vs_reference": diff["grouped"],
        "max_abs_diff_grouped_mm_vs_reference": diff["grouped_mm"],
        "grouped_mm_ratios": _grouped_mm_ratios(rows),
    }
    targets = _targets(rows)
    return {"rows": rows, "targets": targets, "all_targets_met": all_met(targets), "info": info}


def _targets(rows: list[dict]) -> list[dict]:
    """The issue's two thresholds, for fwd and for fwd+bwd, for the grouped form; the same for the
    fused kernel and for grouped_mm, as their own entries (skipped where they do not run)."""
    found = []
    for mode in ("grouped", "fused", "grouped_mm"):
        for direction in (FWD, FWD_BWD):
            tag = direction.replace("+", "_")  # fwd | fwd_bwd, for a plain identifier
            found.append(target(
                rows, f"patch_mixture_{mode}_speedup_over_reference_{tag}",
                f"patch_mixture in mode={mode} at least {SPEEDUP_TARGET:g}x faster than mode=reference on "
                f"the same routing ({direction}); ratio = reference time / {mode} time",
                {"op": OP, "mode": "reference", "routing": NEAR_UNIFORM, "direction": direction},
                {"op": OP, "mode": mode, "routing": NEAR_UNIFORM, "direction": direction},
                SPEEDUP_TARGET, ">="))
            found.append(target(
                rows, f"apn_layer_{mode}_over_dense_{tag}",
                f"the whole APN layer in mode={mode} at most {DENSE_RATIO_TARGET:g}x the time of a dense "
                f"GELU FFN with the same total parameter count ({direction})",
                {"op": LAYER, "mode": mode, "direction": direction},
                {"op": DENSE, "mode": "same_params", "direction": direction},
                DENSE_RATIO_TARGET, "<="))
    return found


def _grouped_mm_ratios(rows: list[dict]) -> dict:
    """grouped_mm's median time over grouped's and over fused's for each (op, routing, direction)
    both were timed in: "patch_mixture/near_uniform/fwd: grouped_mm/fused" -> ratio (None where
    either row is skipped)."""
    ratios = {}
    for r in rows:
        if r["mode"] != "grouped_mm":
            continue
        for other in ("grouped", "fused"):
            base = find_row(rows, op=r["op"], mode=other, routing=r["routing"], direction=r["direction"])
            measured = base is not None and r["median_s"] is not None and base["median_s"] is not None
            ratios[f"{r['op']}/{r['routing']}/{r['direction']}: grouped_mm/{other}"] = (
                r["median_s"] / base["median_s"] if measured else None)
    return ratios
