"""flash-linear-attention for the special cases (routemem/ops/fla.py): our GLA and gated delta rule
on fla's kernels, held to our references (outputs, final state, every gradient).

- On the CPU: fla's own plain-PyTorch references (``fla.ops.*.naive``) stand in for its Triton
  kernels, so the mapping (gate convention, scale, state layout) is checked here and in CI.
- On CUDA (cuda-marked): the real kernels, float32 with TF32 off.
Without fla installed these skip with the reason; on a CPU the mode is a one-line error."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from devices import HAS_CUDA, NO_CUDA
from metaplastic_inputs import assert_close

from routemem.ops import fla, gated_delta_rule, gated_linear_attention

pytestmark = pytest.mark.filterwarnings("ignore:Triton is not supported:UserWarning")  # fla's import on a CPU
HAS_FLA = importlib.util.find_spec("fla") is not None
NO_FLA = "flash-linear-attention is not installed (pip install routemem[gpu])"
needs_fla = pytest.mark.skipif(not HAS_FLA, reason=NO_FLA)
on_gpu_with_fla = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA), needs_fla]
NAIVE = {"gla": ("fla.ops.simple_gla.naive", "naive_recurrent_simple_gla"),
         "gated_delta_rule": ("fla.ops.gated_delta_rule.naive", "naive_recurrent_gated_delta_rule")}
GRADS = ["d q", "d k", "d v", "d beta", "d log_alpha", "d initial state"]


@pytest.fixture
def fla_naive_on_cpu(monkeypatch):
    """fla's reference recurrences in place of its kernels, and the CPU as a device fla runs on."""
    monkeypatch.setattr(fla, "KERNELS", NAIVE)
    monkeypatch.setattr(fla, "DEVICES", ("cpu",))


def _inputs(T=100, B=2, H=2, Dk=64, Dv=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, Dk, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, T, H, Dk, generator=g), dim=-1)
    v = torch.randn(B, T, H, Dv, generator=g)
    beta = torch.rand(B, T, H, generator=g)
    log_alpha = -0.2 * torch.rand(B, T, H, generator=g)
    state = 0.1 * torch.randn(B, H, Dv, Dk, generator=g)
    return q, k, v, beta, log_alpha, state


def _gla(mode, q, k, v, beta, log_alpha, state, scale=None):
    return gated_linear_attention(q, k, v, log_alpha, initial_state=state, output_final_state=True,
                                  mode=mode, scale=scale)


def _delta(mode, q, k, v, beta, log_alpha, state, scale=None):
    return gated_delta_rule(q, k, v, beta, log_alpha, initial_state=state, output_final_state=True,
                            mode=mode, scale=scale)


def _compare(op, device, rtol, **shape):
    """op under mode 'fla' against mode 'reference' on ``device``: values and gradients."""
    cpu = _inputs(**shape)
    results = {}
    for mode in ("reference", "fla"):
        leaves = [x.to(device).requires_grad_() for x in cpu]
        o, final = op(mode, *leaves, scale=0.3)  # a scale other than the default, so it must be passed
        g = torch.Generator().manual_seed(1)
        loss = ((o * torch.randn(o.shape, generator=g).to(device)).sum()
                + (final * torch.randn(final.shape, generator=g).to(device)).sum())
        loss.backward()
        results[mode] = [o.detach(), final.detach()] + [x.grad for x in leaves]
    for name, a, e in zip(["o", "final state", *GRADS], results["fla"], results["reference"]):
        if e is None:
            assert a is None, f"{name}: fla gives a gradient the reference does not"
        else:
            assert_close(a.cpu(), e.cpu(), rtol=rtol, name=name)


@needs_fla
@pytest.mark.parametrize("op", [_gla, _delta], ids=["gla", "gated_delta_rule"])
@pytest.mark.parametrize("shape", [dict(T=37, Dk=8, Dv=8), dict(T=20, H=3, Dk=6, Dv=10)], ids=["square", "Dk!=Dv"])
def test_fla_mapping_matches_reference_on_cpu(fla_naive_on_cpu, op, shape):
    _compare(op, "cpu", rtol=2e-5, **shape)


@needs_fla
@pytest.mark.parametrize("op", [_gla, _delta], ids=["gla", "gated_delta_rule"])
def test_fla_mapping_fails_on_an_untransposed_state(fla_naive_on_cpu, monkeypatch, op):
    """The check can fail: hand fla our [Dv, Dk] state untransposed and the outputs differ."""
    monkeypatch.setattr(fla, "_fla_state", lambda s: None if s is None else s.contiguous())
    with pytest.raises(AssertionError, match="max error"):
        _compare(op, "cpu", rtol=2e-5, T=12, Dk=8, Dv=8)


@needs_fla
@pytest.mark.parametrize("op", [_gla, _delta], ids=["gla", "gated_delta_rule"])
def test_auto_dispatches_to_fla_where_it_runs(fla_naive_on_cpu, monkeypatch, op):
    calls = []
    real = fla._kernel
    monkeypatch.setattr(fla, "_kernel", lambda name, q: calls.append(name) or real(name, q))
    op("auto", *_inputs(T=5, Dk=4, Dv=4))
    assert len(calls) == 1
    monkeypatch.setattr(fla, "DEVICES", ("cuda",))  # back to the real rule: the CPU stays on chunk
    op("auto", *_inputs(T=5, Dk=4, Dv=4))
    assert len(calls) == 1


@needs_fla
@pytest.mark.parametrize("mixer", ["gla", "mamba2", "gated_deltanet"])
def test_mixers_run_on_fla_under_auto(fla_naive_on_cpu, monkeypatch, mixer):
    """The special-case mixers default to mode='auto', so they reach fla where it dispatches, and
    give the same output as on our chunk form."""
    from routemem.layers import build_mixer
    from routemem.layers.registry import LayerSpec

    torch.manual_seed(0)
    layer = build_mixer(mixer, LayerSpec(d_model=16, n_head=2, max_seq_len=32), {})
    assert layer.mode == "auto"
    calls = []
    real = fla._kernel
    monkeypatch.setattr(fla, "_kernel", lambda name, q: calls.append(name) or real(name, q))
    x = torch.randn(2, 9, 16)
    on_fla = layer(x)
    assert calls, f"{mixer} under mode='auto' did not reach fla"
    monkeypatch.setattr(fla, "DEVICES", ("cuda",))
    assert_close(on_fla.detach(), layer(x).detach(), rtol=1e-5, name=f"{mixer} on fla vs chunk")


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=on_gpu_with_fla, id="cuda")])
@pytest.mark.parametrize("op", [_gla, _delta], ids=["gla", "gated_delta_rule"])
def test_fla_kernels_match_reference_on_cuda(device, op):
    prior = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _compare(op, device, rtol=1e-3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prior


def test_fla_on_a_cpu_is_a_one_line_error():
    q, k, v, beta, log_alpha, _ = _inputs(T=4, Dk=4, Dv=4)
    with pytest.raises(ValueError, match=r"^mode='fla' needs flash-linear-attention .* the inputs are on cpu"):
        gated_linear_attention(q, k, v, log_alpha, mode="fla")
    with pytest.raises(ValueError, match=r"^mode='fla' needs flash-linear-attention"):
        gated_delta_rule(q, k, v, beta, log_alpha, mode="fla")
