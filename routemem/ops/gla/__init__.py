"""Scalar-decay gated linear attention (GLA with one gate per head; Mamba2's SSD recurrence):

    S_t = alpha_t S_{t-1} + v_t k_t^T,    o_t = scale * S_t q_t,    alpha_t = exp(log_alpha_t)

with S [Dv, Dk] per head. It is metaplastic attention with beta = 0 and I_prior = 1.
"""

from __future__ import annotations

from routemem.ops.checks import (
    check_chunk_size, check_mode, check_qkv, expect_log_decay, expect_same_dtype, expect_shape,
)
from routemem.ops import fla
from routemem.ops.gla.chunk import gla_chunk
from routemem.ops.gla.reference import gla_reference

# fla: flash-linear-attention's chunk kernel (routemem/ops/fla.py; CUDA);
# auto: fla on CUDA when it imports, else chunk (the fastest form here)
MODES = ("reference", "chunk", "fla", "auto")


def gated_linear_attention(q, k, v, log_alpha, *, scale=None, initial_state=None,
                           output_final_state=False, mode="chunk", chunk_size=64):
    """q, k: [B,T,H,Dk]; v: [B,T,H,Dv]; log_alpha: [B,T,H] (<= 0); initial_state: [B,H,Dv,Dk].
    Returns o [B,T,H,Dv], or ``(o, final_state)`` with ``output_final_state``."""
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    expect_shape("log_alpha", log_alpha, (B, T, H), "[B, T, H]: one decay per head and step")
    if initial_state is not None:
        expect_shape("initial_state", initial_state, (B, H, Dv, Dk), "[B, H, Dv, Dk]")
    expect_same_dtype(q, k=k, v=v, log_alpha=log_alpha, initial_state=initial_state)
    expect_log_decay(log_alpha)
    check_mode(mode, MODES)
    check_chunk_size(chunk_size)
    scale = Dk ** -0.5 if scale is None else float(scale)
    if mode == "auto":
        mode = "fla" if fla.dispatches(q) else "chunk"
    if mode == "reference":
        o, final = gla_reference(q, k, v, log_alpha, scale, initial_state)
    elif mode == "fla":
        o, final = fla.gla_fla(q, k, v, log_alpha, scale, initial_state)
    else:
        o, final = gla_chunk(q, k, v, log_alpha, scale, initial_state, chunk_size)
    return (o, final) if output_final_state else o
