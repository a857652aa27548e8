"""What the metaplastic torch.library ops share (the chunked recompute, the fused C++ kernel, the
Triton kernel): each forward takes (q, k, v, beta, log_alpha, prior, M0, J0, scale,
with_uncertainty, chunk_size) and returns (o, uncertainty, M_T, J_T, chunk-start states), and each
backward op has one signature, so one set of functions gives any backward its shapes, joins any
forward to its backward, and turns the op's linear states into the public (mu, importance)."""

from __future__ import annotations

import torch

from routemem.ops.metaplastic.chunk import linear_state


def register_autograd(forward_op, backward_op) -> None:
    """Register ``backward_op``'s fake and ``forward_op``'s autograd: save the inputs and the
    chunk-start states; backward calls ``backward_op`` with the output gradients (a missing do is
    zero; du only where the forward computed the uncertainty)."""
    backward_op.register_fake(_gradient_shapes)

    def save(ctx, inputs, output):
        q, k, v, beta, log_alpha, prior, _, _, scale, with_uncertainty, chunk_size = inputs
        ctx.save_for_backward(q, k, v, beta, log_alpha, prior, output[4])
        ctx.scale, ctx.with_uncertainty, ctx.chunk_size = scale, with_uncertainty, chunk_size

    def differentiate(ctx, do, du, dM_T, dJ_T, _starts_grad):
        q, k, v, beta, log_alpha, prior, starts = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do
        du = du if ctx.with_uncertainty else None
        grads = backward_op(do, du, dM_T, dJ_T, q, k, v, beta, log_alpha, prior, starts, ctx.scale,
                            ctx.chunk_size)
        return *grads, None, None, None  # scale, with_uncertainty, chunk_size

    forward_op.register_autograd(differentiate, setup_context=save)


def _gradient_shapes(do, du, dM_T, dJ_T, q, k, v, beta, log_alpha, prior, starts, scale, chunk_size):
    """The backward ops' fake: contiguous gradients of (q, k, v, beta, log_alpha, prior, M0, J0)."""
    B, _, H, Dk = q.shape
    Dv = v.shape[-1]
    return (*(x.new_empty(x.shape) for x in (q, k, v, beta, log_alpha, prior)),
            q.new_empty(B, H, Dv, Dk), q.new_empty(B, H, Dv, Dk))


def call_with_states(forward_op, q, k, v, beta, log_alpha, i_prior, scale, initial_state, with_uncertainty,
                     chunk_size):
    """``forward_op`` on the public state: (mu, importance) -> the linear states (M, J) it scans,
    and its final (M, J) back. Returns (o, uncertainty or None, (mu, importance))."""
    B, _, H, Dk = q.shape
    Dv = v.shape[-1]
    M0, J0 = linear_state(initial_state, i_prior, q, (B, H, Dv, Dk))
    o, unc, M, J, _ = forward_op(q, k, v, beta, log_alpha, i_prior, M0, J0, scale, with_uncertainty, chunk_size)
    importance = J + i_prior.view(1, H, 1, 1)
    return o, (unc if with_uncertainty else None), (M / importance, importance)
