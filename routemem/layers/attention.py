"""Causal multi-head softmax attention: the baseline mixer (optionally a sliding window)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from routemem.errors import ConfigError
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


@register_mixer("attention")
class CausalSelfAttention(nn.Module):
    """``window=None`` is full causal attention; ``window=w`` lets token t see t-w+1 .. t."""

    def __init__(self, spec: LayerSpec, window: int | None = None, bias: bool = False):
        super().__init__()
        if spec.d_model % spec.n_head:
            raise ConfigError(f"d_model={spec.d_model} is not divisible by n_head={spec.n_head}")
        if window is not None and window < 1:
            raise ConfigError(f"attention window must be >= 1, got {window}")
        self.n_head, self.head_dim = spec.n_head, spec.d_model // spec.n_head
        self.window = window
        self.max_seq_len = spec.max_seq_len
        self.dropout = spec.dropout
        self.qkv = nn.Linear(spec.d_model, 3 * spec.d_model, bias=bias)
        self.out = nn.Linear(spec.d_model, spec.d_model, bias=bias)
        self.use_rope = spec.pos == "rope"
        if self.use_rope:
            cos, sin = rope_tables(spec.max_seq_len, self.head_dim)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def _heads(self, x: torch.Tensor, start: int):
        """[B, T, D] -> q, k, v as [B, T, H, Dh], RoPE applied at positions start..start+T-1."""
        rope = (self.rope_cos, self.rope_sin) if self.use_rope else None
        return split_qkv(self.qkv(x), self.n_head, self.head_dim, rope, start)

    def _window_mask(self, T: int, device) -> torch.Tensor:
        i = torch.arange(T, device=device)
        offset = i[:, None] - i[None, :]  # query index minus key index
        return (offset >= 0) & (offset < self.window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (t.transpose(1, 2) for t in self._heads(x, 0))  # SDPA wants [B, H, T, Dh]
        dropout = self.dropout if self.training else 0.0
        if self.window is None or self.window >= T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            mask = self._window_mask(T, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out(y.transpose(1, 2).reshape(B, T, D))

    # -- token-by-token decoding with a KV cache ------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> dict:
        empty = torch.zeros(batch_size, self.n_head, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone(), "pos": 0}

    def step(self, x_t: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict]:
        """x_t [B, D] -> (y_t [B, D], new state). The cache keeps at most ``window`` keys."""
        B, D = x_t.shape
        if state is None:
            state = self.init_state(B, x_t.device, x_t.dtype)
        q, k, v = (t.transpose(1, 2) for t in self._heads(x_t[:, None], state["pos"]))
        keys = torch.cat([state["k"], k.to(state["k"].dtype)], dim=2)
        values = torch.cat([state["v"], v.to(state["v"].dtype)], dim=2)
        if self.window is not None:
            keys, values = keys[:, :, -self.window :], values[:, :, -self.window :]
        y = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype))
        y = self.out(y.transpose(1, 2).reshape(B, D))
        return y, {"k": keys, "v": values, "pos": state["pos"] + 1}

    def extra_flops_per_token(self, seq_len: int) -> float:
        """Scores and weighted sum: 2 * 2 * d_model multiply-adds per visible key, on average
        (seq_len + 1) / 2 keys under a causal mask (fewer with a window)."""
        context = (seq_len + 1) / 2 if self.window is None else min(self.window, (seq_len + 1) / 2)
        return 4.0 * self.n_head * self.head_dim * context

    def state_size(self, seq_len: int | None = None) -> int:
        """Floats of recurrent state per sequence: the KV cache grows with the context length
        (``max_seq_len`` unless given), capped by the window."""
        length = seq_len if seq_len is not None else self.max_seq_len
        if self.window is not None:
            length = min(length, self.window)
        return 2 * self.n_head * self.head_dim * length
