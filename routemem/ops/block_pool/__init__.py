"""Causal block pooling, the slow path of fast-slow coupled attention.

The sequence is cut into blocks of P tokens (block c holds positions cP .. cP + P - 1). Pooling
takes each block's mean; a slow attention runs over the block means, block c seeing blocks <= c;
broadcasting hands token t the slow output of the last block that is *complete* at t (all its
tokens at positions <= t), and zeros before the first block completes. So nothing a token receives
depends on a later token: the leak that pooled/compressed attention is known for is ruled out by
construction, and the tests perturb future tokens to check it.
"""

from __future__ import annotations

import torch

from routemem.ops.block_pool.reference import attention_reference, broadcast_reference, pool_reference
from routemem.ops.block_pool.vectorized import attention_sdpa, broadcast_vectorized, pool_vectorized
from routemem.ops.checks import check_mode

MODES = ("reference", "vectorized")


def _check_block(P) -> None:
    if isinstance(P, bool) or not isinstance(P, int) or P < 1:
        raise ValueError(f"block size P must be an int >= 1, got {P!r}")


def _check_sequence(name: str, x) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be [B, T, D], got {got}")


def num_complete_blocks(T: int, P: int) -> int:
    """Blocks whose every token is inside a sequence of T tokens."""
    return T // P


def causal_block_pool(x: torch.Tensor, P: int, *, mode: str = "vectorized") -> torch.Tensor:
    """x [B, T, D] -> block means [B, ceil(T/P), D]; a last, partial block is the mean of its tokens
    (broadcast never hands it out: it is not complete)."""
    _check_sequence("x", x)
    _check_block(P)
    check_mode(mode, MODES)
    if x.shape[1] == 0:
        raise ValueError("x has no tokens (T = 0)")
    return pool_reference(x, P) if mode == "reference" else pool_vectorized(x, P)


def block_broadcast(y: torch.Tensor, P: int, T: int, *, mode: str = "vectorized") -> torch.Tensor:
    """y [B, N, D] (one row per block) -> [B, T, D]: token t gets row c of the last block complete at
    t, c = (t + 1) // P - 1, or zeros while c < 0. Needs N >= T // P."""
    _check_sequence("y", y)
    _check_block(P)
    check_mode(mode, MODES)
    if y.shape[1] < num_complete_blocks(T, P):
        raise ValueError(f"y has {y.shape[1]} blocks but T={T}, P={P} completes {T // P}")
    return broadcast_reference(y, P, T) if mode == "reference" else broadcast_vectorized(y, P, T)


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mode: str = "vectorized",
                           dropout: float = 0.0) -> torch.Tensor:
    """Softmax attention over blocks, q, k, v [B, N, H, Dh]: block c attends to blocks 0 .. c.
    The fast form is SDPA with a causal mask."""
    check_mode(mode, MODES)
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be [B, N, H, Dh], got {tuple(q.shape) if isinstance(q, torch.Tensor) else q!r}")
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(q.shape):
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)} ([B, N, H, Dh])")
    if mode == "reference":
        if dropout:
            raise ValueError("the reference block attention has no dropout; use mode='vectorized'")
        return attention_reference(q, k, v)
    return attention_sdpa(q, k, v, dropout)


__all__ = ["MODES", "causal_block_pool", "block_broadcast", "block_causal_attention", "num_complete_blocks"]
