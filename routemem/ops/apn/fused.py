"""``mode="fused"``: the patch mixture as one C++ loop over tokens and their top-k patches (CPU).

The grouped PyTorch form moves an [assignments, d] tensor through memory several times (its
batched matmul's output, the scatter to tokens, and in backward the gathered gradient read by two
matmuls). ``fused_kernel.cpp`` accumulates each token's output in registers with all of U in
cache; its backward visits each thread's assignments patch by patch, a few at a time, and does the
gates' backward in the same loop. Two cheap steps stay in PyTorch: the code
u = V^T z (autograd differentiates z and V as usual) and the gates' sigmoid (vectorised).

Compiled on first use (``routemem.ops.native``); ``available()`` says whether that worked here.
Called through two torch.library ops (``routemem::apn_fused_forward`` / ``_backward``), so a model
using it compiles with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from routemem.ops import native

_P, _I = native.POINTER, native.INT64
KERNEL = native.Kernel(Path(__file__).with_name("fused_kernel.cpp"), "patch", {
    "forward": [_P] * 5 + [_I] * 3 + [_P] + [_I] * 2,
    "backward": [_P] * 8 + [_I] * 4 + [_P] * 5 + [_I] * 2,
})
available, applies_to = KERNEL.available, KERNEL.applies_to


# The kernel as torch.library ops (see docs/architecture.md, "Registering an op"): torch.compile
# sees each as one opaque node (its fake gives the output shapes), autograd pairs them below.
@torch.library.custom_op("routemem::apn_fused_forward", mutates_args=())
def _forward(code: Tensor, indices: Tensor, weights: Tensor, U: Tensor, a: Tensor, b: Tensor
             ) -> tuple[Tensor, Tensor, Tensor]:
    """(code [N, r], indices [N, k], weights [N, k], U [K, d, r], a, b [K, r]) ->
    (out [N, d], gate [N, k, r], Ut [K, r, d]); gate and Ut are kept for the backward."""
    code, indices, weights, U, a = (x.contiguous() for x in (code, indices, weights, U, a))
    (N, k), (K, d, r) = indices.shape, U.shape
    # Checked here, not only in patch_mixture: this body runs on real data even under
    # torch.compile, and an index out of range would read outside U.
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= K):
        raise ValueError(f"indices must lie in [0, {K}); range is [{int(indices.min())}, {int(indices.max())}]")
    flat = indices.flatten()
    gate = torch.sigmoid(a.index_select(0, flat).view(N, k, r) * code[:, None]
                         + b.index_select(0, flat).view(N, k, r))  # s_nj
    Ut = U.transpose(1, 2).contiguous()  # [K, r, d]: the long loops run over d
    out = code.new_empty(N, d)
    kernel = KERNEL.function("forward", code.dtype)
    args = [native.pointer(x) for x in (code, indices, weights, gate, Ut)]
    native.on_threads(lambda _, lo, hi: kernel(*args, k, d, r, native.pointer(out), lo, hi),
                      N, native.worker_count(N))
    return out, gate, Ut


@_forward.register_fake
def _(code, indices, weights, U, a, b):
    (N, k), (K, d, r) = indices.shape, U.shape
    return code.new_empty(N, d), code.new_empty(N, k, r), U.new_empty(K, r, d)


@torch.library.custom_op("routemem::apn_fused_backward", mutates_args=())
def _backward(grad: Tensor, code: Tensor, indices: Tensor, weights: Tensor, gate: Tensor, U: Tensor,
              Ut: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> the gradients of (code, weights, U, a, b)."""
    grad, code, indices, weights, gate, U, Ut, a = (
        x.contiguous() for x in (grad, code, indices, weights, gate, U, Ut, a))
    (N, k), (K, r, d) = indices.shape, Ut.shape
    workers = native.worker_count(N)
    dcode, dweights = code.new_empty(code.shape), weights.new_empty(weights.shape)
    # U, a and b are shared by all tokens: one partial sum per thread, added up afterwards.
    dUt, da, db = (code.new_zeros(workers, *x.shape) for x in (Ut, a, a))
    kernel = KERNEL.function("backward", code.dtype)
    args = [native.pointer(x) for x in (code, indices, weights, gate, U, Ut, a, grad)]

    def run(worker, lo, hi):
        kernel(*args, K, k, d, r, native.pointer(dcode), native.pointer(dweights),
               *(native.pointer(x[worker]) for x in (dUt, da, db)), lo, hi)

    native.on_threads(run, N, workers)
    return dcode, dweights, dUt.sum(0).transpose(1, 2).contiguous(), da.sum(0), db.sum(0)


@_backward.register_fake
def _(grad, code, indices, weights, gate, U, Ut, a):
    return tuple(x.new_empty(x.shape) for x in (code, weights, U, a, a))


def _save(ctx, inputs, output):
    code, indices, weights, U, a, _ = inputs
    _, gate, Ut = output
    ctx.save_for_backward(code, indices, weights, gate, U, Ut, a)


def _differentiate(ctx, grad, _gate_grad, _ut_grad):
    code, indices, weights, gate, U, Ut, a = ctx.saved_tensors
    dcode, dweights, dU, da, db = _backward(grad, code, indices, weights, gate, U, Ut, a)
    return dcode, None, dweights, dU, da, db


_forward.register_autograd(_differentiate, setup_context=_save)
forward_op, backward_op = _forward, _backward  # for opcheck in the tests


def patch_mixture_fused(z, indices, weights, V, U, a, b):
    """Inputs checked by ``patch_mixture``; CPU and float32/float64 only."""
    if z.device.type != "cpu":
        raise ValueError(f"mode='fused' is a CPU kernel; the inputs are on {z.device} (use mode='grouped')")
    if z.dtype not in native.SUFFIX:
        raise ValueError(f"mode='fused' takes float32 or float64, got {z.dtype}")
    return _forward(z @ V, indices, weights, U, a, b)[0]
