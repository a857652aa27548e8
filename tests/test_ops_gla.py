"""Tests of routemem.ops.gla (scalar-decay gated linear attention): the chunked form held equal to
the plain-loop reference (outputs, final state and every gradient), float64 gradcheck, state
carry-over across calls, a closed form with no decay, a hard reset by alpha = 0, input validation
and the return convention. Tests that take ``device`` run on the CPU and on CUDA (conftest.py)."""

import pytest
import torch

from op_checks import assert_close_scaled, outputs_and_grads
from routemem.ops import gated_linear_attention as gla

B, H, DK, DV = 2, 2, 8, 6


def make_inputs(T, *, min_log_alpha=-0.5, with_state=True, dtype=torch.float32, device="cpu"):
    """q, k, v, log_alpha in [min_log_alpha, 0], and an initial state (or None); drawn on the CPU
    (the same numbers on every device), then moved to ``device``."""
    q, k = torch.randn(B, T, H, DK, dtype=dtype), torch.randn(B, T, H, DK, dtype=dtype)
    v = torch.randn(B, T, H, DV, dtype=dtype)
    log_alpha = torch.rand(B, T, H, dtype=dtype) * min_log_alpha
    state = torch.randn(B, H, DV, DK, dtype=dtype) if with_state else None
    return tuple(None if t is None else t.to(device) for t in (q, k, v, log_alpha, state))


def run_with_grads(mode, q, k, v, log_alpha, state, chunk_size):
    """o, the final state and the gradient of every input, in ``mode``."""
    inputs = {"q": q, "k": k, "v": v, "log_alpha": log_alpha, "initial_state": state}
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if t is not None}
    return outputs_and_grads(lambda **x: gla(**x, output_final_state=True, mode=mode, chunk_size=chunk_size),
                             leaves)


@pytest.mark.parametrize("T", [1, 7, 64, 100])
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("min_log_alpha", [-0.1, -5.0])  # long memory / strong decay
def test_chunk_matches_reference(T, chunk_size, with_state, min_log_alpha, device):
    inputs = make_inputs(T, min_log_alpha=min_log_alpha, with_state=with_state, device=device)
    expected = run_with_grads("reference", *inputs, chunk_size)
    actual = run_with_grads("chunk", *inputs, chunk_size)
    assert_close_scaled(actual, expected, rtol=1e-5)


def test_chunk_matches_reference_float64(device):
    inputs = make_inputs(37, min_log_alpha=-2.0, dtype=torch.float64, device=device)
    actual = run_with_grads("chunk", *inputs, 8)
    assert actual["o"].dtype == torch.float64
    assert_close_scaled(actual, run_with_grads("reference", *inputs, 8), rtol=1e-12)


def test_strong_decay_keeps_float32_accuracy(device):
    """Against float64 truth, the float32 chunk form is as accurate as the float32 loop. Decays
    taken as differences g_t - g_s of within-chunk cumsums lose ~|g| * 1e-7 (|g| ~ 150 here)."""
    inputs = make_inputs(100, min_log_alpha=-5.0, device=device)
    truth = run_with_grads("reference", *(t.double() for t in inputs), 64)
    assert_close_scaled(run_with_grads("chunk", *inputs, 64), truth, rtol=1e-6)


@pytest.mark.parametrize("mode", ["reference", "chunk"])
def test_gradcheck_float64(mode, device):
    q, k, v = (torch.randn(1, 5, 2, d, dtype=torch.float64) for d in (3, 3, 2))
    log_alpha = -0.1 - 1.5 * torch.rand(1, 5, 2, dtype=torch.float64)  # stays < 0 under eps
    state = torch.randn(1, 2, 2, 3, dtype=torch.float64)
    q, k, v, log_alpha, state = (t.to(device) for t in (q, k, v, log_alpha, state))

    def fn(q, k, v, log_alpha, state):  # chunk 2: three chunks, the last one ragged
        return gla(q, k, v, log_alpha, initial_state=state, output_final_state=True, mode=mode,
                   chunk_size=2)

    inputs = tuple(t.requires_grad_() for t in (q, k, v, log_alpha, state))
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("mode", ["reference", "chunk"])
@pytest.mark.parametrize("split", [1, 17, 32, 49])
def test_split_sequence_carries_state(mode, split, device):
    q, k, v, log_alpha, state = make_inputs(50, device=device)
    kw = dict(output_final_state=True, mode=mode, chunk_size=16)
    o_full, s_full = gla(q, k, v, log_alpha, initial_state=state, **kw)
    a, b = slice(None, split), slice(split, None)
    o1, s1 = gla(q[:, a], k[:, a], v[:, a], log_alpha[:, a], initial_state=state, **kw)
    o2, s2 = gla(q[:, b], k[:, b], v[:, b], log_alpha[:, b], initial_state=s1, **kw)
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), o_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, s_full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["reference", "chunk"])
def test_no_decay_is_causal_linear_attention(mode, device):
    q, k, v, _, _ = make_inputs(40, dtype=torch.float64, device=device)
    scale = 0.3
    no_decay = torch.zeros(B, 40, H, dtype=torch.float64, device=device)
    o = gla(q, k, v, no_decay, scale=scale, mode=mode, chunk_size=16)
    scores = torch.einsum("bthd,bshd->bhts", q, k).tril()  # [B, H, T, T], s <= t
    direct = scale * torch.einsum("bhts,bshv->bthv", scores, v)
    torch.testing.assert_close(o, direct, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["reference", "chunk"])
def test_infinite_decay_resets_the_state(mode, device):
    """log_alpha = -inf (alpha = 0, e.g. at a document boundary) forgets everything before it:
    the rest equals a fresh run from there, and no gradient becomes NaN."""
    q, k, v, log_alpha, state = (t.requires_grad_() for t in make_inputs(20, device=device))
    reset = log_alpha.detach().index_fill(1, torch.tensor([11], device=device), float("-inf"))
    o, final = gla(q, k, v, reset, initial_state=state, output_final_state=True, mode=mode,
                   chunk_size=8)
    after = slice(11, None)
    o_fresh, final_fresh = gla(q[:, after], k[:, after], v[:, after], reset[:, after],
                               output_final_state=True, mode=mode, chunk_size=8)
    torch.testing.assert_close(o[:, after], o_fresh)
    torch.testing.assert_close(final, final_fresh)
    (o.sum() + final.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, state))


@pytest.mark.parametrize("mode", ["reference", "chunk"])
def test_empty_sequence_returns_initial_state(mode):
    q, k, v, log_alpha, state = make_inputs(0)
    o, final = gla(q, k, v, log_alpha, initial_state=state, output_final_state=True, mode=mode)
    assert o.shape == (B, 0, H, DV)
    torch.testing.assert_close(final, state)


def test_return_convention():
    q, k, v, log_alpha, state = make_inputs(9)
    o = gla(q, k, v, log_alpha, initial_state=state, chunk_size=4)
    assert isinstance(o, torch.Tensor) and o.shape == (B, 9, H, DV)
    pair = gla(q, k, v, log_alpha, initial_state=state, output_final_state=True, chunk_size=4)
    assert isinstance(pair, tuple) and len(pair) == 2
    assert pair[1].shape == (B, H, DV, DK)
    torch.testing.assert_close(pair[0], o)


BAD_INPUTS = {  # case: (argument replaced, its bad value given the good inputs, expected message)
    "q not 4-d": ("q", lambda x: x["q"][0], r"^q must be \[B, T, H, Dk\]"),
    "k shape": ("k", lambda x: torch.randn(B, 6, H, DK + 1), r"^k has shape"),
    "v shape": ("v", lambda x: x["v"][:, :5], r"^v has shape"),
    "log_alpha shape": ("log_alpha", lambda x: x["log_alpha"][..., :1], r"^log_alpha has shape"),
    "state shape": ("initial_state", lambda x: x["initial_state"].transpose(-1, -2),
                    r"^initial_state has shape"),
    "log_alpha > 0": ("log_alpha", lambda x: x["log_alpha"].index_fill(1, torch.tensor([3]), 0.1),
                      r"^log_alpha must be <= 0"),
    "dtype mix": ("k", lambda x: x["k"].double(), r"^k has dtype"),
    "unknown mode": ("mode", lambda x: "fast", r"^mode must be one of"),
    "chunk_size 0": ("chunk_size", lambda x: 0, r"^chunk_size must be a positive int"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_naming_the_culprit(case):
    arg, bad_value, message = BAD_INPUTS[case]
    x = dict(zip(("q", "k", "v", "log_alpha", "initial_state"), make_inputs(6)))
    x[arg] = bad_value(x)
    with pytest.raises(ValueError, match=message):
        gla(x.pop("q"), x.pop("k"), x.pop("v"), x.pop("log_alpha"), **x)
