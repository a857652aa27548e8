"""Fast-slow coupled attention (arXiv 2606.16730): causal attention plus a slow path on block means.

    fast = CausalAttn(h)                                  token rate (optionally a sliding window)
    u_c  = mean of h over block c (P tokens)              one slow update per P tokens, eps = 1/P
    y_c  = SlowAttn(u)_c                                  block c attends to blocks <= c
    out  = fast + g * broadcast(phi(y))                   phi: MLP d -> 4d -> d; g starts at 0

Token t receives phi(y) of the last block complete at t (ops/block_pool), so the layer is causal.
Only g starts at zero: phi's last layer is random, so g gets a gradient at the first step while
the slow path's gradients are exactly zero (they pass through g). Zeroing both would leave the
gate shut for good.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from routemem.errors import ConfigError
from routemem.layers.attention import CausalSelfAttention, split_qkv
from routemem.layers.options import check_choice, check_int
from routemem.layers.registry import LayerSpec, register_mixer
from routemem.layers.rope import rope_tables
from routemem.ops.block_pool import block_broadcast, block_causal_attention, causal_block_pool

GATES = ("vector", "scalar", "tanh")  # g = w (per channel) | w (one number) | tanh(w) (per channel)


@register_mixer("fast_slow", variants={"window": {"window": 4}, "tanh gate": {"gate": "tanh"}})
class FastSlowAttention(nn.Module):
    """Options: ``block`` P, ``slow_heads`` (default: n_head), ``gate`` form, ``freeze_slow`` (slow
    attention and phi fixed at their initial values, the gate still trains), ``window`` for the
    fast path (None = full causal attention)."""

    def __init__(self, spec: LayerSpec, block: int = 16, slow_heads: int | None = None, gate: str = "vector",
                 freeze_slow: bool = False, window: int | None = None, bias: bool = False):
        super().__init__()
        owner = "mixer 'fast_slow'"
        self.block = check_int(owner, "block", block)
        self.gate_form = check_choice(owner, "gate", gate, GATES)
        slow_heads = spec.n_head if slow_heads is None else check_int(owner, "slow_heads", slow_heads)
        if spec.d_model % slow_heads:
            raise ConfigError(f"{owner}: d_model={spec.d_model} is not divisible by slow_heads={slow_heads}")
        d = spec.d_model
        self.slow_heads, self.slow_head_dim = slow_heads, d // slow_heads
        if spec.pos == "rope" and self.slow_head_dim % 2:  # RoPE rotates pairs of channels
            raise ConfigError(f"{owner}: pos=rope needs an even slow head dimension, but d_model={d} / "
                              f"slow_heads={slow_heads} = {self.slow_head_dim}")
        self.dropout = spec.dropout
        self.fast = CausalSelfAttention(spec, window=window, bias=bias)
        self.slow_qkv = nn.Linear(d, 3 * d, bias=bias)
        self.slow_out = nn.Linear(d, d, bias=bias)
        self.phi = nn.Sequential(nn.Linear(d, 4 * d, bias=bias), nn.GELU(), nn.Linear(4 * d, d, bias=bias))
        self.gate = nn.Parameter(torch.zeros(1 if gate == "scalar" else d))
        self.gate._no_weight_decay = True  # decay would pull the gate back to closed for its own sake
        self.use_rope = spec.pos == "rope"
        if self.use_rope:  # the slow path counts positions in blocks
            cos, sin = rope_tables(math.ceil(spec.max_seq_len / self.block), self.slow_head_dim)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.freeze_slow = bool(freeze_slow)
        if self.freeze_slow:
            for param in self.slow_parameters():
                param.requires_grad_(False)

    def _init_weights(self) -> None:
        with torch.no_grad():
            self.gate.zero_()

    def residual_weights(self) -> list[nn.Parameter]:
        """Only the fast path's output projection: the slow branch is already closed by g = 0, and
        zeroing phi's last layer too would keep the gate from ever getting a gradient."""
        return [self.fast.out.weight]

    def slow_parameters(self) -> list[nn.Parameter]:
        return [*self.slow_qkv.parameters(), *self.slow_out.parameters(), *self.phi.parameters()]

    def gate_values(self) -> torch.Tensor:
        return torch.tanh(self.gate) if self.gate_form == "tanh" else self.gate

    # -- the slow path --------------------------------------------------------------------------
    def _slow_heads(self, u: torch.Tensor, start: int):
        """Block means [B, N, D] -> q, k, v [B, N, H, Dh], RoPE at block positions start .. start+N-1."""
        rope = (self.rope_cos, self.rope_sin) if self.use_rope else None
        return split_qkv(self.slow_qkv(u), self.slow_heads, self.slow_head_dim, rope, start)

    def _message(self, y: torch.Tensor) -> torch.Tensor:
        """Slow attention output [B, N, H, Dh] -> phi(y) [B, N, D], computed once per block."""
        return self.phi(self.slow_out(y.flatten(2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        fast = self.fast(x)
        n_complete = T // self.block
        if n_complete == 0:  # no block completes: the slow path has nothing to say yet
            return fast
        u = causal_block_pool(x[:, : n_complete * self.block], self.block)  # a partial last block is never read
        q, k, v = self._slow_heads(u, 0)
        y = block_causal_attention(q, k, v, dropout=self.dropout if self.training else 0.0)
        # Gate the N block rows before broadcasting them to T tokens: P times fewer multiplies, and
        # autograd keeps [B, N, D] for the gate's gradient instead of [B, T, D].
        gated = self.gate_values() * self._message(y)
        return fast + block_broadcast(gated, self.block, T)

    # -- token-by-token decoding ----------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> dict:
        zeros = torch.zeros(batch_size, self.fast.qkv.in_features, device=device, dtype=dtype)
        empty = torch.zeros(batch_size, self.slow_heads, 0, self.slow_head_dim, device=device, dtype=dtype)
        return {"fast": None, "block_sum": zeros, "count": 0, "slow_k": empty, "slow_v": empty.clone(),
                "message": zeros.clone()}

    def step(self, x_t: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict]:
        """The slow state moves once per block: when token t completes a block, its mean goes
        through the slow attention (a KV cache over blocks) and phi, and the new message is in
        token t's own output, exactly as in the parallel form."""
        if state is None:
            state = self.init_state(x_t.shape[0], x_t.device, x_t.dtype)
        fast, fast_state = self.fast.step(x_t, state["fast"])
        block_sum, count = state["block_sum"] + x_t.to(state["block_sum"].dtype), state["count"] + 1
        slow_k, slow_v, message = state["slow_k"], state["slow_v"], state["message"]
        if count == self.block:
            q, k, v = (t.transpose(1, 2) for t in self._slow_heads((block_sum / self.block).to(x_t.dtype)[:, None],
                                                                   slow_k.shape[2]))
            slow_k = torch.cat([slow_k, k.to(slow_k.dtype)], dim=2)
            slow_v = torch.cat([slow_v, v.to(slow_v.dtype)], dim=2)
            y = F.scaled_dot_product_attention(q, slow_k.to(q.dtype), slow_v.to(q.dtype))  # [B, H, 1, Dh]
            message = self._message(y.transpose(1, 2))[:, 0].to(message.dtype)
            block_sum, count = torch.zeros_like(block_sum), 0
        out = fast + self.gate_values() * message.to(fast.dtype)
        return out, {"fast": fast_state, "block_sum": block_sum, "count": count, "slow_k": slow_k,
                     "slow_v": slow_v, "message": message}

    # -- statistics and accounting --------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """How open the gate is: logged at every log step (a closed gate means the slow path is unused)."""
        g = self.gate_values().detach().float()
        return {"gate_mean_abs": float(g.abs().mean()), "gate_rms": float(g.pow(2).mean().sqrt())}

    def extra_flops_per_token(self, seq_len: int) -> float:
        """The fast path's scores, the slow path's scores over (seq_len/P + 1)/2 blocks per block,
        and a correction: the model counts every nn.Linear once per token, but the slow path's
        linears run once per block (1/P of a token's share)."""
        d = self.fast.qkv.in_features
        blocks = max(1, seq_len // self.block)
        slow_scores = 4.0 * d * (blocks + 1) / 2 / self.block
        slow_linear = sum(m.weight.numel() for m in (self.slow_qkv, self.slow_out, *self.phi)
                          if isinstance(m, nn.Linear))
        return self.fast.extra_flops_per_token(seq_len) + slow_scores - 2.0 * slow_linear * (1 - 1 / self.block)

    def state_size(self, seq_len: int | None = None) -> int:
        """The fast KV cache, the slow KV cache (one key and value per block), the running block
        sum and the current message."""
        length = seq_len if seq_len is not None else self.fast.max_seq_len
        d = self.fast.qkv.in_features
        return self.fast.state_size(seq_len) + 2 * d * math.ceil(length / self.block) + 2 * d
