"""Palimpsa's op: ``metaplastic_attention`` chunk and fused vs its reference loop, against
scalar-decay GLA (chunk), the gated delta rule (chunk) and softmax attention (SDPA) at the same
shapes; time and memory, forward alone and forward+backward.

Targets (issue 3), fwd+bwd at T=1024: the chunk form is >= 10x faster than the reference, and
palimpsa is within 3x of GLA's chunk form. The GLA ratio is judged for both fast forms, each its own
target: the PyTorch chunk form and the fused C++ kernel (what ``mode="auto"``, the layers' default,
runs on a CPU; skipped on a GPU). Memory on a CPU: bytes autograd saves for backward, with the chunk
form's recomputing backward (mode "chunk") and with plain autograd through it ("chunk_autograd").

Under ``--compile`` every op call is timed through ``torch.compile(fn, fullgraph=True)`` (each length
compiled afresh, static shapes; the compile is the untimed warm-up, its seconds in
``info["compile_s"]``), except the reference loop, which compiling would unroll T steps of (skipped,
so the reference target is not judged); a form that does not compile is a skipped row with the reason.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from routemem.bench.common import (
    CPU_ONLY_FUSED,
    FWD,
    FWD_BWD,
    all_met,
    backward_memory,
    first_call,
    maybe_compile,
    median_seconds,
    memory_measure,
    row,
    target,
    timed_call,
)
from routemem.ops import gated_delta_rule, gated_linear_attention, metaplastic_attention
from routemem.ops.metaplastic import fused
from routemem.ops.metaplastic.chunk import metaplastic_chunk

SHAPE = {"B": 2, "H": 4, "Dk": 32, "Dv": 32}
SPEEDUP_TARGET = 10.0  # chunk over reference, fwd+bwd at T=1024
GLA_RATIO_TARGET = 3.0  # palimpsa time / gla chunk time, fwd+bwd at T=1024
TARGET_T = 1024  # the length the targets are checked at
# a GPU runs the long lengths in well under a second, so its full run adds one
LENGTHS = {"quick": (256, 1024), "full": (256, 1024, 4096), "full_cuda": (256, 1024, 4096, 16384)}
REFERENCE_MAX_T = 1024  # the reference loop is skipped beyond this (minutes; its trend is clear)
NOT_COMPILED_REFERENCE = "not compiled: torch.compile would unroll the reference loop's T steps (minutes)"


def make_inputs(T: int, seed: int = 0, dtype=torch.float32,
                device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Inputs as the palimpsa layer makes them: unit-norm q, k; beta in (0, 1); decays near 1.
    Drawn on the CPU (the same numbers on every device), then moved."""
    g = torch.Generator().manual_seed(seed)
    B, H, Dk, Dv = SHAPE["B"], SHAPE["H"], SHAPE["Dk"], SHAPE["Dv"]
    q = F.normalize(torch.randn(B, T, H, Dk, generator=g, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, T, H, Dk, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, Dv, generator=g, dtype=dtype)
    beta = torch.rand(B, T, H, Dv, generator=g, dtype=dtype)
    log_alpha = -0.1 * torch.rand(B, T, H, generator=g, dtype=dtype)
    gate = torch.rand(B, T, H, generator=g, dtype=dtype)
    inputs = {"q": q, "k": k, "v": v, "beta": beta, "log_alpha": log_alpha, "gate": gate}
    return {name: t.to(device) for name, t in inputs.items()}


def _variants(device: torch.device) -> list[tuple[str, str, object, str | None]]:
    """(op, mode, fn(**leaf tensors) -> output, reason it is skipped here or None), every variant timed."""
    prior = torch.ones(SHAPE["H"], device=device)
    scale = SHAPE["Dk"] ** -0.5
    if device.type != "cpu":
        fused_skip = CPU_ONLY_FUSED
    elif not fused.available():
        fused_skip = "the fused C++ kernel did not build here (no C++ compiler?)"
    else:
        fused_skip = None
    return [
        ("palimpsa", "reference", lambda q, k, v, beta, log_alpha, gate: metaplastic_attention(
            q, k, v, beta, log_alpha, mode="reference"), None),
        ("palimpsa", "chunk", lambda q, k, v, beta, log_alpha, gate: metaplastic_attention(
            q, k, v, beta, log_alpha, mode="chunk"), None),
        ("palimpsa", "chunk_autograd", lambda q, k, v, beta, log_alpha, gate: metaplastic_chunk(
            q, k, v, beta, log_alpha, prior, scale, None, False, 64, recompute=False)[0], None),
        ("palimpsa", "fused", lambda q, k, v, beta, log_alpha, gate: metaplastic_attention(
            q, k, v, beta, log_alpha, mode="fused"), fused_skip),
        ("gla", "chunk", lambda q, k, v, beta, log_alpha, gate: gated_linear_attention(
            q, k, v, log_alpha, mode="chunk"), None),
        ("gated_delta", "chunk", lambda q, k, v, beta, log_alpha, gate: gated_delta_rule(
            q, k, v, gate, log_alpha, mode="chunk"), None),
        ("sdpa", "causal", lambda q, k, v, beta, log_alpha, gate: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True), None),
    ]


def _call(fn, inputs: dict[str, torch.Tensor], backward: bool):
    """One forward (under no_grad) or forward+backward of ``fn`` on fresh leaves."""
    leaves = {name: t.detach().requires_grad_(backward) for name, t in inputs.items()}
    grad = None

    def backprop(out):
        nonlocal grad
        grad = torch.ones_like(out) if grad is None else grad  # made once, by the untimed warm-up call
        out.backward(grad)

    return timed_call(lambda: fn(**leaves), backward, leaves.values(), backprop)


def _memory(fn, inputs: dict[str, torch.Tensor], backward: bool, device: torch.device) -> int | None:
    leaves = {name: t.detach().requires_grad_() for name, t in inputs.items()}
    return backward_memory(_call(fn, inputs, backward), lambda: fn(**leaves), leaves.values(), backward, device)


def run(quick: bool = False, device: torch.device | str = "cpu", compile: bool = False) -> dict:
    device = torch.device(device)
    lengths = LENGTHS["quick" if quick else "full_cuda" if device.type == "cuda" else "full"]
    repeats = 3 if quick else 5
    rows, compile_s = [], {}
    for T in lengths:
        inputs = make_inputs(T, device=device)
        if compile:
            torch._dynamo.reset()  # this length compiles afresh: static shapes, no recompile limit
        for op, mode, fn, skip in _variants(device):
            if op == "palimpsa" and mode == "reference" and T > REFERENCE_MAX_T:
                skip = f"the reference loop is not timed beyond T={REFERENCE_MAX_T} (minutes; its trend is clear)"
            elif compile and mode == "reference":
                skip = NOT_COMPILED_REFERENCE
            fn = maybe_compile(fn, compile and not skip)
            reps = 1 if mode == "reference" and T >= 1024 else repeats
            names = {"op": op, "mode": mode, "T": T, **SHAPE}
            for direction, backward in ((FWD, False), (FWD_BWD, True)):
                why = skip
                if compile and not why:  # the compile, untimed; a form that does not compile is skipped
                    took, why = first_call(_call(fn, inputs, backward), device)
                    compile_s.update({} if why else {f"{op}/{mode}/{direction}/T{T}": took})
                if why:
                    rows.append(row(names, direction, skipped=why))
                    continue
                timed = median_seconds(_call(fn, inputs, backward), repeats=reps, warmup=1, device=device)
                rows.append(row(names, direction, timed["runs_s"], _memory(fn, inputs, backward, device),
                                memory_measure(device)))
    targets = _targets(rows)
    info = {"compile_s": compile_s} if compile else {}
    return {"rows": rows, "targets": targets, "all_targets_met": all_met(targets), "info": info}


def _targets(rows: list[dict]) -> list[dict]:
    def at(op, mode):
        return {"op": op, "mode": mode, "T": TARGET_T, "direction": FWD_BWD}

    return [
        target(rows, "palimpsa_chunk_speedup_over_reference",
               f"palimpsa's chunk form at least {SPEEDUP_TARGET:g}x faster than its reference loop "
               f"(fwd+bwd, T={TARGET_T}); ratio = reference time / chunk time",
               at("palimpsa", "reference"), at("palimpsa", "chunk"), SPEEDUP_TARGET, ">="),
        target(rows, "palimpsa_chunk_over_gla",
               f"palimpsa's chunk form at most {GLA_RATIO_TARGET:g}x the time of GLA's chunk form "
               f"(fwd+bwd, T={TARGET_T})",
               at("palimpsa", "chunk"), at("gla", "chunk"), GLA_RATIO_TARGET, "<="),
        target(rows, "palimpsa_fused_over_gla",
               f"palimpsa's fused C++ kernel at most {GLA_RATIO_TARGET:g}x the time of GLA's chunk form "
               f"(fwd+bwd, T={TARGET_T})",
               at("palimpsa", "fused"), at("gla", "chunk"), GLA_RATIO_TARGET, "<="),
    ]
