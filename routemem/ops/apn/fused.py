"""``mode="fused"``: the patch mixture as one C++ loop over tokens and their top-k patches (CPU).

The grouped PyTorch form moves an [assignments, d] tensor through memory several times (its
batched matmul's output, the scatter to tokens, and in backward the gathered gradient read by two
matmuls). ``fused_kernel.cpp`` accumulates each token's output in registers with all of U in
cache; its backward visits each thread's assignments patch by patch, a few at a time, and does the
gates' backward in the same loop. Two cheap steps stay in PyTorch: the code
u = V^T z (autograd differentiates z and V as usual) and the gates' sigmoid (vectorised).

Compiled on first use (``routemem.ops.native``); ``available()`` says whether that worked here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from routemem.ops import native

_P, _I = native.POINTER, native.INT64
KERNEL = native.Kernel(Path(__file__).with_name("fused_kernel.cpp"), "patch", {
    "forward": [_P] * 5 + [_I] * 3 + [_P] + [_I] * 2,
    "backward": [_P] * 8 + [_I] * 4 + [_P] * 5 + [_I] * 2,
})
available, applies_to = KERNEL.available, KERNEL.applies_to


class PatchMixtureFn(torch.autograd.Function):
    """(code [N, r], indices [N, k], weights [N, k], U [K, d, r], a, b [K, r]) -> out [N, d]."""

    @staticmethod
    def forward(ctx, code, indices, weights, U, a, b):
        code, indices, weights, U, a = (x.contiguous() for x in (code, indices, weights, U, a))
        (N, k), (_, d, r) = indices.shape, U.shape
        flat = indices.flatten()
        gate = torch.sigmoid(a.index_select(0, flat).view(N, k, r) * code[:, None]
                             + b.index_select(0, flat).view(N, k, r))  # s_nj, [N, k, r]
        Ut = U.transpose(1, 2).contiguous()  # [K, r, d]: the long loops run over d
        out = code.new_empty(N, d)
        kernel = KERNEL.function("forward", code.dtype)
        args = [native.pointer(x) for x in (code, indices, weights, gate, Ut)]
        native.on_threads(lambda _, lo, hi: kernel(*args, k, d, r, native.pointer(out), lo, hi),
                          N, native.worker_count(N))
        ctx.save_for_backward(code, indices, weights, gate, U, Ut, a)
        return out

    @staticmethod
    def backward(ctx, grad):
        code, indices, weights, gate, U, Ut, a = ctx.saved_tensors
        grad = grad.contiguous()
        (N, k), (K, r, d) = indices.shape, Ut.shape
        workers = native.worker_count(N)
        dcode, dweights = torch.empty_like(code), torch.empty_like(weights)
        # U, a and b are shared by all tokens: one partial sum per thread, added up afterwards.
        dUt, da, db = (code.new_zeros(workers, *x.shape) for x in (Ut, a, a))
        kernel = KERNEL.function("backward", code.dtype)
        args = [native.pointer(x) for x in (code, indices, weights, gate, U, Ut, a, grad)]

        def run(worker, lo, hi):
            kernel(*args, K, k, d, r, native.pointer(dcode), native.pointer(dweights),
                   *(native.pointer(x[worker]) for x in (dUt, da, db)), lo, hi)

        native.on_threads(run, N, workers)
        return dcode, None, dweights, dUt.sum(0).transpose(1, 2), da.sum(0), db.sum(0)


def patch_mixture_fused(z, indices, weights, V, U, a, b):
    """Inputs checked by ``patch_mixture``; CPU and float32/float64 only."""
    if z.device.type != "cpu":
        raise ValueError(f"mode='fused' is a CPU kernel; the inputs are on {z.device} (use mode='grouped')")
    if z.dtype not in native.SUFFIX:
        raise ValueError(f"mode='fused' takes float32 or float64, got {z.dtype}")
    return PatchMixtureFn.apply(z @ V, indices, weights, U, a, b)
