"""Which keys each query keeps: the top k by a score among its causal keys, random k, or the
oracle's k. All return masks or indices only (integers and booleans), so nothing downstream can
carry a gradient back to the scores.

Tie rule, everywhere: among equal scores the lower key index wins. The gathered indices get it from
a stable descending sort, the mask from a threshold and a running count of ties; the reference form (``topk_mask_by_rank``) counts, for each key, the
causal keys that beat it (a higher score, or the same score and a lower index). Both make the same
choice, and a -inf score is still a causal key (chosen last, before no key)."""

from __future__ import annotations

import torch

from routemem.ops.checks import checking_values
from routemem.ops.gated_sparse.scores import causal_mask


def kept_per_query(T: int, top_k: int) -> int:
    """Slots per query in the gathered form: k, or T when the sequence is shorter."""
    return min(top_k, T)


def topk_key_indices(scores: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [B, H, T, T] -> (indices, valid), both [B, H, T, min(k, T)]: query i's best keys
    among j <= i, best first. Query i has only i + 1 causal keys; when i + 1 < k its last slots
    are not valid and their index is 0 (a key every query may read), so no slot points at a
    future key. Sorting costs O(T^2 log T); the scores are T^2 anyway."""
    T = scores.shape[-1]
    kept = kept_per_query(T, top_k)
    causal = causal_mask(T, scores.device)
    ranked = scores.detach().masked_fill(~causal, float("-inf"))
    # Stable: equal scores keep key order, so the lower index comes first. A causal key at -inf
    # still precedes every future key (future keys have higher indices).
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :kept]
    slots = torch.arange(kept, device=scores.device)
    valid = slots[None, :] <= torch.arange(T, device=scores.device)[:, None]  # [T, kept]: slot < i + 1
    valid = valid.expand_as(order)
    return order.masked_fill(~valid, 0), valid


def topk_mask(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """scores [B, H, T, T] -> bool [B, H, T, T]: True at query i's min(k, i + 1) best causal keys.

    No sort: the k-th largest causal score of each query is its threshold (``torch.topk``); keys
    above it are kept, and of the keys equal to it the lowest-indexed fill the remaining slots (a
    running count), which is the stable sort's choice. Queries with at most k causal keys keep all."""
    T = scores.shape[-1]
    kept = kept_per_query(T, top_k)
    causal = causal_mask(T, scores.device)
    ranked = scores.detach().masked_fill(~causal, float("-inf"))
    threshold = torch.topk(ranked, kept, dim=-1).values[..., -1:]
    above = (ranked > threshold) & causal
    tied = (ranked == threshold) & causal  # a causal -inf can tie; a future key never counts
    room = kept - above.sum(dim=-1, keepdim=True)
    # More ties than room: a running count picks the lowest-indexed. Eager skips it when no query
    # needs it; a compiled graph always runs it (a no-op then), as it cannot branch on values.
    if torch.compiler.is_compiling() or bool((tied.sum(dim=-1, keepdim=True) > room).any()):
        tied = tied & (tied.to(torch.int32).cumsum(dim=-1) <= room)
    mask = above | tied
    short = torch.arange(T, device=scores.device)[:, None] < kept  # query i has i + 1 <= k causal keys
    return torch.where(short, causal, mask)


def topk_mask_by_rank(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """The same mask as ``topk_mask``, the slow and plain way: key j is kept by query i when j <= i
    and fewer than k causal keys beat it (a higher score, or an equal score at a lower index).
    One query row at a time: O(T^3) time, O(T^2) memory per row."""
    T = scores.shape[-1]
    scores = scores.detach()
    rows = []
    for i in range(T):
        s = scores[..., i, : i + 1]  # [B, H, i + 1]: the causal keys
        other, this = s[..., None, :], s[..., :, None]  # compare key j' (last axis) with key j
        lower = torch.arange(i + 1, device=s.device)
        beats = (other > this) | ((other == this) & (lower[None, :] < lower[:, None]))
        keep = beats.sum(dim=-1) < top_k
        rows.append(torch.cat([keep, keep.new_zeros(*keep.shape[:-1], T - i - 1)], dim=-1))
    return torch.stack(rows, dim=-2)


def random_causal_mask(batch: int, heads: int, T: int, top_k: int, *,
                       generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """bool [batch, heads, T, T]: each query i keeps min(k, i + 1) keys drawn uniformly without
    replacement from 0 .. i, independently per batch row, head and query (mask randomisation).
    The draw is made on the generator's device (the CPU by default) and moved to ``device``, so a
    seed gives the same mask on every device."""
    for name, n in (("batch", batch), ("heads", heads), ("T", T), ("top_k", top_k)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be an int >= 1, got {n!r}")
    draw_on = generator.device if generator is not None else torch.device("cpu")
    noise = torch.rand(batch, heads, T, T, generator=generator, device=draw_on)
    return topk_mask(noise, top_k).to(device if device is not None else draw_on)


def oracle_mask(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """bool [B, H, T, T]: each query's k keys of highest dense attention probability (probs
    [B, H, T, T], e.g. from ``attention_probs``), ties to the lower key index."""
    if not isinstance(probs, torch.Tensor) or probs.dim() != 4 or probs.shape[-1] != probs.shape[-2]:
        got = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"probs must be [B, H, T, T], got {got}")
    check_top_k(top_k)
    if checking_values() and torch.isnan(probs).any():
        raise ValueError("probs has NaN entries")
    return topk_mask(probs, top_k)


def check_top_k(top_k) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1 (keys kept per query), got {top_k!r}")
