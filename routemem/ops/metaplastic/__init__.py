"""Palimpsa's Bayesian-metaplastic attention (palimpsa.md), per head, elementwise on [Dv, Dk]:

    I_t  = alpha_t I_{t-1} + (1 - alpha_t) I_prior + beta_t (outer) k_t^2
    mu_t = (alpha_t I_{t-1} * mu_{t-1} + v_t (outer) k_t) / I_t
    o_t  = scale * mu_t q_t

Each memory cell's plasticity (1 / I) falls as evidence (beta k^2) for it accumulates and returns
to the prior as alpha forgets. beta = 0 keeps I = I_prior: plain scalar-decay linear attention.
"""

from __future__ import annotations

import importlib.util

import torch

from routemem.ops.checks import (
    check_chunk_size,
    check_mode,
    check_qkv,
    checking_values,
    expect_log_decay,
    expect_range,
    expect_same_dtype,
    expect_shape,
)
from routemem.ops.metaplastic import fused
from routemem.ops.metaplastic.chunk import metaplastic_chunk
from routemem.ops.metaplastic.fused import metaplastic_fused
from routemem.ops.metaplastic.reference import metaplastic_reference

# fused: the compiled CPU kernel (fused.py); triton: the Triton scan (triton.py: CUDA, or the CPU
# under TRITON_INTERPRET=1); auto: triton on CUDA where Triton imports, fused where it applies (CPU,
# float32/64, the kernel compiled), else chunk.
MODES = ("reference", "chunk", "fused", "triton", "auto")


def _auto_mode(q: torch.Tensor) -> str:
    if q.device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "fused" if fused.applies_to(q) else "chunk"


def _prior_tensor(i_prior, H: int, like: torch.Tensor) -> torch.Tensor:
    """i_prior (float or [H]) as a [H] tensor in the dtype and device of the inputs, checked > 0."""
    if isinstance(i_prior, torch.Tensor):
        expect_shape("i_prior", i_prior, (H,), "a float or one value per head [H]")
        prior = i_prior.to(dtype=like.dtype, device=like.device)
    else:
        prior = torch.full((H,), float(i_prior), dtype=like.dtype, device=like.device)
    if checking_values() and not bool((prior > 0).all()):
        raise ValueError(f"i_prior must be > 0, got {prior.min().item():.4g}")
    return prior


def metaplastic_attention(q, k, v, beta, log_alpha, *, i_prior=1.0, scale=None, initial_state=None,
                          output_final_state=False, output_uncertainty=False, mode="chunk",
                          chunk_size=64):
    """q, k: [B,T,H,Dk]; v, beta: [B,T,H,Dv] (beta >= 0); log_alpha: [B,T,H] (<= 0).

    initial_state: ``(mu, importance)``, each [B,H,Dv,Dk]; default mu = 0, importance = i_prior.
    Returns o [B,T,H,Dv]; with ``output_uncertainty`` also scale^2 * sum_k q_k^2 / I_t[:, k]
    [B,T,H,Dv] (the variance of o under the posterior; the authors' PyTorch reference uses scale^2,
    their Triton kernels ``scale``: we follow the reference, in every mode);
    with ``output_final_state`` also the final ``(mu, importance)``. When either is
    asked the result is a tuple in that order, otherwise o alone.
    ``mode``: "reference" (a loop over t), "chunk" (PyTorch, any device), "fused" (compiled CPU
    kernel), "triton" (Triton kernel: CUDA, or the CPU under TRITON_INTERPRET=1) or "auto" (triton
    on CUDA, fused on a CPU where it applies, else chunk); all compute the same function.
    ``chunk_size``: the chunk form's block length; for "fused", the backward's recompute window
    (it holds chunk_size * Dv * Dk * 2 values per thread) and the spacing of the saved states.
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    expect_shape("beta", beta, (B, T, H, Dv), "[B, T, H, Dv] like v")
    expect_shape("log_alpha", log_alpha, (B, T, H), "[B, T, H]: one decay per head and step")
    state = initial_state
    if state is not None:
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise ValueError("initial_state must be a pair (mu, importance), each [B, H, Dv, Dk]")
        for name, tensor in zip(("initial_state mu", "initial_state importance"), state):
            expect_shape(name, tensor, (B, H, Dv, Dk), "[B, H, Dv, Dk]")
    expect_same_dtype(q, k=k, v=v, beta=beta, log_alpha=log_alpha,
                      **({} if state is None else {"initial mu": state[0], "initial importance": state[1]}))
    expect_log_decay(log_alpha)
    expect_range("beta", beta, 0.0)
    check_mode(mode, MODES)
    check_chunk_size(chunk_size)
    prior = _prior_tensor(i_prior, H, q)
    if state is not None:
        expect_range("initial_state importance", state[1], torch.finfo(q.dtype).tiny)
    scale = Dk ** -0.5 if scale is None else float(scale)

    if mode == "auto":
        mode = _auto_mode(q)
    if mode == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ValueError("mode='triton' needs the triton package (pip install triton)")
        from routemem.ops.metaplastic.triton import metaplastic_triton  # imports triton: only when asked

        o, unc, final = metaplastic_triton(q, k, v, beta, log_alpha, prior, scale, state,
                                           output_uncertainty, chunk_size)
    elif mode == "reference":
        o, unc, final = metaplastic_reference(q, k, v, beta, log_alpha, prior, scale, state,
                                              output_uncertainty)
    elif mode == "fused":
        o, unc, final = metaplastic_fused(q, k, v, beta, log_alpha, prior, scale, state,
                                          output_uncertainty, chunk_size)
    else:
        o, unc, final = metaplastic_chunk(q, k, v, beta, log_alpha, prior, scale, state,
                                          output_uncertainty, chunk_size)
    extras = ((unc,) if output_uncertainty else ()) + ((final,) if output_final_state else ())
    return (o, *extras) if extras else o
