"""The patch mixture as a loop over patches: for patch i, every token's total weight for it (zero
where the token did not keep it) times U_i (u * sigmoid(a_i u + b_i)). Obviously right, and slow:
it applies every patch to every token. A token's zero weight makes its term, and every gradient
through it, exactly zero, so an unchosen patch gets an exactly zero gradient here too. No
data-dependent shapes or branches, so it also traces under torch.compile."""

from __future__ import annotations

import torch


def patch_mixture_reference(z, indices, weights, V, U, a, b):
    u = z @ V  # [N, r]: the shared compact code
    out = z.new_zeros(z.shape[0], U.shape[1])
    for i in range(U.shape[0]):
        weight = (weights * (indices == i)).sum(-1, keepdim=True)  # [N, 1]
        phi = u * torch.sigmoid(a[i] * u + b[i])
        out = out + weight * (phi @ U[i].T)
    return out
