"""Multi-head softmax attention: the baseline mixer. Causal by default (optionally a sliding
window); ``causal=False`` makes it bidirectional (the ViT's encoder blocks).

Prefix-tuning: ``forward(x, prefix=(pk, pv))`` appends extra keys and values to the ones the layer
computes from ``x``. As in the official DualPrompt and CODA-Prompt code, the prefix vectors are used
as keys and values directly: they are NOT passed through the qkv projection (nor rotated by RoPE);
each [.., Lp, D] prefix is split across heads the same way the projected keys are (head h gets
channels h*Dh .. (h+1)*Dh - 1). Every query sees every prefix key, causal or not.

``conv_width=w`` passes the q|k|v projection through a causal depthwise convolution of width w
first (no activation), as zoology's MQAR attention baseline does with its short-conv hybrid and as
our recurrent mixers do inside: one layer can then bind a value to the key before it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from routemem.errors import ConfigError
from routemem.layers.options import check_int
from routemem.layers.recurrent_parts import ShortConv
from routemem.layers.registry import LayerSpec, register_mixer
from routemem.layers.rope import apply_rope, rope_tables


def split_qkv(projected: torch.Tensor, n_head: int, head_dim: int, rope: tuple | None, start: int):
    """A fused q|k|v projection [B, T, 3 * H * Dh] -> q, k, v [B, T, H, Dh]; with ``rope`` = (cos, sin)
    tables, q and k are rotated for positions start .. start + T - 1."""
    B, T, _ = projected.shape
    q, k, v = projected.view(B, T, 3, n_head, head_dim).unbind(dim=2)
    if rope is not None:
        cos, sin = rope[0][start : start + T], rope[1][start : start + T]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q, k, v


def prefix_heads(prefix: torch.Tensor, batch: int, n_head: int, head_dim: int) -> torch.Tensor:
    """A prefix of keys or values [B, Lp, D] (or [Lp, D], shared by the batch) -> [B, H, Lp, Dh]."""
    if prefix.dim() == 2:
        prefix = prefix.expand(batch, *prefix.shape)
    if prefix.dim() != 3 or prefix.shape[0] != batch or prefix.shape[2] != n_head * head_dim:
        raise ValueError(f"a prefix must be [batch={batch}, length, {n_head * head_dim}] or [length, "
                         f"{n_head * head_dim}], got shape {tuple(prefix.shape)}")
    return prefix.reshape(batch, prefix.shape[1], n_head, head_dim).transpose(1, 2)


@register_mixer("attention", variants={"window": {"window": 4}, "conv": {"conv_width": 3}})
class CausalSelfAttention(nn.Module):
    """``window=None`` is full causal attention; ``window=w`` lets token t see t-w+1 .. t;
    ``causal=False`` lets every token see every token (no window, no ``step``); ``conv_width``: a short
    causal convolution on the q|k|v projection (see the module docstring; causal only)."""

    def __init__(self, spec: LayerSpec, window: int | None = None, bias: bool = False, causal: bool = True,
                 conv_width: int | None = None):
        super().__init__()
        if spec.d_model % spec.n_head:
            raise ConfigError(f"d_model={spec.d_model} is not divisible by n_head={spec.n_head}")
        if window is not None and window < 1:
            raise ConfigError(f"attention window must be >= 1, got {window}")
        if window is not None and not causal:
            raise ConfigError("attention window needs causal=true (a window is causal)")
        self.n_head, self.head_dim = spec.n_head, spec.d_model // spec.n_head
        self.window = window
        self.causal = causal
        self.max_seq_len = spec.max_seq_len
        self.dropout = spec.dropout
        if conv_width is not None and not causal:
            raise ConfigError("attention conv_width needs causal=true (the convolution is causal)")
        self.qkv = nn.Linear(spec.d_model, 3 * spec.d_model, bias=bias)
        self.conv = None if conv_width is None else ShortConv(3 * spec.d_model, check_int("attention", "conv_width", conv_width))
        self.out = nn.Linear(spec.d_model, spec.d_model, bias=bias)
        self.use_rope = spec.pos == "rope"
        if self.use_rope:
            cos, sin = rope_tables(spec.max_seq_len, self.head_dim)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def _heads(self, x: torch.Tensor, start: int):
        """[B, T, D] -> q, k, v as [B, T, H, Dh], RoPE applied at positions start..start+T-1."""
        projected = self.qkv(x)
        if self.conv is not None:
            projected = self.conv(projected)
        return self._split(projected, start)

    def _split(self, projected: torch.Tensor, start: int):
        rope = (self.rope_cos, self.rope_sin) if self.use_rope else None
        return split_qkv(projected, self.n_head, self.head_dim, rope, start)

    def _window_mask(self, T: int, device) -> torch.Tensor:
        i = torch.arange(T, device=device)
        offset = i[:, None] - i[None, :]  # query index minus key index
        return (offset >= 0) & (offset < self.window)

    def forward(self, x: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]; ``prefix`` = (keys, values), each [B, Lp, D] or [Lp, D]: extra
        keys/values every query attends to (see the module docstring)."""
        if prefix is not None or not self.causal:
            return self._forward_general(x, prefix)
        B, T, D = x.shape
        q, k, v = (t.transpose(1, 2) for t in self._heads(x, 0))  # SDPA wants [B, H, T, Dh]
        dropout = self.dropout if self.training else 0.0
        if self.window is None or self.window >= T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            mask = self._window_mask(T, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out(y.transpose(1, 2).reshape(B, T, D))

    def _forward_general(self, x: torch.Tensor, prefix) -> torch.Tensor:
        """Bidirectional attention, or any attention with prefix keys/values. Kept apart so the
        causal LM path above stays exactly as it was."""
        B, T, D = x.shape
        q, k, v = (t.transpose(1, 2) for t in self._heads(x, 0))
        dropout = self.dropout if self.training else 0.0
        n_prefix = 0
        if prefix is not None:
            pk, pv = (prefix_heads(p, B, self.n_head, self.head_dim).to(k.dtype) for p in prefix)
            if pk.shape != pv.shape:
                raise ValueError(f"prefix keys {tuple(pk.shape)} and values {tuple(pv.shape)} differ in shape")
            n_prefix = pk.shape[2]
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        mask = None
        if self.causal:  # the token part keeps its causal (window) mask; prefix keys are always visible
            token_mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            if self.window is not None:
                token_mask = self._window_mask(T, x.device)
            visible = torch.ones(T, n_prefix, dtype=torch.bool, device=x.device)
            mask = torch.cat([visible, token_mask], dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out(y.transpose(1, 2).reshape(B, T, D))

    # -- token-by-token decoding with a KV cache ------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> dict:
        empty = torch.zeros(batch_size, self.n_head, 0, self.head_dim, device=device, dtype=dtype)
        state = {"k": empty, "v": empty.clone(), "pos": 0}
        if self.conv is not None:
            state["conv"] = self.conv.init_buffer(batch_size, device, dtype)
        return state

    def step(self, x_t: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict]:
        """x_t [B, D] -> (y_t [B, D], new state). The cache keeps at most ``window`` keys."""
        if not self.causal:
            raise ValueError("step() decodes token by token: it needs a causal attention (causal=true)")
        B, D = x_t.shape
        if state is None:
            state = self.init_state(B, x_t.device, x_t.dtype)
        projected, new = self.qkv(x_t), {}
        if self.conv is not None:
            projected, new["conv"] = self.conv.step(projected, state["conv"])
        q, k, v = (t.transpose(1, 2) for t in self._split(projected[:, None], state["pos"]))
        keys = torch.cat([state["k"], k.to(state["k"].dtype)], dim=2)
        values = torch.cat([state["v"], v.to(state["v"].dtype)], dim=2)
        if self.window is not None:
            keys, values = keys[:, :, -self.window :], values[:, :, -self.window :]
        y = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype))
        y = self.out(y.transpose(1, 2).reshape(B, D))
        return y, {"k": keys, "v": values, "pos": state["pos"] + 1, **new}

    def extra_flops_per_token(self, seq_len: int) -> float:
        """Scores and weighted sum: 2 * 2 * d_model multiply-adds per visible key, on average
        (seq_len + 1) / 2 keys under a causal mask (fewer with a window), seq_len when bidirectional."""
        if not self.causal:
            return 4.0 * self.n_head * self.head_dim * seq_len
        context = (seq_len + 1) / 2 if self.window is None else min(self.window, (seq_len + 1) / 2)
        return 4.0 * self.n_head * self.head_dim * context

    def state_size(self, seq_len: int | None = None) -> int:
        """Floats of recurrent state per sequence: the KV cache grows with the context length
        (``max_seq_len`` unless given), capped by the window."""
        length = seq_len if seq_len is not None else self.max_seq_len
        if self.window is not None:
            length = min(length, self.window)
        conv = 0 if self.conv is None else (self.conv.width - 1) * self.conv.channels
        return 2 * self.n_head * self.head_dim * length + conv
