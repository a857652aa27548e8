"""The patch mixture with tokens grouped by patch, as MoE libraries do: flatten the (token, slot)
assignments, sort them by patch, count per patch (bincount) and take offsets (cumsum). Each
assignment then has a row in a [K, capacity, r] buffer (capacity = the busiest patch's count),
and one batched matmul applies every U_i to its own rows. No Python loop over tokens or patches.

Padding rows are zero, so a patch no token chose gets an exactly zero gradient for U_i, a_i, b_i:
the locality the paper's continual-learning argument rests on.
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
    order, patch, slot, capacity = group_by_patch(indices, K)
    token = order // k
    code = (z @ V)[token]  # [N k, r], sorted by patch
    # Fold the routing weight into the code: w U_i phi = U_i (w phi), one [N k, d] product fewer.
    phi = code * torch.sigmoid(a[patch] * code + b[patch]) * weights.flatten()[order, None]
    buffer = phi.new_zeros(K * capacity, r).index_copy(0, slot, phi)
    per_patch = torch.bmm(buffer.view(K, capacity, r), U.transpose(1, 2))  # [K, capacity, d]
    return out.index_add(0, token, per_patch.view(K * capacity, d)[slot])
