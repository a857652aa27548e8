"""The gated delta rule (Gated DeltaNet), per head with S [Dv, Dk]:

    S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,    o_t = scale * S_t q_t

Unlike plain linear attention, writing v_t first erases what S held along k_t (by beta_t), so a
re-bound key's old value is replaced rather than summed in. k is expected L2-normalised.
"""

from __future__ import annotations

from routemem.ops.checks import (
    check_chunk_size, check_mode, check_qkv, expect_log_decay, expect_range, expect_same_dtype,
    expect_shape,
)
from routemem.ops import fla
from routemem.ops.delta_rule.chunk import delta_rule_chunk
from routemem.ops.delta_rule.reference import delta_rule_reference

# fla: flash-linear-attention's chunk kernel (routemem/ops/fla.py; CUDA);
# auto: fla on CUDA when it imports, else chunk
MODES = ("reference", "chunk", "fla", "auto")


def gated_delta_rule(q, k, v, beta, log_alpha, *, scale=None, initial_state=None,
                     output_final_state=False, mode="chunk", chunk_size=64):
    """q, k: [B,T,H,Dk]; v: [B,T,H,Dv]; beta: [B,T,H] in [0, 1]; log_alpha: [B,T,H] (<= 0);
    initial_state: [B,H,Dv,Dk]. Returns o [B,T,H,Dv], or ``(o, final_state)``."""
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    expect_shape("beta", beta, (B, T, H), "[B, T, H]: one write strength per head and step")
    expect_shape("log_alpha", log_alpha, (B, T, H), "[B, T, H]: one decay per head and step")
    if initial_state is not None:
        expect_shape("initial_state", initial_state, (B, H, Dv, Dk), "[B, H, Dv, Dk]")
    expect_same_dtype(q, k=k, v=v, beta=beta, log_alpha=log_alpha, initial_state=initial_state)
    expect_log_decay(log_alpha)
    expect_range("beta", beta, 0.0, 1.0)
    check_mode(mode, MODES)
    check_chunk_size(chunk_size)
    scale = Dk ** -0.5 if scale is None else float(scale)
    if mode == "auto":
        mode = "fla" if fla.dispatches(q) else "chunk"
    if mode == "reference":
        o, final = delta_rule_reference(q, k, v, beta, log_alpha, scale, initial_state)
    elif mode == "fla":
        o, final = fla.delta_rule_fla(q, k, v, beta, log_alpha, scale, initial_state)
    else:
        o, final = delta_rule_chunk(q, k, v, beta, log_alpha, scale, initial_state, chunk_size)
    return (o, final) if output_final_state else o
