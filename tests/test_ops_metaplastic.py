"""Tests of routemem.ops.metaplastic: the chunked form (both backward paths) against the plain-loop
reference (outputs, final state, every gradient), float64 gradcheck, the paper's special cases
(beta = 0 is GLA with v / I_prior; a large prior approaches it), state hand-over across a split
sequence (these two for the fused kernel too), input validation and the return conventions.
Tests that take ``device`` run on the CPU and on CUDA (conftest.py); the fused kernel is CPU code,
so on CUDA ``auto`` must pick the chunk form and ``fused`` must refuse."""

import importlib.util

import pytest
import torch
from metaplastic_inputs import (
    DK,
    DV,
    PRIOR,
    B,
    H,
    assert_close,
    flat_outputs,
    gradcheck_inputs,
    make_inputs,
    make_state,
)
from devices import on_cuda
from op_checks import on_devices

from routemem.ops import gated_linear_attention, metaplastic_attention
from routemem.ops.metaplastic.chunk import metaplastic_chunk
from routemem.ops.metaplastic.reference import metaplastic_reference

# (mode, device) for the paper's special cases and hand-over: fused on the CPU only
MODES = on_devices("reference", "chunk", "fused", *(("triton",) if importlib.util.find_spec("triton") else ()))


# ---------------------------------------------------------------- chunk form vs the reference

@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "autograd"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-start", "initial-state"])
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("T", [1, 7, 64, 100])
def test_chunk_matches_reference_outputs_and_gradients(T, chunk_size, with_state, recompute, device):
    inputs = make_inputs(T, seed=T + chunk_size, device=device)
    state = make_state(device=device) if with_state else None
    leaves = [x.requires_grad_() for x in (*inputs, *(state or ()))]
    scale, prior = DK ** -0.5, PRIOR.to(device)
    expected = flat_outputs(metaplastic_reference(*inputs, prior, scale, state, True))
    actual = flat_outputs(metaplastic_chunk(*inputs, prior, scale, state, True, chunk_size,
                                            recompute=recompute))
    for name, a, e in zip(("o", "uncertainty", "final mu", "final importance"), actual, expected):
        assert a.shape == e.shape
        assert_close(a, e, name=name)

    g = torch.Generator().manual_seed(7)  # a loss that reads every output
    weights = [torch.randn(e.shape, generator=g).to(device) for e in expected]
    def loss(outputs):
        return sum((w * x).sum() for w, x in zip(weights, outputs))

    grads_expected = torch.autograd.grad(loss(expected), leaves)
    grads_actual = torch.autograd.grad(loss(actual), leaves)
    names = ("q", "k", "v", "beta", "log_alpha", "initial mu", "initial importance")
    for name, a, e in zip(names, grads_actual, grads_expected):
        assert_close(a, e, name="d " + name)


def test_public_chunk_mode_matches_reference_with_float_prior(device):
    q, k, v, beta, log_alpha = make_inputs(37, device=device)
    kwargs = dict(i_prior=3.0, output_uncertainty=True, output_final_state=True)
    ref = metaplastic_attention(q, k, v, beta, log_alpha, mode="reference", **kwargs)
    chunk = metaplastic_attention(q, k, v, beta, log_alpha, mode="chunk", chunk_size=8, **kwargs)
    for a, e in zip((chunk[0], chunk[1], *chunk[2]), (ref[0], ref[1], *ref[2])):
        assert_close(a, e)


def test_chunk_float64_matches_reference_to_rounding(device):
    inputs = make_inputs(50, dtype=torch.float64, device=device)
    state = make_state(dtype=torch.float64, device=device)
    prior = PRIOR.to(device, torch.float64)
    expected = flat_outputs(metaplastic_reference(*inputs, prior, 0.3, state, True))
    for recompute in (True, False):
        actual = flat_outputs(metaplastic_chunk(*inputs, prior, 0.3, state, True, 16,
                                                recompute=recompute))
        for a, e in zip(actual, expected):
            assert a.dtype == torch.float64
            assert_close(a, e, rtol=1e-12)


# ---------------------------------------------------------------- float64 gradcheck

@pytest.mark.parametrize("mode,chunk_size,recompute", [
    ("reference", 64, True), ("chunk", 2, True), ("chunk", 4, True),
    ("chunk", 2, False), ("chunk", 4, False),
])
def test_gradcheck_float64(mode, chunk_size, recompute, device):
    """Gradients of every input, the initial state and the per-head prior, from every output."""
    def fn(q, k, v, beta, log_alpha, mu0, importance0, prior):
        if mode == "reference":
            out = metaplastic_reference(q, k, v, beta, log_alpha, prior, 0.6, (mu0, importance0),
                                        True)
        else:
            out = metaplastic_chunk(q, k, v, beta, log_alpha, prior, 0.6, (mu0, importance0), True,
                                    chunk_size, recompute=recompute)
        return tuple(flat_outputs(out))

    assert torch.autograd.gradcheck(fn, gradcheck_inputs(device), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------- the paper's special cases

@pytest.mark.parametrize("mode, device", MODES)
@pytest.mark.parametrize("prior", [0.5, 3.0, "per-head"])
def test_beta_zero_is_gla_with_v_over_prior(mode, device, prior):
    q, k, v, beta, log_alpha = make_inputs(24, device=device)
    i_prior = PRIOR.to(device) if prior == "per-head" else prior
    divisor = i_prior.view(1, 1, H, 1) if prior == "per-head" else prior
    o = metaplastic_attention(q, k, v, torch.zeros_like(beta), log_alpha, i_prior=i_prior,
                              mode=mode, chunk_size=8)
    o_gla = gated_linear_attention(q, k, v / divisor, log_alpha, mode="reference")
    assert_close(o, o_gla, rtol=1e-6)
    assert o.abs().max() > 0.1  # not trivially zero


@pytest.mark.parametrize("mode, device", MODES)
def test_large_prior_approaches_gla_monotonically(mode, device):
    """'Mamba2 is the special case where forgetting dominates': with fixed evidence (beta > 0) the
    gap to GLA with v / I_prior shrinks as the prior grows."""
    q, k, v, _, log_alpha = make_inputs(32, device=device)
    beta = torch.full((B, 32, H, DV), 0.5, device=device)
    gaps = []
    for prior in (1.0, 4.0, 16.0, 64.0, 256.0):
        o = metaplastic_attention(q, k, v, beta, log_alpha, i_prior=prior, mode=mode, chunk_size=8)
        o_gla = gated_linear_attention(q, k, v / prior, log_alpha, mode="reference")
        gaps.append(((o - o_gla).norm() / o_gla.norm()).item())
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[0] > 0.05 and gaps[-1] < 0.01, gaps  # a real effect at I_prior = 1, gone at 256


# ---------------------------------------------------------------- state hand-over

@pytest.mark.parametrize("mode, device", MODES)
def test_split_sequence_with_state_equals_one_pass(mode, device):
    T = 40
    q, k, v, beta, log_alpha = make_inputs(T, device=device)
    kwargs = dict(i_prior=PRIOR.to(device), mode=mode, chunk_size=16, output_final_state=True)
    o_full, (mu_full, imp_full) = metaplastic_attention(q, k, v, beta, log_alpha, **kwargs)
    for split in (1, 7, 16, 33):
        head = [x[:, :split] for x in (q, k, v, beta, log_alpha)]
        tail = [x[:, split:] for x in (q, k, v, beta, log_alpha)]
        o1, state = metaplastic_attention(*head, **kwargs)
        o2, (mu, importance) = metaplastic_attention(*tail, initial_state=state, **kwargs)
        assert_close(torch.cat([o1, o2], dim=1), o_full)
        assert_close(mu, mu_full)
        assert_close(importance, imp_full)


def test_empty_sequence_returns_the_initial_state(device):
    q, k, v, beta, log_alpha = make_inputs(0, device=device)
    state = make_state(device=device)
    for mode in ("reference", "chunk"):
        o, (mu, importance) = metaplastic_attention(q, k, v, beta, log_alpha, initial_state=state,
                                                    output_final_state=True, mode=mode)
        assert o.shape == (B, 0, H, DV)
        assert torch.equal(mu, state[0]) and torch.equal(importance, state[1])


@pytest.mark.parametrize("device", [on_cuda("cuda", id="cuda")])
def test_on_cuda_auto_is_triton_or_chunk_and_fused_refuses(device):
    """The fused kernel is CPU code: on CUDA ``auto`` runs the Triton kernel where Triton imports,
    else the chunk form (and matches the reference), and asking for ``fused`` is a ValueError that
    names the way out."""
    q, k, v, beta, log_alpha = make_inputs(20, device=device)
    kwargs = dict(i_prior=PRIOR.to(device), chunk_size=8, output_final_state=True)
    auto = metaplastic_attention(q, k, v, beta, log_alpha, mode="auto", **kwargs)
    picked = "triton" if importlib.util.find_spec("triton") else "chunk"
    chunk = metaplastic_attention(q, k, v, beta, log_alpha, mode=picked, **kwargs)
    ref = metaplastic_attention(q, k, v, beta, log_alpha, mode="reference", **kwargs)
    assert torch.equal(auto[0], chunk[0]) and auto[0].device.type == "cuda"
    for a, e in zip((auto[0], *auto[1]), (ref[0], *ref[1])):
        assert_close(a, e)
    with pytest.raises(ValueError, match="mode='fused' is a CPU kernel.*mode='chunk'"):
        metaplastic_attention(q, k, v, beta, log_alpha, mode="fused", **kwargs)


# ---------------------------------------------------------------- validation

def _bad_inputs():
    q, k, v, beta, log_alpha = make_inputs(5)
    mu0, imp0 = make_state()
    ok = dict(q=q, k=k, v=v, beta=beta, log_alpha=log_alpha)
    return [
        ("k", dict(ok, k=k[..., :-1]), {}),
        ("v", dict(ok, v=v[:, :-1]), {}),
        ("beta", dict(ok, beta=beta[..., :-1]), {}),
        ("log_alpha", dict(ok, log_alpha=log_alpha[..., None]), {}),
        ("initial_state mu", ok, dict(initial_state=(mu0[..., :-1], imp0))),
        ("initial_state importance", ok, dict(initial_state=(mu0, imp0[:, :1]))),
        ("initial_state", ok, dict(initial_state=mu0)),
        ("log_alpha must be <= 0", dict(ok, log_alpha=log_alpha + 0.5), {}),
        ("beta must be >= 0", dict(ok, beta=beta - 0.5), {}),
        ("i_prior must be > 0", ok, dict(i_prior=0.0)),
        ("i_prior must be > 0", ok, dict(i_prior=torch.tensor([1.0, -1.0]))),
        ("i_prior has shape", ok, dict(i_prior=torch.ones(3))),
        ("k has dtype", dict(ok, k=k.double()), {}),
        ("mode", ok, dict(mode="turbo")),
        ("chunk_size", ok, dict(chunk_size=0)),
        ("chunk_size", ok, dict(chunk_size=2.5)),
    ]


@pytest.mark.parametrize("needle,tensors,kwargs", _bad_inputs(),
                         ids=[f"{i}-{case[0]}" for i, case in enumerate(_bad_inputs())])
def test_bad_input_raises_value_error_naming_it(needle, tensors, kwargs):
    with pytest.raises(ValueError) as info:
        metaplastic_attention(**tensors, **kwargs)
    assert str(info.value).startswith(needle.split()[0]) and needle in str(info.value)


# ---------------------------------------------------------------- return conventions

def test_return_conventions():
    q, k, v, beta, log_alpha = make_inputs(9)
    ref = metaplastic_reference(q, k, v, beta, log_alpha, torch.ones(H), DK ** -0.5, None, True)
    o = metaplastic_attention(q, k, v, beta, log_alpha)
    assert isinstance(o, torch.Tensor)
    assert_close(o, ref[0])
    o, unc = metaplastic_attention(q, k, v, beta, log_alpha, output_uncertainty=True)
    assert_close(unc, ref[1])
    o, (mu, importance) = metaplastic_attention(q, k, v, beta, log_alpha, output_final_state=True)
    assert_close(mu, ref[2][0])
    assert_close(importance, ref[2][1])
    o, unc, (mu, importance) = metaplastic_attention(q, k, v, beta, log_alpha,
                                                     output_uncertainty=True, output_final_state=True)
    for a, e in zip((o, unc, mu, importance), (ref[0], ref[1], *ref[2])):
        assert_close(a, e)
    assert bool((unc > 0).all())  # a variance
