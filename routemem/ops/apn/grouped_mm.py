"""``mode="grouped_mm"``: the patch mixture on ``torch.nn.functional.grouped_mm``, PyTorch's own
jagged per-expert matmul, instead of the padded tiles of ``grouped.py``.

The assignments are sorted by patch as in ``grouped.py``, but each patch's rows stay packed: one
grouped_mm takes the [assignments, r] features and every U_i^T with the offsets where each patch's
rows end, so no row is padding and no [n_tiles, r, d] copy of U is gathered. The code u = V^T z is
one dense matmul (V is shared by all patches); the gate is elementwise on gathered a_i, b_i.

What torch 2.13 grouped_mm does, found by experiment (tests/test_ops_apn_grouped_mm.py holds it):

- dtypes: float32, bfloat16 and float16, not float64. A float64 call runs ``grouped`` instead,
  so every mode computes the same function on every input (float64 is what gradchecks use).
- strides must be multiples of 16 bytes. Unaligned widths r, d are padded with zeros (V's and
  a, b's columns, U's rows and columns) rather than sent to ``grouped``: a padded code column has
  a = b = 0 and u = 0, so its feature is exactly 0, and the padded output columns are sliced off.
  The pads copy only the small parameters, and the mode computes the same way at every width.
- an empty group (a patch no token chose) gets no output row and an exactly zero U_i gradient;
  its a_i, b_i are gathered by no row, so their gradients are exactly zero too.
- its fake-tensor rule accepts bfloat16 only, so ``torch.compile`` cannot trace it in float32;
  and its backward refuses the stride-0 gradient that ``out.sum().backward()`` hands down. So it
  is wrapped in a custom op (``routemem::apn_grouped_mm``) with its own shape rule and a backward
  that makes the incoming gradient contiguous; the compiled graph calls it as one opaque kernel.

Offsets come from ``searchsorted`` on the sorted patches, not ``bincount``, whose output length
depends on the data: the op traces under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from routemem.ops.apn.grouped import patch_mixture_grouped

DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what grouped_mm takes (no float64)
ALIGN_BYTES = 16  # grouped_mm's stride rule


@torch.library.custom_op("routemem::apn_grouped_mm", mutates_args=())
def grouped_matmul(phi: Tensor, Ut: Tensor, offs: Tensor) -> Tensor:
    """phi [A, r] (rows sorted by group), Ut [K, r, d], offs [K] int32 group ends -> [A, d].
    Row widths must be 16-byte multiples (callers pad them); phi is made contiguous here."""
    return F.grouped_mm(phi.contiguous(), Ut, offs=offs)


@grouped_matmul.register_fake
def _(phi, Ut, offs):
    # Contiguous, as the real output is: CUDA's grouped_mm pads output rows to 16 bytes, and the
    # widths here are already padded to that (``_pad_widths``).
    return phi.new_empty(phi.shape[0], Ut.shape[2])


@torch.library.custom_op("routemem::apn_grouped_mm_backward", mutates_args=())
def grouped_matmul_backward(grad: Tensor, phi: Tensor, Ut: Tensor, offs: Tensor) -> tuple[Tensor, Tensor]:
    grad = grad.contiguous()  # a stride-0 gradient (from out.sum()) is refused by grouped_mm
    phi = phi.contiguous()
    # d phi_g = grad_g U_g;  d Ut_g = phi_g^T grad_g (the 2-d x 2-d form: groups split the rows)
    return F.grouped_mm(grad, Ut.transpose(1, 2), offs=offs), F.grouped_mm(phi.t(), grad, offs=offs)


@grouped_matmul_backward.register_fake
def _(grad, phi, Ut, offs):
    return phi.new_empty(phi.shape), Ut.new_empty(Ut.shape)


def _setup_context(ctx, inputs, output):
    phi, Ut, offs = inputs
    ctx.save_for_backward(phi, Ut, offs)


def _backward(ctx, grad):
    phi, Ut, offs = ctx.saved_tensors
    grad_phi, grad_Ut = grouped_matmul_backward(grad, phi, Ut, offs)
    return grad_phi, grad_Ut, None


grouped_matmul.register_autograd(_backward, setup_context=_setup_context)


def _aligned(width: int, dtype: torch.dtype) -> int:
    """``width`` rounded up so a row of it is a multiple of ALIGN_BYTES."""
    step = ALIGN_BYTES // dtype.itemsize
    return -(-width // step) * step


def sort_by_patch(indices: Tensor, n_patches: int) -> tuple[Tensor, Tensor, Tensor]:
    """indices [N, k] -> (order, patch, offs): ``order`` sorts the flattened assignments by patch
    (stably), ``patch`` is the sorted patch ids and ``offs`` [K] int32 the end of each patch's rows."""
    flat = indices.flatten()
    order = flat.argsort(stable=True)
    patch = flat.index_select(0, order)
    ends = torch.searchsorted(patch, torch.arange(n_patches, device=flat.device), right=True)
    return order, patch, ends.to(torch.int32)


def _pad_widths(V, U, a, b):
    """Zero-pad r and d up to 16-byte rows (no copies where they already are). U comes back
    contiguous either way: a strided view of it (every other column, say) breaks the stride rule."""
    _, d, r = U.shape
    dp, rp = _aligned(d, U.dtype), _aligned(r, U.dtype)
    if (dp, rp) == (d, r):
        return V, U.contiguous(), a, b
    return F.pad(V, (0, rp - r)), F.pad(U, (0, rp - r, 0, dp - d)), F.pad(a, (0, rp - r)), F.pad(b, (0, rp - r))


def patch_mixture_grouped_mm(z, indices, weights, V, U, a, b):
    """Inputs checked by ``patch_mixture``. float32, bfloat16 or float16; other dtypes (float64)
    run ``grouped``, which torch's grouped_mm cannot."""
    if z.dtype not in DTYPES:
        return patch_mixture_grouped(z, indices, weights, V, U, a, b)
    N, k = indices.shape
    K, d, _ = U.shape
    if N == 0:
        return z.new_zeros(N, d) + 0 * (V.sum() + U.sum() + a.sum() + b.sum())  # keep the graph for empty input
    order, patch, offs = sort_by_patch(indices, K)
    row_token = order // k
    V, U, a, b = _pad_widths(V, U, a, b)
    code = (z @ V).index_select(0, row_token)  # u = V^T z, one row per assignment, sorted by patch
    # The routing weight folded into the feature: w U_i phi = U_i (w phi), one [rows, d] product fewer.
    row_weight = weights.flatten().index_select(0, order)[:, None]
    phi = code * torch.sigmoid(a.index_select(0, patch) * code + b.index_select(0, patch)) * row_weight
    per_row = grouped_matmul(phi, U.transpose(1, 2), offs)[:, :d]  # U^T is a view: no copy of U
    return z.new_zeros(N, d).index_add(0, row_token, per_row)
