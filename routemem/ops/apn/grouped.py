"""The patch mixture with tokens grouped by patch, as MoE libraries do: flatten the (token, slot)
assignments, sort them by patch, count per patch (bincount) and take offsets (cumsum). Each
assignment then owns a row of a [K, capacity, r] buffer (capacity = the busiest patch's count),
and one batched matmul applies every U_i to its own rows. No Python loop over tokens or patches.

The buffer rows are filled by gathering (``index_select``) and the results are scattered straight
back to their tokens (``index_add``): gathers in backward become index_adds, not the far slower
backward of advanced indexing. Padding rows point at token 0 with weight 0, so they add exact
zeros; a patch no token chose sees only padding and gets an exactly zero gradient for U_i, a_i,
b_i: the locality the paper's continual-learning argument rests on.
"""

from __future__ import annotations

import torch


def group_by_patch(indices: torch.Tensor, n_patches: int):
    """indices [N, k] -> (order, patch, slot, capacity): ``order`` sorts the flattened
    assignments by patch, ``patch`` is each sorted assignment's patch, ``slot`` its row in the
    flattened [K * capacity] buffer."""
    flat = indices.flatten()
    order = flat.argsort(stable=True)
    patch = flat[order]
    counts = torch.bincount(flat, minlength=n_patches)
    starts = counts.cumsum(0) - counts
    capacity = int(counts.max()) if flat.numel() else 0
    slot = patch * capacity + torch.arange(flat.numel(), device=flat.device) - starts[patch]
    return order, patch, slot, capacity


def patch_mixture_grouped(z, indices, weights, V, U, a, b):
    N, k = indices.shape
    K, d, r = U.shape
    out = z.new_zeros(N, d)
    if N == 0:
        return out + 0 * (V.sum() + U.sum() + a.sum() + b.sum())  # keep the graph for empty input
    order, _, slot, capacity = group_by_patch(indices, K)
    rows = K * capacity
    row_token = torch.zeros(rows, dtype=torch.long, device=z.device).index_copy_(0, slot, order // k)
    row_weight = weights.new_zeros(rows).index_copy(0, slot, weights.flatten().index_select(0, order))
    code = (z @ V).index_select(0, row_token).view(K, capacity, r)  # u = V^T z, one row per assignment
    # The routing weight folded into the feature: w U_i phi = U_i (w phi), one [rows, d] product fewer.
    phi = code * torch.sigmoid(a[:, None] * code + b[:, None]) * row_weight.view(K, capacity, 1)
    per_patch = torch.bmm(phi, U.transpose(1, 2))  # [K, capacity, d]
    return out.index_add(0, row_token, per_patch.view(rows, d))
