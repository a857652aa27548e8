"""Palimpsa's op: ``metaplastic_attention`` chunk and fused vs its reference loop, against
scalar-decay GLA (chunk) and softmax attention (SDPA) at the same shapes; time and memory held for
backward.

Targets (issue 3): at T=1024 fwd+bwd the chunk form is >= 10x faster than the reference, and
palimpsa is within 3x of GLA's chunk form. The ratio to GLA is reported for both fast forms: the
PyTorch chunk form and the fused C++ kernel (what ``mode="auto"``, the layers' default, runs on a
CPU). Memory: bytes saved for backward by autograd, with the chunk form's recomputing backward
(default) and with plain autograd through the chunk form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from routemem.bench.common import median_seconds, saved_bytes
from routemem.ops import gated_delta_rule, gated_linear_attention, metaplastic_attention
from routemem.ops.metaplastic import fused
from routemem.ops.metaplastic.chunk import metaplastic_chunk

SHAPE = {"B": 2, "H": 4, "Dk": 32, "Dv": 32}
SPEEDUP_TARGET = 10.0  # chunk over reference, fwd+bwd at T=1024
GLA_RATIO_TARGET = 3.0  # palimpsa time / gla chunk time, fwd+bwd at T=1024
TARGET_T = 1024  # the length the targets are checked at
LENGTHS = {"quick": (256, 1024), "full": (256, 1024, 4096)}
REFERENCE_MAX_T = 1024  # the reference loop is skipped beyond this (minutes; its trend is clear)


def make_inputs(T: int, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Inputs as the palimpsa layer makes them: unit-norm q, k; beta in (0, 1); decays near 1."""
    g = torch.Generator().manual_seed(seed)
    B, H, Dk, Dv = SHAPE["B"], SHAPE["H"], SHAPE["Dk"], SHAPE["Dv"]
    q = F.normalize(torch.randn(B, T, H, Dk, generator=g, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, T, H, Dk, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, Dv, generator=g, dtype=dtype)
    beta = torch.rand(B, T, H, Dv, generator=g, dtype=dtype)
    log_alpha = -0.1 * torch.rand(B, T, H, generator=g, dtype=dtype)
    gate = torch.rand(B, T, H, generator=g, dtype=dtype)
    return {"q": q, "k": k, "v": v, "beta": beta, "log_alpha": log_alpha, "gate": gate}


def _callables(inputs: dict[str, torch.Tensor]) -> dict:
    """name -> fn(**leaf tensors) -> output, for every variant timed."""
    prior = torch.ones(SHAPE["H"])
    scale = SHAPE["Dk"] ** -0.5
    variants = {
        "palimpsa_reference": lambda q, k, v, beta, log_alpha, gate: metaplastic_attention(
            q, k, v, beta, log_alpha, mode="reference"),
        "palimpsa_chunk": lambda q, k, v, beta, log_alpha, gate: metaplastic_attention(
            q, k, v, beta, log_alpha, mode="chunk"),
        "palimpsa_chunk_autograd": lambda q, k, v, beta, log_alpha, gate: metaplastic_chunk(
            q, k, v, beta, log_alpha, prior, scale, None, False, 64, recompute=False)[0],
        "gla_chunk": lambda q, k, v, beta, log_alpha, gate: gated_linear_attention(
            q, k, v, log_alpha, mode="chunk"),
        "gated_delta_chunk": lambda q, k, v, beta, log_alpha, gate: gated_delta_rule(
            q, k, v, gate, log_alpha, mode="chunk"),
        "sdpa_causal": lambda q, k, v, beta, log_alpha, gate: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True),
    }
    if fused.available():  # the compiled kernel needs a C++ compiler on this machine
        variants["palimpsa_fused"] = lambda q, k, v, beta, log_alpha, gate: metaplastic_attention(
            q, k, v, beta, log_alpha, mode="fused")
    return variants


def saved_bytes_of(fn, inputs: dict[str, torch.Tensor]) -> int:
    """Bytes autograd keeps for backward during one forward of ``fn``, inputs excluded."""
    leaves = {name: t.detach().requires_grad_() for name, t in inputs.items()}
    return saved_bytes(lambda: fn(**leaves), leaves.values())


def _time(fn, inputs: dict[str, torch.Tensor], backward: bool, repeats: int) -> float:
    leaves = {name: t.detach().requires_grad_(backward) for name, t in inputs.items()}
    grad = None

    def once():
        nonlocal grad
        if not backward:
            with torch.no_grad():
                return fn(**leaves)
        out = fn(**leaves)
        grad = torch.ones_like(out) if grad is None else grad
        out.backward(grad)
        for t in leaves.values():
            t.grad = None

    return median_seconds(once, repeats=repeats, warmup=1)["median_s"]


def run(quick: bool = False) -> dict:
    lengths = LENGTHS["quick" if quick else "full"]
    repeats = 3 if quick else 5
    rows = []
    for T in lengths:
        inputs = make_inputs(T)
        for name, fn in _callables(inputs).items():
            if name == "palimpsa_reference" and T > REFERENCE_MAX_T:
                continue
            reps = 1 if name == "palimpsa_reference" and T >= 1024 else repeats
            row = {"op": name, "T": T, **SHAPE,
                   "fwd_s": _time(fn, inputs, backward=False, repeats=reps),
                   "fwd_bwd_s": _time(fn, inputs, backward=True, repeats=reps),
                   "saved_for_backward_bytes": saved_bytes_of(fn, inputs)}
            if torch.cuda.is_available():
                row["cuda_peak_bytes"] = _cuda_peak(fn, inputs)
            rows.append(row)
    return {"shape": SHAPE, "rows": rows, **_summary(rows)}


def _cuda_peak(fn, inputs) -> int:  # pragma: no cover - exercised only on a GPU machine
    leaves = {n: t.detach().cuda().requires_grad_() for n, t in inputs.items()}
    torch.cuda.reset_peak_memory_stats()
    fn(**leaves).sum().backward()
    return torch.cuda.max_memory_allocated()


def _summary(rows: list[dict]) -> dict:
    def get(op, T, key):
        return next((r[key] for r in rows if r["op"] == op and r["T"] == T), None)

    speedup = get("palimpsa_reference", TARGET_T, "fwd_bwd_s") / get("palimpsa_chunk", TARGET_T, "fwd_bwd_s")
    gla = get("gla_chunk", TARGET_T, "fwd_bwd_s")
    chunk_ratio = get("palimpsa_chunk", TARGET_T, "fwd_bwd_s") / gla
    fused_s = get("palimpsa_fused", TARGET_T, "fwd_bwd_s")
    fused_ratio = None if fused_s is None else fused_s / gla
    memory = {T: {"recompute": get("palimpsa_chunk", T, "saved_for_backward_bytes"),
                  "autograd": get("palimpsa_chunk_autograd", T, "saved_for_backward_bytes")}
              for T in sorted({r["T"] for r in rows})}
    return {
        "target_T": TARGET_T,
        "speedup_chunk_over_reference_fwd_bwd": speedup,
        "ratio_palimpsa_over_gla_fwd_bwd": chunk_ratio,  # the PyTorch chunk form
        "ratio_palimpsa_fused_over_gla_fwd_bwd": fused_ratio,  # None: no C++ compiler here
        "saved_for_backward_bytes_palimpsa_chunk": memory,
        "targets": {"speedup_min": SPEEDUP_TARGET, "gla_ratio_max": GLA_RATIO_TARGET},
        "pass": {"speedup": speedup >= SPEEDUP_TARGET,
                 "gla_ratio_chunk": chunk_ratio <= GLA_RATIO_TARGET,
                 "gla_ratio_fused": fused_ratio is not None and fused_ratio <= GLA_RATIO_TARGET},
    }
