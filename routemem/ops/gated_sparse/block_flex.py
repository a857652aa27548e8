"""Block-routed attention on ``torch.nn.attention.flex_attention``: the selection becomes a
``BlockMask`` directly (O(n^2) integers, no T x T mask is ever built), so tiles that hold no chosen
block are never read. Soft routing adds the block bias through a ``score_mod``.

The BlockMask's tile is the routing block on the CPU. On CUDA it is the least multiple of the block
that is also a multiple of 128: Inductor's Triton kernels (forward and backward) take their tile
sizes from a per-GPU table (up to 128 on Hopper in bf16) and find no kernel for a sparse tile those
do not divide, and the backward accepts no override. A tile then spans several routing blocks: it
is read when any pair of blocks inside it is chosen, and a ``mask_mod`` keeps exactly the chosen
pairs (and causality), so the result is the same and only the skipping is coarser. A tile whose
every pair is chosen, below the diagonal, is a full tile that skips the mask.

flex_attention runs compiled (Inductor: Triton on CUDA, a C++ template on the CPU). torch 2.13 has
no CPU backward for it, so on the CPU this form serves inference; training there uses the gather
form (block_forms.py). The CPU tests run coarse tiles too; CUDA has not run it yet.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from routemem.ops.gated_sparse.block_select import n_blocks, past_block_mask, selected_block_mask

NO_CPU_BACKWARD = ("mode='flex' has no backward on the CPU (torch's flex_attention has none there); "
                   "use mode='gather' (what mode='auto' picks on a CPU), or call it without gradients")
GPU_TILE = 128  # the largest Triton tile Inductor's flex tables use


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def tile_size(block_size: int, device: torch.device) -> int:
    """The BlockMask's tile: the block on the CPU; on CUDA the least common multiple of the block and
    GPU_TILE (the tests set it on the CPU too)."""
    return math.lcm(block_size, GPU_TILE) if device.type == "cuda" else block_size


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, H, m, m] -> (count [B, H, m], indices [B, H, m, m]) int32, the True columns first."""
    order = torch.sort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).indices
    return tiles.sum(-1, dtype=torch.int32), order.to(torch.int32).contiguous()


def flex_block_attention(q, k, v, block_size, scale, *, blocks=None, valid=None, bias=None):
    """Inputs as the other forms (block_forms.py). Returns [B, T, H, Dv]."""
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, bias))
    if q.device.type == "cpu" and wants_grad:
        raise ValueError(NO_CPU_BACKWARD)
    B, T, H, _ = q.shape
    n = n_blocks(T, block_size)
    tile = tile_size(block_size, q.device)
    per_tile = tile // block_size
    m = -(-T // tile)  # tiles; blocks n .. m * per_tile - 1 are padding, chosen by nobody
    qh, kh, vh = (F.pad(t.transpose(1, 2), (0, 0, 0, m * tile - T)) for t in (q, k, v))
    if bias is None:
        chosen = selected_block_mask(blocks, valid, n)
    else:  # soft: every causal block, the bias on past blocks
        chosen = torch.ones(n, n, dtype=torch.bool, device=q.device).tril().expand(B, H, n, n)
        block_bias = F.pad(bias.masked_fill(~past_block_mask(n, q.device), 0.0), (0, m * per_tile - n) * 2)
    chosen = F.pad(chosen, (0, m * per_tile - n) * 2)  # [B, H, m * per_tile, m * per_tile]
    pairs = chosen.view(B, H, m, per_tile, m, per_tile)
    below_diagonal = torch.ones(m, m, dtype=torch.bool, device=q.device).tril(-1)
    full = pairs.all(5).all(3) & below_diagonal  # no pair and no causal cut to mask
    partial = pairs.any(5).any(3) & ~full

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & chosen[b, h, q_idx // block_size, kv_idx // block_size]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + block_bias[b, h, q_idx // block_size, kv_idx // block_size]

    block_mask = BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=tile, mask_mod=mask_mod,
                                          seq_lengths=(m * tile, m * tile))
    out = _compiled_flex()(qh, kh, vh, score_mod=None if bias is None else score_mod, block_mask=block_mask,
                           scale=scale)
    return out[:, :, :T].transpose(1, 2)
