"""flash-linear-attention (fla) for the special cases: our scalar-decay GLA (Mamba2's SSD) and gated
delta rule on fla's tuned Triton chunk kernels, on CUDA, where the optional package imports
(``pip install routemem[gpu]``). ``mode="fla"`` asks for it; ``mode="auto"`` picks it when
``dispatches(q)`` holds (CUDA tensors and fla importable), and our chunk forms everywhere else.

fla computes the same recurrences; what differs is bookkeeping, mapped here:

- layout: both [B, T, H, D] (fla's default);
- the decay: our ``log_alpha`` [B, T, H] is fla's ``g`` (a natural-log decay, one per head and step);
- the delta rule's write strength: our ``beta`` [B, T, H] is fla's ``beta``;
- the scale: passed explicitly (both default to Dk ** -0.5);
- the state: ours is S [B, H, Dv, Dk] (o = S q), fla's is its transpose [B, H, Dk, Dv].

fla's kernels need a GPU (they do not run in Triton's interpreter). The mapping is tested twice:
on the CPU against fla's own plain-PyTorch references (``fla.ops.*.naive``, swapped in for the
kernels through ``KERNELS``), and on CUDA with the real kernels (``tests/test_ops_fla.py``).
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

MISSING = "mode='fla' needs flash-linear-attention (pip install flash-linear-attention) and CUDA tensors"

# op -> (fla module, function); a test swaps these for fla's naive references to check the mapping
KERNELS = {
    "gla": ("fla.ops.simple_gla", "chunk_simple_gla"),
    "gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
}
DEVICES = ("cuda",)  # where fla's kernels run (the CPU mapping test widens this)


@torch.compiler.assume_constant_result  # a file-system lookup dynamo cannot trace; fixed per process
def available() -> bool:
    return importlib.util.find_spec("fla") is not None


def dispatches(q: torch.Tensor) -> bool:
    """Whether ``mode="auto"`` sends ``q``'s call to fla."""
    return q.device.type in DEVICES and available()


def _kernel(op: str, q: torch.Tensor):
    if not dispatches(q):
        raise ValueError(f"{MISSING}; the inputs are on {q.device}" + ("" if available() else ", fla is not installed"))
    module, name = KERNELS[op]
    return getattr(importlib.import_module(module), name)


def _fla_state(state: torch.Tensor | None) -> torch.Tensor | None:
    return None if state is None else state.transpose(-1, -2).contiguous()


def gla_fla(q, k, v, log_alpha, scale, initial_state):
    """Inputs checked by ``gated_linear_attention``. Returns (o, final state [B, H, Dv, Dk])."""
    kernel = _kernel("gla", q)
    o, final = kernel(q, k, v, g=log_alpha, scale=scale, initial_state=_fla_state(initial_state),
                      output_final_state=True)
    return o.to(q.dtype), final.transpose(-1, -2).to(q.dtype)


def delta_rule_fla(q, k, v, beta, log_alpha, scale, initial_state):
    """Inputs checked by ``gated_delta_rule`` (k L2-normalised). Returns (o, final state [B, H, Dv, Dk])."""
    kernel = _kernel("gated_delta_rule", q)
    o, final = kernel(q, k, v, g=log_alpha, beta=beta, scale=scale, initial_state=_fla_state(initial_state),
                      output_final_state=True)
    return o.to(q.dtype), final.transpose(-1, -2).to(q.dtype)
