"""Mamba2 (SSD) and MetaMamba2, its metaplastic version (papers/palimpsa.md).

Mamba2's parameterisation with one group (B and C shared by all heads):

    z, xBC, dt_raw = in_proj(x)                d_inner, d_inner + 2N, H
    x, B, C        = SiLU(ShortConv(xBC))      x as H heads of P = d_inner / H
    dt             = softplus(dt_raw + dt_bias),   log alpha = -dt * exp(A_log)
    y              = SSD(q=C, k=B, v=x * dt, log alpha) + D * x
    out            = out_proj(rmsnorm(y * silu(z)))        (Mamba2's gate-then-norm order)

SSD is scalar-decay linear attention with scale 1; MetaMamba2 swaps it for metaplastic attention
with a low-rank importance rate beta = sigmoid(W_b2 W_b1 x) * softplus(b_scale) [B,T,H,P].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from routemem.errors import ConfigError
from routemem.layers.options import check_int, check_mode, check_positive
from routemem.layers.recurrent_parts import (
    GatedRMSNorm, RecurrentMixer, ShortConv, full_precision, op_dtype,
)
from routemem.layers.registry import LayerSpec, register_mixer
from routemem.ops import gated_linear_attention, metaplastic_attention
from routemem.ops.gla import MODES as GLA_MODES
from routemem.ops.metaplastic import MODES as METAPLASTIC_MODES


@register_mixer("mamba2", variants={"reference": {"mode": "reference"}})
class Mamba2Mixer(RecurrentMixer):
    """Options: ``expand`` (d_inner = expand * d_model), ``d_state`` (N), ``mode``/``chunk_size``
    (passed to the op), ``conv_width``; metaplastic only: ``beta_rank`` (16), ``i_prior`` (1.0)."""

    def __init__(self, spec: LayerSpec, expand: int = 2, d_state: int = 16, mode: str = "auto",
                 chunk_size: int = 64, conv_width: int = 4, metaplastic: bool = False,
                 beta_rank: int | None = None, i_prior: float | None = None):
        super().__init__()
        name = "meta_mamba2" if metaplastic else "mamba2"
        self.metaplastic = bool(metaplastic)
        self.n_head = H = spec.n_head
        self.d_inner = spec.d_model * check_int(name, "expand", expand)
        if self.d_inner % H:
            raise ConfigError(f"{name}: d_inner = expand * d_model = {self.d_inner} is not divisible "
                              f"by n_head={H}")
        self.head_dim = P = self.d_inner // H
        self.d_state = N = check_int(name, "d_state", d_state)
        self.mode = check_mode(name, mode, METAPLASTIC_MODES if metaplastic else GLA_MODES)
        self.chunk_size = check_int(name, "chunk_size", chunk_size)
        if metaplastic:
            beta_rank = check_int(name, "beta_rank", 16 if beta_rank is None else beta_rank)
            self.i_prior = check_positive(name, "i_prior", 1.0 if i_prior is None else i_prior)
        elif beta_rank is not None or i_prior is not None:
            raise ConfigError("mamba2 has no importance, so beta_rank and i_prior do not apply "
                              "(use mixer='meta_mamba2')")
        D = spec.d_model
        self.conv_channels = self.d_inner + 2 * N
        self.state_dims = (P, N)
        self.flops_per_cell = 10.0 if metaplastic else 4.0  # + importance update and division

        self.in_proj = nn.Linear(D, self.d_inner + self.conv_channels + H, bias=False)  # z, xBC, dt
        self.conv = ShortConv(self.conv_channels, conv_width, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))  # skip on x, per head
        if metaplastic:  # low-rank importance rate per (head, channel of x)
            self.beta_down = nn.Linear(D, beta_rank, bias=False)
            self.beta_up = nn.Linear(beta_rank, H * P, bias=True)
            self.b_scale = nn.Parameter(torch.empty(H * P))
        self.norm = GatedRMSNorm(P, norm_before_gate=False)
        # registered last: the model's zero/scaled init of the branch's last Linear finds it
        self.out_proj = nn.Linear(self.d_inner, D, bias=False)
        self._init_weights()

    # -- the mixer ------------------------------------------------------------------------------
    def _run(self, x: torch.Tensor, state: dict | None, mode: str):
        Bsz, T, _ = x.shape
        H, P, N = self.n_head, self.head_dim, self.d_state
        z, xbc, dt_raw = self.in_proj(x).split([self.d_inner, self.conv_channels, H], dim=-1)
        xbc, conv_buffer = self._short_conv(xbc, state)
        beta_raw = self.beta_up(self.beta_down(x)) if self.metaplastic else None
        dtype = op_dtype(x.dtype)
        with full_precision(x):
            xs, Bm, Cm = xbc.to(dtype).split([self.d_inner, N, N], dim=-1)
            xs = xs.reshape(Bsz, T, H, P)
            Bm = Bm[:, :, None].expand(Bsz, T, H, N)  # one group: every head reads the same B, C
            Cm = Cm[:, :, None].expand(Bsz, T, H, N)
            dt = F.softplus(dt_raw.to(dtype) + self.dt_bias.to(dtype))  # [B, T, H]
            log_alpha = -dt * self.A_log.to(dtype).exp()
            v = xs * dt[..., None]  # dt is both the step size of the decay and of the input
            run = dict(state=state, mode=mode, dtype=dtype, scale=1.0)
            if self.metaplastic:
                rate = torch.sigmoid(beta_raw.to(dtype)) * F.softplus(self.b_scale.to(dtype))
                y, recurrent = self._recurrence(metaplastic_attention, Cm, Bm, v, rate.reshape(Bsz, T, H, P),
                                                log_alpha, i_prior=self.i_prior, **run)
            else:
                y, recurrent = self._recurrence(gated_linear_attention, Cm, Bm, v, log_alpha, **run)
            y = y + self.D.to(dtype)[:, None] * xs
            y = self.norm(y, z.to(dtype).reshape(Bsz, T, H, P))
        out = self.out_proj(y.reshape(Bsz, T, self.d_inner).to(x.dtype))
        return out, (None if state is None else {"conv": conv_buffer, **recurrent})


@register_mixer("meta_mamba2", variants={mode: {"mode": mode} for mode in ("reference", "chunk", "fused", "triton")})
class MetaMamba2Mixer(Mamba2Mixer):
    """Mamba2 made metaplastic: Mamba2's (C, B, dt * x) as metaplastic attention's (q, k, v)."""

    def __init__(self, spec: LayerSpec, expand: int = 2, d_state: int = 16, beta_rank: int = 16,
                 i_prior: float = 1.0, mode: str = "auto", chunk_size: int = 64, conv_width: int = 4):
        super().__init__(spec, expand=expand, d_state=d_state, mode=mode, chunk_size=chunk_size,
                         conv_width=conv_width, metaplastic=True, beta_rank=beta_rank, i_prior=i_prior)
