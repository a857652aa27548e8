"""The patch mixture as a loop over patches: for patch i, the tokens that kept it, their weight
for it, and U_i (u * sigmoid(a_i u + b_i)) added into their rows. Obviously right, and slow."""

from __future__ import annotations

import torch


def patch_mixture_reference(z, indices, weights, V, U, a, b):
    u = z @ V  # [N, r]: the shared compact code
    out = z.new_zeros(z.shape[0], U.shape[1])
    for i in range(U.shape[0]):
        kept = indices == i  # [N, k]
        rows = kept.any(-1).nonzero().squeeze(-1)
        if rows.numel() == 0:
            continue
        weight = (weights[rows] * kept[rows]).sum(-1, keepdim=True)  # [n_i, 1]
        code = u[rows]
        phi = code * torch.sigmoid(a[i] * code + b[i])
        out = out.index_add(0, rows, weight * (phi @ U[i].T))
    return out
