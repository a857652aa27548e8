"""Palimpsa (Bayesian-metaplastic gated linear attention) and GLA, its beta = 0 special case.

The layer follows the official parameterisation (papers/palimpsa.md):

    q, k, v = SiLU(ShortConv(W x)), q and k L2-normalised per head
    bs      = sigmoid(W_bs x)                                     scalar input gate [B,T,H]
    beta    = sigmoid(W_b2 W_b1 x) * softplus(b_scale) * bs       importance rate [B,T,H,Dv]
    alpha   = exp(-softplus(W_dt x + dt_bias) * exp(A_log))       decay [B,T,H]
    o       = metaplastic_attention(q, k, bs * v, beta, log alpha, i_prior) + D * v
    y       = W_o GatedRMSNorm(o, W_g x)                          rmsnorm(o) * silu(W_g x)

``gla`` drops the importance (no W_b1, W_b2, b_scale): o = gated_linear_attention(q, k,
bs * v / i_prior, log alpha) + D * v, which is what palimpsa computes when beta = 0.

Defaults are the official layer's (its authors' code), each an option (tests hold them):
short-conv weights N(0, 0.02) (``conv_init_std``; None: nn.Conv1d's uniform init); ``b_scale``
one per head (``importance_scale="head"``; "channel": one per (head, value channel)) starting at
1, i.e. softplus 1.313 (``b_scale_init``); W_b2 without bias (``beta_bias``), rank
ceil(d_model / 16) (``beta_rank``); A ~ U(0, 16) (``a_init_range``), so some heads start with
almost no decay. The paper's MQAR runs use ``expand_v=2``; the layer's default stays 1 (a
drop-in mixer of the attention's width). gla shares the parameterisation, so the pair differs
only by the importance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from routemem.errors import ConfigError
from routemem.layers.options import check_choice, check_int, check_mode, check_positive, check_range
from routemem.layers.recurrent_parts import (
    GatedRMSNorm, RecurrentMixer, ShortConv, full_precision, head_dim, l2norm, op_dtype,
)
from routemem.layers.registry import LayerSpec, register_mixer
from routemem.ops import gated_linear_attention, metaplastic_attention
from routemem.ops.gla import MODES as GLA_MODES
from routemem.ops.metaplastic import MODES as METAPLASTIC_MODES


@register_mixer("palimpsa", variants={mode: {"mode": mode} for mode in ("reference", "chunk", "fused", "triton")})
class PalimpsaMixer(RecurrentMixer):
    """Options: ``expand_v`` (value head dim = expand_v * d_model / n_head), ``i_prior`` (prior
    importance), ``mode``/``chunk_size`` (passed to the op), ``conv_width``, ``conv_init_std``,
    ``a_init_range``; palimpsa only: ``beta_rank`` (rank of the importance-rate projection, default
    ceil(d_model / 16)), ``beta_bias``, ``importance_scale`` ("head" | "channel"), ``b_scale_init``."""

    def __init__(self, spec: LayerSpec, expand_v: int = 1, beta_rank: int | None = None,
                 i_prior: float = 1.0, mode: str = "auto", chunk_size: int = 64, conv_width: int = 4,
                 conv_init_std: float | None = 0.02, a_init_range: tuple[float, float] = (0.0, 16.0),
                 beta_bias: bool | None = None, importance_scale: str | None = None,
                 b_scale_init: float | None = None, metaplastic: bool = True):
        super().__init__()
        name = "palimpsa" if metaplastic else "gla"
        self.metaplastic = bool(metaplastic)
        self.n_head, self.dk = spec.n_head, head_dim(name, spec)
        self.dv = self.dk * check_int(name, "expand_v", expand_v)
        self.i_prior = check_positive(name, "i_prior", i_prior)
        self.mode = check_mode(name, mode, METAPLASTIC_MODES if metaplastic else GLA_MODES)
        self.chunk_size = check_int(name, "chunk_size", chunk_size)
        self.conv_init_std = None if conv_init_std is None else check_positive(name, "conv_init_std", conv_init_std)
        self.a_init_range = check_range(name, "a_init_range", a_init_range)
        if metaplastic:
            beta_rank = check_int(name, "beta_rank", math.ceil(spec.d_model / 16) if beta_rank is None else beta_rank)
            beta_bias = bool(beta_bias)
            importance_scale = check_choice(name, "importance_scale", importance_scale or "head", ("head", "channel"))
            self.b_scale_init = 1.0 if b_scale_init is None else float(b_scale_init)
        else:
            given = [k for k, v in (("beta_rank", beta_rank), ("beta_bias", beta_bias),
                                    ("importance_scale", importance_scale), ("b_scale_init", b_scale_init))
                     if v is not None]
            if given:
                raise ConfigError(f"gla has no importance rate, so {', '.join(given)} does not apply "
                                  "(use mixer='palimpsa')")
        D, H, dk, dv = spec.d_model, self.n_head, self.dk, self.dv
        self.conv_channels = 2 * H * dk + H * dv
        self.state_dims = (dv, dk)
        self.flops_per_cell = 10.0 if metaplastic else 4.0  # + importance update and division

        self.qkv_proj = nn.Linear(D, self.conv_channels, bias=False)
        self.conv = ShortConv(self.conv_channels, conv_width)
        self.bs_proj = nn.Linear(D, H, bias=False)  # scalar input gate per head
        self.dt_proj = nn.Linear(D, H, bias=False)  # input-dependent step size of the decay
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))  # skip on the value, per head
        if metaplastic:  # low-rank importance rate: evidence gathered per (head, value channel)
            self.beta_down = nn.Linear(D, beta_rank, bias=False)
            self.beta_up = nn.Linear(beta_rank, H * dv, bias=beta_bias)
            self.b_scale = nn.Parameter(torch.empty(H if importance_scale == "head" else H * dv))
        self.g_proj = nn.Linear(D, H * dv, bias=False)
        self.norm = GatedRMSNorm(dv, norm_before_gate=True)
        self.out_proj = nn.Linear(H * dv, D, bias=False)  # last Linear: the model's zero/scaled init finds it
        self._init_weights()

    # -- the mixer ------------------------------------------------------------------------------
    def _run(self, x: torch.Tensor, state: dict | None, mode: str):
        B, T, _ = x.shape
        H, dk, dv = self.n_head, self.dk, self.dv
        qkv, conv_buffer = self._short_conv(self.qkv_proj(x), state)
        bs_raw, dt_raw, gate = self.bs_proj(x), self.dt_proj(x), self.g_proj(x)  # under autocast
        beta_raw = self.beta_up(self.beta_down(x)) if self.metaplastic else None
        dtype = op_dtype(x.dtype)
        with full_precision(x):
            q, k, v = qkv.to(dtype).split([H * dk, H * dk, H * dv], dim=-1)
            q, k = l2norm(q.reshape(B, T, H, dk)), l2norm(k.reshape(B, T, H, dk))
            v = v.reshape(B, T, H, dv)
            bs = torch.sigmoid(bs_raw.to(dtype))[..., None]  # [B, T, H, 1]
            log_alpha = -F.softplus(dt_raw.to(dtype) + self.dt_bias.to(dtype)) * self.A_log.to(dtype).exp()
            run = dict(state=state, mode=mode, dtype=dtype)
            if self.metaplastic:
                scale = F.softplus(self.b_scale.to(dtype)).reshape(H, -1)  # [H, 1] or [H, dv]
                beta = torch.sigmoid(beta_raw.to(dtype)).reshape(B, T, H, dv) * scale * bs
                o, recurrent = self._recurrence(metaplastic_attention, q, k, v * bs, beta, log_alpha,
                                                i_prior=self.i_prior, **run)
            else:
                o, recurrent = self._recurrence(gated_linear_attention, q, k, v * bs / self.i_prior,
                                                log_alpha, **run)
            o = o + self.D.to(dtype)[:, None] * v
            o = self.norm(o, gate.to(dtype).reshape(B, T, H, dv))
        y = self.out_proj(o.reshape(B, T, H * dv).to(x.dtype))
        return y, (None if state is None else {"conv": conv_buffer, **recurrent})

    @torch.no_grad()
    def _init_weights(self) -> None:
        super()._init_weights()
        if self.conv_init_std is not None:  # as the official model, which re-initialises every conv so
            nn.init.normal_(self.conv.weight, std=self.conv_init_std)


@register_mixer("gla", variants={"reference": {"mode": "reference"}})
class GLAMixer(PalimpsaMixer):
    """Scalar-decay gated linear attention: palimpsa without importance (beta = 0)."""

    def __init__(self, spec: LayerSpec, expand_v: int = 1, i_prior: float = 1.0, mode: str = "auto",
                 chunk_size: int = 64, conv_width: int = 4, conv_init_std: float | None = 0.02,
                 a_init_range: tuple[float, float] = (0.0, 16.0)):
        super().__init__(spec, expand_v=expand_v, i_prior=i_prior, mode=mode, chunk_size=chunk_size,
                         conv_width=conv_width, conv_init_std=conv_init_std, a_init_range=a_init_range,
                         metaplastic=False)
