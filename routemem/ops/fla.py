"""``mode="fla"``: our scalar-decay GLA (Mamba2's SSD) and gated delta rule on flash-linear-attention's
tuned Triton chunk kernels, on CUDA, where the optional package ``flash-linear-attention`` imports.

fla computes the same recurrences; what differs is bookkeeping, mapped here:

- layout: both [B, T, H, D] (fla's default, ``head_first=False`` in versions that still have it);
- the decay: our ``log_alpha`` [B, T, H] is fla's ``g`` (a log decay, one per head and step);
- the delta rule's write strength: our ``beta`` [B, T, H] is fla's ``beta``;
- the scale: passed explicitly (both default to Dk ** -0.5);
- the state: ours is S [B, H, Dv, Dk] (o = S q), fla's is its transpose [B, H, Dk, Dv].

fla's kernels need a GPU (they do not run in Triton's interpreter), so this mapping is tested on
CUDA only (``tests/test_ops_fla.py``, cuda-marked), against our references. Until that check has
passed on a GPU, ``mode="auto"`` does not pick fla: ask for it by name.
"""

from __future__ import annotations

import importlib.util

import torch

MISSING = "mode='fla' needs flash-linear-attention (pip install flash-linear-attention) and CUDA tensors"


def available() -> bool:
    return importlib.util.find_spec("fla") is not None


def _check(q: torch.Tensor) -> None:
    if q.device.type != "cuda" or not available():
        raise ValueError(f"{MISSING}; the inputs are on {q.device}" + ("" if available() else ", fla is not installed"))


def _fla_state(state: torch.Tensor | None) -> torch.Tensor | None:
    return None if state is None else state.transpose(-1, -2).contiguous()


def gla_fla(q, k, v, log_alpha, scale, initial_state):
    """Inputs checked by ``gated_linear_attention``. Returns (o, final state [B, H, Dv, Dk])."""
    _check(q)
    from fla.ops.simple_gla import chunk_simple_gla

    o, final = chunk_simple_gla(q, k, v, g=log_alpha, scale=scale, initial_state=_fla_state(initial_state),
                                output_final_state=True)
    return o, final.transpose(-1, -2).to(q.dtype)


def delta_rule_fla(q, k, v, beta, log_alpha, scale, initial_state):
    """Inputs checked by ``gated_delta_rule`` (k L2-normalised). Returns (o, final state [B, H, Dv, Dk])."""
    _check(q)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    o, final = chunk_gated_delta_rule(q, k, v, g=log_alpha, beta=beta, scale=scale,
                                      initial_state=_fla_state(initial_state), output_final_state=True)
    return o, final.transpose(-1, -2).to(q.dtype)
