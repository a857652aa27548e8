"""Block routing: which key blocks each query block reads. Costs O((T / block)^2) per head, never
O(T^2) (the oracle's mass, an analysis tool, excepted).

Tokens fall in blocks of ``block_size`` (the last one may be short). Query block i always reads its
own block (causally) and the ``top_k_blocks`` past key blocks j < i that score best. A score must not
see any token after block i's first one, or the selection would leak the future into block i's
earlier outputs, so:

- a key block enters by its mean feature, and only complete past blocks (j < i) are scored;
- a query block enters by the mean feature of the block *before* it (i - 1): every token of block i
  may depend on it. (MoBA scores each query token against block means; choosing per query block
  instead is what lets the fast forms skip whole tiles, and the lag is what keeps it causal.)

Tie rule, as for tokens: among equal scores the lower block index wins (a stable sort).
"""

from __future__ import annotations

import torch

from routemem.ops.gated_sparse.scores import attention_probs


def n_blocks(T: int, block_size: int) -> int:
    return -(-T // block_size)


def block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x [B, T, H, r] -> [B, H, n, r]: the mean over each block's tokens (the last block's real
    tokens only when T is not a multiple of block_size)."""
    B, T, H, r = x.shape
    n = n_blocks(T, block_size)
    padded = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, n * block_size - T))
    sums = padded.view(B, n, block_size, H, r).sum(2).transpose(1, 2)
    counts = torch.full((n,), block_size, dtype=x.dtype, device=x.device)
    counts[-1] = T - (n - 1) * block_size
    return sums / counts[:, None]


def past_block_mask(n: int, device=None) -> torch.Tensor:
    """[n, n] bool, True where key block j < query block i (the blocks a gate may choose)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril(-1)


def block_scores(q_feat: torch.Tensor, k_feat: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Per-token features q_feat, k_feat [B, T, H, r] -> scores [B, H, n, n] of query block i for key
    block j: scale * mean(q_feat over block i - 1) . mean(k_feat over block j), -inf where j >= i.

    ``moba`` passes q and k with scale Dk ** -0.5 (no parameters); the learned gate passes its
    projections gq = A x, gk = B x with scale 1 / sqrt(r)."""
    q_mean = block_means(q_feat, block_size)
    k_mean = block_means(k_feat, block_size)
    q_summary = torch.cat([torch.zeros_like(q_mean[:, :, :1]), q_mean[:, :, :-1]], dim=2)  # block i - 1
    scores = torch.einsum("bhir,bhjr->bhij", q_summary, k_mean) * scale
    return scores.masked_fill(~past_block_mask(scores.shape[-1], scores.device), float("-inf"))


def kept_past_blocks(n: int, top_k_blocks: int) -> int:
    """Past-block slots per query block: top_k_blocks, or n - 1 when there are fewer blocks."""
    return max(0, min(top_k_blocks, n - 1))


def select_past_blocks(scores: torch.Tensor, top_k_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [B, H, n, n] -> (blocks, valid), both [B, H, n, kept]: each query block's best past
    key blocks, best first. Block i has only i past blocks: when i < kept its last slots are not
    valid (index 0). Integers only: no gradient reaches the scores through a selection."""
    n = scores.shape[-1]
    kept = kept_past_blocks(n, top_k_blocks)
    ranked = scores.detach().masked_fill(~past_block_mask(n, scores.device), float("-inf"))
    # Stable: equal scores keep block order; a past block at -inf still precedes every j >= i.
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :kept]
    slots = torch.arange(kept, device=scores.device)
    valid = (slots[None, :] < torch.arange(n, device=scores.device)[:, None]).expand_as(order)
    return order.masked_fill(~valid, 0), valid


def selected_block_mask(blocks: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
    """(blocks, valid) [B, H, n, kept] -> bool [B, H, n, n]: True where query block i reads key
    block j, its own block included."""
    # A sum, not an assignment: an invalid slot's index 0 may repeat a valid slot's block 0.
    counts = torch.zeros(*blocks.shape[:-1], n, dtype=torch.int32, device=blocks.device)
    chosen = counts.scatter_add_(-1, blocks, valid.to(torch.int32)) > 0
    return chosen | torch.eye(n, dtype=torch.bool, device=blocks.device)


def block_attention_mass(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """The dense model's attention mass of each query block on each key block, q, k [B, T, H, Dk] ->
    [B, H, n, n] (row i sums to the number of queries in block i). O(T^2): what the oracle
    selects by and block concentration is measured on, not a fast path. The oracle reads block i's
    own queries, so it is not causal inside a block (an upper bound, never a decoder)."""
    probs = attention_probs(q, k)  # [B, H, T, T]
    B, H, T, _ = probs.shape
    n = n_blocks(T, block_size)
    pad = n * block_size - T
    probs = torch.nn.functional.pad(probs, (0, pad, 0, pad))
    return probs.view(B, H, n, block_size, n, block_size).sum(dim=(3, 5))


def block_concentration(mass: torch.Tensor, share: float = 1 / 8) -> torch.Tensor:
    """mass [B, H, n, n] (``block_attention_mass``) -> the mean share of each query block's mass held
    by its top max(1, n * share) causal key blocks (own block included), over the query blocks with
    more causal blocks than that; 1.0 when no block has (every block is kept)."""
    n = mass.shape[-1]
    top = max(1, int(n * share))
    causal = torch.ones(n, n, dtype=torch.bool, device=mass.device).tril()
    ranked = mass.masked_fill(~causal, 0).sort(dim=-1, descending=True).values
    shares = ranked[..., :top].sum(-1) / ranked.sum(-1).clamp_min(1e-12)  # [B, H, n]
    rows = slice(top, None) if n > top else slice(0, n)
    return shares[..., rows].mean()
