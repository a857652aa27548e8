"""``mode="fla"`` (routemem/ops/fla.py): our GLA and gated delta rule on flash-linear-attention's
kernels, held to our references on CUDA (outputs, final state, every gradient; float32, TF32 off).
fla runs on a GPU only: without one (or without fla) these skip with the reason, and on a CPU the
mode is a one-line error."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from devices import HAS_CUDA, NO_CUDA
from metaplastic_inputs import assert_close

from routemem.ops import gated_delta_rule, gated_linear_attention

HAS_FLA = importlib.util.find_spec("fla") is not None
on_gpu_with_fla = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA),
                   pytest.mark.skipif(not HAS_FLA, reason="flash-linear-attention is not installed")]


def _inputs(T=100, B=2, H=2, Dk=64, Dv=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, Dk, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, T, H, Dk, generator=g), dim=-1)
    v = torch.randn(B, T, H, Dv, generator=g)
    beta = torch.rand(B, T, H, generator=g)
    log_alpha = -0.2 * torch.rand(B, T, H, generator=g)
    state = 0.1 * torch.randn(B, H, Dv, Dk, generator=g)
    return q, k, v, beta, log_alpha, state


def _compare(op, names):
    """op(mode, *leaves) -> (o, final) on CUDA: fla against the reference, values and gradients."""
    cpu = _inputs()
    results = {}
    for mode in ("reference", "fla"):
        leaves = [x.cuda().requires_grad_() for x in cpu]
        o, final = op(mode, *leaves)
        g = torch.Generator().manual_seed(1)
        loss = (o * torch.randn(o.shape, generator=g).cuda()).sum() + (final * torch.randn(final.shape, generator=g).cuda()).sum()
        loss.backward()
        results[mode] = [o.detach(), final.detach()] + [x.grad for x in leaves]
    for name, a, e in zip(["o", "final state", *names], results["fla"], results["reference"]):
        if e is not None:
            assert_close(a.cpu(), e.cpu(), rtol=1e-3, name=name)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=on_gpu_with_fla, id="cuda")])
def test_fla_gla_matches_reference(device):
    def op(mode, q, k, v, beta, log_alpha, state):
        return gated_linear_attention(q, k, v, log_alpha, initial_state=state, output_final_state=True, mode=mode)

    _compare(op, ["d q", "d k", "d v", "d beta", "d log_alpha", "d initial state"])


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=on_gpu_with_fla, id="cuda")])
def test_fla_gated_delta_rule_matches_reference(device):
    def op(mode, q, k, v, beta, log_alpha, state):
        return gated_delta_rule(q, k, v, beta, log_alpha, initial_state=state, output_final_state=True, mode=mode)

    _compare(op, ["d q", "d k", "d v", "d beta", "d log_alpha", "d initial state"])


def test_fla_on_a_cpu_is_a_one_line_error():
    q, k, v, beta, log_alpha, _ = _inputs(T=4, Dk=4, Dv=4)
    with pytest.raises(ValueError, match=r"^mode='fla' needs flash-linear-attention .* the inputs are on cpu"):
        gated_linear_attention(q, k, v, log_alpha, mode="fla")
    with pytest.raises(ValueError, match=r"^mode='fla' needs flash-linear-attention"):
        gated_delta_rule(q, k, v, beta, log_alpha, mode="fla")
