"""The patch mixture with tokens grouped by patch, as MoE libraries do: flatten the (token, slot)
assignments, sort them by patch, count per patch (bincount) and take offsets (cumsum).

Each patch's assignments fill whole tiles of TILE rows (the last one padded), and one batched
matmul applies to every tile the U_i of the patch that owns it. Padding is under one tile per
patch, however unbalanced the routing: padding every patch to the busiest patch's count instead
would cost (K x the busiest share) times the work, 2-9x in real training. No Python loop over
tokens or patches, and under torch.compile no shape that depends on the routing.

Rows are filled by gathering (``index_select``) and results scattered straight back to their
tokens (``index_add``): in backward these become each other, not the far slower backward of
advanced indexing. Padding rows point at token 0 with weight 0, so they add exact zeros; a patch
no token chose owns no tile and gets an exactly zero gradient for U_i, a_i, b_i: the locality the
paper's continual-learning argument rests on.
"""

from __future__ import annotations

import torch

TILE = 64  # rows per tile: big enough for an efficient small matmul, small enough to waste little


def group_by_patch(indices: torch.Tensor, n_patches: int, tile: int = TILE):
    """indices [N, k] -> (order, slot, tile_patch): ``order`` sorts the flattened assignments by
    patch (stably), ``slot[j]`` is the row of sorted assignment j in the [n_tiles * tile] buffer,
    and ``tile_patch`` [n_tiles] is the patch that owns each tile."""
    flat = indices.flatten()
    order = flat.argsort(stable=True)
    patch = flat[order]
    counts = torch.bincount(flat, minlength=n_patches)
    tiles = (counts + tile - 1) // tile  # per patch
    ends = tiles.cumsum(0)
    first_tile = ends - tiles
    first_assignment = counts.cumsum(0) - counts
    rank_in_patch = torch.arange(flat.numel(), device=flat.device) - first_assignment[patch]
    slot = first_tile[patch] * tile + rank_in_patch
    # Eager uses the exact tile count. A compiled graph needs shapes that do not depend on the
    # routing: it takes the bound (each patch's last tile is partial, so at most one tile more per
    # patch); the spare tiles hold no assignment and add exact zeros.
    n_tiles = flat.numel() // tile + n_patches if torch.compiler.is_compiling() else int(ends[-1])
    tile_patch = torch.searchsorted(ends, torch.arange(n_tiles, device=flat.device), right=True)
    return order, slot, tile_patch.clamp_max(n_patches - 1)


def patch_mixture_grouped(z, indices, weights, V, U, a, b, tile: int = TILE):
    N, k = indices.shape
    K, d, r = U.shape
    out = z.new_zeros(N, d)
    if N == 0:
        return out + 0 * (V.sum() + U.sum() + a.sum() + b.sum())  # keep the graph for empty input
    order, slot, tile_patch = group_by_patch(indices, K, tile)
    n_tiles, rows = tile_patch.numel(), tile_patch.numel() * tile
    row_token = torch.zeros(rows, dtype=torch.long, device=z.device).index_copy_(0, slot, order // k)
    row_weight = weights.new_zeros(rows).index_copy(0, slot, weights.flatten().index_select(0, order))
    code = (z @ V).index_select(0, row_token).view(n_tiles, tile, r)  # u = V^T z, one row per assignment
    gate_a, gate_b = a.index_select(0, tile_patch)[:, None], b.index_select(0, tile_patch)[:, None]
    # The routing weight folded into the feature: w U_i phi = U_i (w phi), one [rows, d] product fewer.
    phi = code * torch.sigmoid(gate_a * code + gate_b) * row_weight.view(n_tiles, tile, 1)
    per_tile = torch.bmm(phi, U.index_select(0, tile_patch).transpose(1, 2))  # [n_tiles, tile, d]
    return out.index_add(0, row_token, per_tile.view(rows, d))
