"""Gated DeltaNet: scalar decay plus the delta rule's erase-before-write.

    q, k, v   = SiLU(ShortConv(W x)), q and k L2-normalised per head (the delta rule needs |k| = 1)
    beta      = sigmoid(W_beta x)                                  write strength [B,T,H]
    log alpha = -exp(A_log) * softplus(W_a x + dt_bias)            decay [B,T,H]
    o         = gated_delta_rule(q, k, v, beta, log alpha)
    y         = W_o GatedRMSNorm(o, W_g x)                         rmsnorm(o) * silu(W_g x)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from routemem.layers.options import check_int, check_mode
from routemem.layers.recurrent_parts import (
    GatedRMSNorm, RecurrentMixer, ShortConv, full_precision, head_dim, l2norm, op_dtype,
)
from routemem.layers.registry import LayerSpec, register_mixer
from routemem.ops import gated_delta_rule
from routemem.ops.delta_rule import MODES as DELTA_MODES


@register_mixer("gated_deltanet", variants={"reference": {"mode": "reference"}})
class GatedDeltaNetMixer(RecurrentMixer):
    """Options: ``expand_v`` (value head dim = expand_v * d_model / n_head), ``mode``/``chunk_size``
    (passed to the op), ``conv_width``."""

    def __init__(self, spec: LayerSpec, expand_v: int = 1, mode: str = "auto", chunk_size: int = 64,
                 conv_width: int = 4):
        super().__init__()
        name = "gated_deltanet"
        self.n_head, self.dk = spec.n_head, head_dim(name, spec)
        self.dv = self.dk * check_int(name, "expand_v", expand_v)
        self.mode = check_mode(name, mode, DELTA_MODES)
        self.chunk_size = check_int(name, "chunk_size", chunk_size)
        D, H, dk, dv = spec.d_model, self.n_head, self.dk, self.dv
        self.conv_channels = 2 * H * dk + H * dv
        self.state_dims = (dv, dk)
        self.flops_per_cell = 8.0  # decay, recall S k, rank-one correction, readout

        self.qkv_proj = nn.Linear(D, self.conv_channels, bias=False)
        self.conv = ShortConv(self.conv_channels, conv_width)
        self.beta_proj = nn.Linear(D, H, bias=False)  # write strength per head
        self.a_proj = nn.Linear(D, H, bias=False)  # input-dependent step size of the decay
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.g_proj = nn.Linear(D, H * dv, bias=False)
        self.norm = GatedRMSNorm(dv, norm_before_gate=True)
        self.out_proj = nn.Linear(H * dv, D, bias=False)  # last Linear: the model's zero/scaled init finds it
        self._init_weights()

    def _run(self, x: torch.Tensor, state: dict | None, mode: str):
        B, T, _ = x.shape
        H, dk, dv = self.n_head, self.dk, self.dv
        qkv, conv_buffer = self._short_conv(self.qkv_proj(x), state)
        beta_raw, a_raw, gate = self.beta_proj(x), self.a_proj(x), self.g_proj(x)  # under autocast
        dtype = op_dtype(x.dtype)
        with full_precision(x):
            q, k, v = qkv.to(dtype).split([H * dk, H * dk, H * dv], dim=-1)
            q, k = l2norm(q.reshape(B, T, H, dk)), l2norm(k.reshape(B, T, H, dk))
            beta = torch.sigmoid(beta_raw.to(dtype))
            log_alpha = -self.A_log.to(dtype).exp() * F.softplus(a_raw.to(dtype) + self.dt_bias.to(dtype))
            o, recurrent = self._recurrence(gated_delta_rule, q, k, v.reshape(B, T, H, dv), beta, log_alpha,
                                            state=state, mode=mode, dtype=dtype)
            o = self.norm(o, gate.to(dtype).reshape(B, T, H, dv))
        y = self.out_proj(o.reshape(B, T, H * dv).to(x.dtype))
        return y, (None if state is None else {"conv": conv_buffer, **recurrent})
