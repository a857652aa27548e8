"""Block-routed attention on ``torch.nn.attention.flex_attention``: the selection becomes a
``BlockMask`` directly (O(n^2) integers, no T x T mask is ever built), with the own block as the one
partial tile (causal ``mask_mod``) and the chosen past blocks as full tiles, so unselected key
blocks are never read. Soft routing adds the block bias through a ``score_mod``.

flex_attention runs compiled (Inductor: Triton on CUDA, a C++ template on the CPU). torch 2.13 has
no CPU backward for it, so on the CPU this form serves inference; training there uses the gather
form (block_forms.py). Not yet run on a GPU: Inductor's backward picks its tiles from a per-GPU table
without the forward's ``kernel_options`` check, and a routing block smaller than that tile (e.g. 64
against Hopper's bf16 128) may find no kernel; the cuda-marked tests (bf16, block 64) will say.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from routemem.ops.gated_sparse.block_select import n_blocks, past_block_mask

NO_CPU_BACKWARD = ("mode='flex' has no backward on the CPU (torch's flex_attention has none there); "
                   "use mode='gather' (what mode='auto' picks on a CPU), or call it without gradients")


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _tiles(block_size: int) -> dict:
    """Triton tiles that divide the routing block (Inductor refuses a sparse block that its tile
    does not divide; its default forward tile on recent GPUs is 128 queries)."""
    tile = 64
    while block_size % tile:
        tile //= 2
    return {"BLOCK_M": tile, "BLOCK_N": tile}


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _block_mask(full: torch.Tensor, full_count: torch.Tensor, n: int, block_size: int) -> BlockMask:
    """full [B, H, n, n] int32 key-block indices (the first full_count [B, H, n] used) -> BlockMask
    whose only partial tile per query block is its own (causal)."""
    B, H = full.shape[:2]
    own = torch.arange(n, dtype=torch.int32, device=full.device).view(1, 1, n, 1).expand(B, H, n, n)
    ones = torch.ones(B, H, n, dtype=torch.int32, device=full.device)
    return BlockMask.from_kv_blocks(ones, own.contiguous(), full_count.contiguous(), full.contiguous(),
                                    BLOCK_SIZE=block_size, mask_mod=_causal,
                                    seq_lengths=(n * block_size, n * block_size))


def flex_block_attention(q, k, v, block_size, scale, *, blocks=None, valid=None, bias=None):
    """Inputs as the other forms (block_forms.py). Returns [B, T, H, Dv]."""
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, bias))
    if q.device.type == "cpu" and wants_grad:
        raise ValueError(NO_CPU_BACKWARD)
    B, T, H, _ = q.shape
    n = n_blocks(T, block_size)
    pad = n * block_size - T
    qh, kh, vh = (F.pad(t.transpose(1, 2), (0, 0, 0, pad)) for t in (q, k, v))
    score_mod = None
    if bias is None:
        full = torch.zeros(B, H, n, n, dtype=torch.int32, device=q.device)
        full[..., :blocks.shape[-1]] = blocks.to(torch.int32)
        count = valid.sum(-1, dtype=torch.int32)  # valid slots come first
    else:  # every past block, in order
        past = past_block_mask(n, q.device)
        full = torch.sort(past.to(torch.int32), dim=-1, descending=True, stable=True).indices.to(torch.int32)
        count = past.sum(-1, dtype=torch.int32)
        block_bias = bias.masked_fill(~past, 0.0)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + block_bias[b, h, q_idx // block_size, kv_idx // block_size]
    block_mask = _block_mask(full.expand(B, H, n, n), count.expand(B, H, n), n, block_size)
    out = _compiled_flex()(qh, kh, vh, score_mod=score_mod, block_mask=block_mask, scale=scale,
                           kernel_options=_tiles(block_size) if q.is_cuda else None)
    return out[:, :, :T].transpose(1, 2)
