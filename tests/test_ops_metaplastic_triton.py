"""The Triton kernel of metaplastic attention (``mode="triton"``) against the plain-loop reference:
outputs, uncertainty, final state and every gradient (prior and initial state included).

Without a GPU the kernels run in Triton's interpreter (conftest.py sets ``TRITON_INTERPRET=1``),
one program at a time in numpy, so shapes are small: ragged T (not a multiple of the checkpoint
spacing), Dk and Dv that are not powers of two (masked lanes), and a Dv wider than one program's
tile (the atomic sums over tiles). The cuda-marked cases run the compiled kernels in float32
(TF32 off) and bfloat16 (inputs and outputs; the state stays float32)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from devices import HAS_CUDA, NO_CUDA
from metaplastic_inputs import assert_close, flat_outputs, make_inputs, make_state
from op_checks import INTERPRETED, NOT_INTERPRETED

from routemem.ops import metaplastic_attention
from routemem.ops.metaplastic.reference import metaplastic_reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install -e '.[test]')")

CPU = pytest.param("cpu", id="cpu-interpreter", marks=pytest.mark.skipif(not INTERPRETED, reason=NOT_INTERPRETED))
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason=NOT_INTERPRETED)
CUDA = pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)])


def _triton():
    from routemem.ops.metaplastic import triton as kernels

    return kernels


def _compare(T, Dk, Dv, chunk_size, with_state, with_uncertainty, device, dtype=torch.float32, rtol=1e-5):
    """Reference (float64 on the CPU) against mode="triton": outputs and the gradients of a loss that
    reads every output, for q, k, v, beta, log_alpha, the initial state and the prior."""
    H = 2
    inputs = make_inputs(T, seed=T + Dk + Dv, H=H, Dk=Dk, Dv=Dv, dtype=torch.float64)
    state = make_state(H=H, Dk=Dk, Dv=Dv, dtype=torch.float64) if with_state else None
    prior = torch.tensor([0.5, 2.0], dtype=torch.float64)
    scale = Dk ** -0.5
    ref_leaves = [x.clone().requires_grad_() for x in (*inputs, *(state or ()), prior)]
    run_leaves = [x.detach().to(device, dtype).requires_grad_() for x in ref_leaves]

    def call(leaves, fn):
        q, k, v, beta, log_alpha = leaves[:5]
        initial = tuple(leaves[5:7]) if with_state else None
        return flat_outputs(fn(q, k, v, beta, log_alpha, leaves[-1], scale, initial))

    expected = call(ref_leaves, lambda *a: metaplastic_reference(*a, with_uncertainty))
    actual = call(run_leaves, lambda *a: _triton().metaplastic_triton(*a, with_uncertainty, chunk_size))
    g = torch.Generator().manual_seed(7)
    weights = [None if e is None else torch.randn(e.shape, generator=g, dtype=torch.float64) for e in expected]

    def loss(outputs):
        return sum((w.to(x.device, x.dtype) * x).sum() for w, x in zip(weights, outputs) if x is not None)

    grads_expected = torch.autograd.grad(loss(expected), ref_leaves)
    grads_actual = torch.autograd.grad(loss(actual), run_leaves)
    names = ["o", "uncertainty", "final mu", "final importance"]
    for name, a, e in zip(names, actual, expected):
        assert (a is None) == (e is None), name
        if e is not None:
            assert a.dtype == dtype and a.device.type == device, name
            assert_close(a.double().cpu(), e.detach(), rtol=rtol, name=name)
    names = ["q", "k", "v", "beta", "log_alpha"] + (["initial mu", "initial importance"] if with_state else []) + ["prior"]
    for name, a, e in zip(names, grads_actual, grads_expected):
        assert_close(a.double().cpu(), e, rtol=rtol, name="d " + name)


@pytest.mark.parametrize("with_uncertainty", [True, False], ids=["uncertainty", "no-uncertainty"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-start", "initial-state"])
@pytest.mark.parametrize("T, chunk_size", [(1, 4), (7, 4), (9, 16), (12, 4)])
@pytest.mark.parametrize("device", [CPU, CUDA])
def test_triton_matches_reference_outputs_and_gradients(T, chunk_size, with_state, with_uncertainty, device):
    _compare(T, 8, 6, chunk_size, with_state, with_uncertainty, device)


@pytest.mark.parametrize("Dk, Dv", [(5, 3), (3, 40), (17, 33)], ids=["odd", "two-v-tiles", "odd-two-v-tiles"])
@pytest.mark.parametrize("device", [CPU, CUDA])
def test_odd_widths_and_several_value_tiles(Dk, Dv, device):
    """Masked lanes (Dk, Dv not powers of two) and Dv split over programs (their dq, dk, dlog_alpha
    and dprior meet in atomic sums)."""
    _compare(6, Dk, Dv, 4, True, True, device)


@pytest.mark.parametrize("device", [CUDA])
def test_bfloat16_inputs_with_a_float32_state(device):
    _compare(40, 64, 64, 16, True, True, device, dtype=torch.bfloat16, rtol=3e-2)


@pytest.mark.parametrize("device", [CUDA])
def test_field_shape_float32(device):
    _compare(200, 64, 128, 64, True, False, device, rtol=1e-4)


@interpreter_only
def test_only_the_output_used_and_strided_inputs():
    """No gradient flows into the final state (autograd passes None for it); inputs are views."""
    wide = [x.repeat_interleave(2, dim=1)[:, ::2] for x in make_inputs(10)]  # equal values, stride 2 in T
    assert not wide[0].is_contiguous()
    leaves = [x.detach().clone().requires_grad_() for x in make_inputs(10)]
    grads = []
    for mode, inputs in (("reference", leaves), ("triton", [w.detach().requires_grad_() for w in wide])):
        o = metaplastic_attention(*inputs, mode=mode, chunk_size=4)
        grads.append(torch.autograd.grad(o.pow(2).sum(), inputs))
    for a, e in zip(grads[1], grads[0]):
        assert_close(a, e)


@interpreter_only
def test_it_is_a_registered_triton_op():
    kernels = _triton()
    assert torch.ops.routemem.metaplastic_triton_forward.default is not None
    q, k, v, beta, log_alpha = make_inputs(6)
    M0, J0 = make_state()
    args = [x.requires_grad_() for x in (q, k, v, beta, log_alpha, torch.tensor([0.5, 2.0]), M0, J0)]
    # the fake-tensor checks trace the kernel, which the interpreter cannot: those run on CUDA
    result = torch.library.opcheck(kernels.triton_forward, args + [0.3, True, 4],
                                   test_utils=("test_schema", "test_autograd_registration"))
    assert set(result.values()) == {"SUCCESS"}


@interpreter_only
def test_cpu_without_the_interpreter_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(_triton(), "INTERPRETED", False)
    q, k, v, beta, log_alpha = make_inputs(4)
    with pytest.raises(ValueError, match=r"^mode='triton' runs on CUDA .* the inputs are on cpu \(use mode='chunk'\)$"):
        metaplastic_attention(q, k, v, beta, log_alpha, mode="triton")


def test_auto_on_cpu_stays_off_triton():
    q, k, v, beta, log_alpha = make_inputs(4)
    from routemem.ops.metaplastic import _auto_mode

    assert _auto_mode(q) in ("fused", "chunk")


@pytest.mark.parametrize("device", [CUDA])
def test_palimpsa_trains_on_cuda_with_triton_step_for_step_like_chunk(device):
    """The Palimpsa mixer on the Triton kernel trains (the loss falls on a learnable sequence) and
    takes the chunk form's steps: 20 AdamW steps, losses equal within 1e-3 relative (float32)."""
    from routemem.models import TransformerLM
    from routemem.models.config import LMConfig

    period = torch.randint(0, 32, (8,), generator=torch.Generator().manual_seed(0))
    tokens = period.repeat(4, 9)[:, :65].to(device)  # [4, 65]: a period-8 pattern
    losses = {}
    for mode in ("triton", "chunk"):
        torch.manual_seed(0)
        model = TransformerLM(LMConfig(vocab_size=32, n_layer=2, d_model=64, n_head=2, max_seq_len=64,
                                       mixer="palimpsa", mixer_kwargs={"mode": mode})).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[mode] = []
        for _ in range(20):
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[mode].append(loss.item())
    assert losses["triton"][-1] < 0.5 * losses["triton"][0]
    for step, (a, b) in enumerate(zip(losses["triton"], losses["chunk"])):
        assert abs(a - b) <= 1e-3 * abs(b), f"step {step}: triton {a:.6f}, chunk {b:.6f}"
