"""The fast forms: SDPA for dense, soft and mask gating (their bias or mask is T x T anyway), and
a gather for hard top-k, which touches only the k kept keys of each query."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa_attention(q, k, v, *, attn_mask=None, is_causal=False, scale):
    """q, k, v [B, T, H, D] -> [B, T, H, Dv]; ``attn_mask`` is SDPA's: bool (True = attend) or a
    float bias with -inf where a key is masked."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    return out.transpose(1, 2)


def gathered_attention(q, k, v, indices, valid, scale):
    """Softmax attention of each query over its own kept keys only.

    q, k [B, T, H, Dk]; v [B, T, H, Dv]; indices, valid [B, H, T, n] (``topk_key_indices``).
    Gathers K and V rows into [B, H, T, n, D]: memory O(T n D) per head, not O(T^2)."""
    B, T, H, _ = q.shape
    batch = torch.arange(B, device=q.device)[:, None, None, None]
    head = torch.arange(H, device=q.device)[None, :, None, None]
    keys = k.transpose(1, 2)[batch, head, indices]  # [B, H, T, n, Dk]
    values = v.transpose(1, 2)[batch, head, indices]  # [B, H, T, n, Dv]
    logits = torch.einsum("bihd,bhind->bhin", q, keys) * scale
    weights = logits.masked_fill(~valid, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhin,bhind->bihd", weights, values)
