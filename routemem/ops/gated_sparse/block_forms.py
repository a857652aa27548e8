"""The three forms of block-routed attention, held equal by the tests.

Every form takes q, k [B, T, H, Dk], v [B, T, H, Dv] and either a selection (``blocks``, ``valid``
[B, H, n, kept] from ``select_past_blocks``: hard routing) or a block bias ([B, H, n, n], finite
where j < i: soft routing over every causal block, the own block unbiased).

- ``reference``: one masked softmax over T x T, the block choice expanded to keys;
- ``gather``: the selected key blocks gathered per query block into SDPA (a CPU fused kernel with its
  own backward); the first ``kept`` blocks, which read every past block anyway, run as one causal
  SDPA. Memory O(T * kept * block). Soft routing runs dense SDPA with the bias expanded (T x T);
- ``flex``: ``flex_attention`` with a ``BlockMask`` built from the selection, so unselected tiles
  are never read (block_flex.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from routemem.ops.gated_sparse.block_select import n_blocks, selected_block_mask
from routemem.ops.gated_sparse.reference import masked_softmax_attention
from routemem.ops.gated_sparse.scores import causal_mask


def expand_to_tokens(block_map: torch.Tensor, block_size: int, T: int) -> torch.Tensor:
    """[..., n, n] -> [..., T, T]: each block entry repeated over its queries and keys."""
    return block_map.repeat_interleave(block_size, -1).repeat_interleave(block_size, -2)[..., :T, :T]


def soft_bias_tokens(bias: torch.Tensor, block_size: int, T: int) -> torch.Tensor:
    """Block bias [B, H, n, n] -> float [B, H, T, T]: the bias on past blocks, 0 on the own block,
    -inf on future keys."""
    own = torch.eye(bias.shape[-1], dtype=torch.bool, device=bias.device)
    per_token = expand_to_tokens(bias.masked_fill(own, 0.0), block_size, T)
    return per_token.masked_fill(~causal_mask(T, bias.device), float("-inf"))


def reference_attention(q, k, v, block_size, scale, *, blocks=None, valid=None, bias=None):
    T = q.shape[1]
    causal = causal_mask(T, q.device)
    if bias is not None:
        return masked_softmax_attention(q, k, v, causal, soft_bias_tokens(bias, block_size, T), scale)
    chosen = selected_block_mask(blocks, valid, n_blocks(T, block_size))
    return masked_softmax_attention(q, k, v, expand_to_tokens(chosen, block_size, T) & causal, None, scale)


def gather_attention(q, k, v, block_size, scale, *, blocks=None, valid=None, bias=None):
    B, T, H, _ = q.shape
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    if bias is not None:
        mask = soft_bias_tokens(bias, block_size, T).to(q.dtype)
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale).transpose(1, 2)
    n, kept = n_blocks(T, block_size), blocks.shape[-1]
    pad = n * block_size - T  # padded keys sit after every real query: causality hides them
    qh, kh, vh = (F.pad(t, (0, 0, 0, pad)) for t in (qh, kh, vh))
    prefix = kept * block_size  # blocks 0 .. kept - 1 read all their past blocks: dense causal
    heads = []
    if prefix:
        heads.append(F.scaled_dot_product_attention(qh[:, :, :prefix], kh[:, :, :prefix], vh[:, :, :prefix],
                                                    is_causal=True, scale=scale))
    # Blocks kept .. n - 1 have exactly `kept` valid past blocks: gather them, own block last, so
    # one [block, (kept + 1) * block] mask serves every query block.
    rest = n - kept
    own = torch.arange(kept, n, device=q.device).expand(B, H, rest)[..., None]
    chosen = torch.cat([blocks[:, :, kept:], own], dim=-1)  # [B, H, rest, kept + 1]
    flat = (chosen + n * torch.arange(B * H, device=q.device).view(B, H, 1, 1)).flatten()
    Dk, Dv = kh.shape[-1], vh.shape[-1]
    keys = kh.reshape(B * H * n, block_size, Dk).index_select(0, flat)
    values = vh.reshape(B * H * n, block_size, Dv).index_select(0, flat)
    width = (kept + 1) * block_size
    mask = torch.ones(block_size, width, dtype=torch.bool, device=q.device)
    mask[:, kept * block_size:] = causal_mask(block_size, q.device)
    out = F.scaled_dot_product_attention(
        qh[:, :, prefix:].reshape(B * H * rest, 1, block_size, Dk), keys.view(B * H * rest, 1, width, Dk),
        values.view(B * H * rest, 1, width, Dv), attn_mask=mask, scale=scale)
    heads.append(out.view(B, H, rest * block_size, Dv))
    return torch.cat(heads, dim=2)[:, :, :T].transpose(1, 2)
