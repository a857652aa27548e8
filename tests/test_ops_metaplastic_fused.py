"""The fused C++ kernel of metaplastic attention (``mode="fused"``) against the plain-loop reference:
outputs, final state and every gradient (prior and initial state included), float64 gradcheck,
threads, ``mode="auto"``, and the build/fallback path. The special cases and the state hand-over
run for every mode in test_ops_metaplastic.py.

Skipped only where the machine has no C++ compiler at all; a compiler that fails is a failure."""

import shutil

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

from routemem.ops import metaplastic_attention, native
from routemem.ops.metaplastic import fused
from routemem.ops.metaplastic.reference import metaplastic_reference

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++")), reason="no C++ compiler on this machine")


def run_fused(inputs, prior, scale, state, with_uncertainty, chunk_size):
    return fused.metaplastic_fused(*inputs, prior, scale, state, with_uncertainty, chunk_size)


def test_the_kernel_builds_here():
    assert fused.available()


@pytest.mark.parametrize("with_uncertainty", [True, False], ids=["uncertainty", "no-uncertainty"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-start", "initial-state"])
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("T", [1, 7, 64, 100])
def test_fused_matches_reference_outputs_and_gradients(T, chunk_size, with_state, with_uncertainty):
    inputs = make_inputs(T, seed=T + chunk_size)  # head 1 decays strongly (log_alpha down to -5)
    state = make_state() if with_state else None
    prior = PRIOR.clone().requires_grad_()
    leaves = [x.requires_grad_() for x in (*inputs, *(state or ()))] + [prior]
    scale = DK ** -0.5
    expected = flat_outputs(metaplastic_reference(*inputs, prior, scale, state, with_uncertainty))
    actual = flat_outputs(run_fused(inputs, prior, scale, state, with_uncertainty, chunk_size))
    names = ("o", "uncertainty", "final mu", "final importance")
    for name, a, e in zip(names, actual, expected):
        if e is None:
            assert a is None, name
            continue
        assert a.shape == e.shape and a.dtype == e.dtype
        assert_close(a, e, name=name)

    g = torch.Generator().manual_seed(7)  # a loss that reads every output
    used = [e for e in expected if e is not None]
    weights = [torch.randn(e.shape, generator=g) for e in used]
    def loss(outputs):
        return sum((w * x).sum() for w, x in zip(weights, [x for x in outputs if x is not None]))

    grads_expected = torch.autograd.grad(loss(expected), leaves)
    grads_actual = torch.autograd.grad(loss(actual), leaves)
    names = ("q", "k", "v", "beta", "log_alpha") + (("initial mu", "initial importance") if with_state else ()) + ("prior",)
    for name, a, e in zip(names, grads_actual, grads_expected):
        assert_close(a, e, name="d " + name)


def test_only_the_output_used_gives_the_same_gradients():
    """Backward with no gradient flowing into the final state (autograd passes None for it)."""
    inputs = [x.requires_grad_() for x in make_inputs(30)]
    grads = []
    for mode in ("reference", "fused"):
        o = metaplastic_attention(*inputs, i_prior=PRIOR, mode=mode, chunk_size=8)
        grads.append(torch.autograd.grad(o.pow(2).sum(), inputs))
    for a, e in zip(*grads[::-1]):
        assert_close(a, e)


def test_float64_matches_reference_to_rounding():
    inputs = make_inputs(50, dtype=torch.float64)
    state = make_state(dtype=torch.float64)
    expected = flat_outputs(metaplastic_reference(*inputs, PRIOR.double(), 0.3, state, True))
    actual = flat_outputs(run_fused(inputs, PRIOR.double(), 0.3, state, True, 16))
    for a, e in zip(actual, expected):
        assert a.dtype == torch.float64
        assert_close(a, e, rtol=1e-12)


@pytest.mark.parametrize("chunk_size", [2, 4, 64])
def test_gradcheck_float64(chunk_size):
    def fn(q, k, v, beta, log_alpha, mu0, importance0, prior):
        return tuple(flat_outputs(run_fused((q, k, v, beta, log_alpha), prior, 0.6, (mu0, importance0),
                                            True, chunk_size)))

    assert torch.autograd.gradcheck(fn, gradcheck_inputs(), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_empty_sequence_returns_the_initial_state():
    q, k, v, beta, log_alpha = make_inputs(0)
    state = make_state()
    o, (mu, importance) = metaplastic_attention(q, k, v, beta, log_alpha, initial_state=state,
                                                output_final_state=True, mode="fused")
    assert o.shape == (B, 0, H, DV)
    assert_close(mu, state[0], rtol=1e-6)
    assert_close(importance, state[1], rtol=1e-6)


def test_non_contiguous_inputs():
    q, k, v, beta, log_alpha = make_inputs(20)
    strided = [x.transpose(0, 1).contiguous().transpose(0, 1) for x in (q, k, v, beta, log_alpha)]
    assert not strided[0].is_contiguous()
    expected = metaplastic_attention(q, k, v, beta, log_alpha, mode="reference")
    assert_close(metaplastic_attention(*strided, mode="fused"), expected)


def test_threads_split_rows_without_changing_results():
    """Rows (batch, head) are independent, so any number of threads gives bitwise the same."""
    inputs = [x.requires_grad_() for x in make_inputs(33, B=3, H=3)]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            o = metaplastic_attention(*inputs, mode="fused", chunk_size=8)
            results.append((o, *torch.autograd.grad(o.sum(), inputs)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_auto_picks_fused_on_cpu_and_rejects_what_fused_cannot_run():
    q, k, v, beta, log_alpha = make_inputs(12)
    auto = metaplastic_attention(q, k, v, beta, log_alpha, mode="auto", chunk_size=8)
    assert torch.equal(auto, metaplastic_attention(q, k, v, beta, log_alpha, mode="fused", chunk_size=8))
    half = [x.to(torch.bfloat16) for x in (q, k, v, beta, log_alpha)]
    with pytest.raises(ValueError, match="float32 or float64"):
        metaplastic_attention(*half, mode="fused")
    assert metaplastic_attention(*half, mode="auto").dtype == torch.bfloat16  # chunk form instead


def test_a_failing_compiler_makes_auto_fall_back_to_chunk(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTEMEM_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", shutil.which("false"))
    native.forget_builds()
    try:
        assert not fused.available()
        with pytest.raises(RuntimeError, match="failed"):
            native.load(fused.KERNEL.source, fused.KERNEL.signatures)
        monkeypatch.setenv("CXX", "/nonexistent/compiler")  # would fail differently if tried again
        with pytest.raises(RuntimeError, match="false failed"):  # the first failure, remembered
            native.load(fused.KERNEL.source, fused.KERNEL.signatures)
        q, k, v, beta, log_alpha = make_inputs(12)
        expected = metaplastic_attention(q, k, v, beta, log_alpha, mode="chunk")
        assert torch.equal(metaplastic_attention(q, k, v, beta, log_alpha, mode="auto"), expected)
        assert not list((tmp_path / "kernels").iterdir())  # no half-built library left behind
    finally:
        native.forget_builds()


def test_the_build_is_cached_by_source_and_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTEMEM_CACHE", str(tmp_path))
    compiler = shutil.which("c++") or shutil.which("g++")
    first = native.build(fused.KERNEL.source, compiler)
    stamp = first.stat().st_mtime_ns
    assert native.build(fused.KERNEL.source, compiler) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [first.name]
    edited = tmp_path / fused.KERNEL.source.name  # another source text: another library
    edited.write_text(fused.KERNEL.source.read_text() + "\n// edited\n")
    assert native.build(edited, compiler) != first


def _fused_in_child(queue):
    torch.set_num_threads(2)
    q, k, v, beta, log_alpha = make_inputs(20)
    queue.put(metaplastic_attention(q, k, v, beta, log_alpha, mode="fused").sum().item())


def test_a_forked_child_runs_the_kernel_on_its_own_threads():
    """The kernel's thread pool lives on in the parent; a forked child (a DataLoader worker, say)
    must start its own rather than wait on threads it does not have."""
    import multiprocessing

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, k, v, beta, log_alpha = make_inputs(20)
        expected = metaplastic_attention(q, k, v, beta, log_alpha, mode="fused").sum().item()  # parent's pool
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_fused_in_child, args=(queue,))
        child.start()
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
        assert child.exitcode == 0, "the forked child hung or failed"
        assert queue.get(timeout=5) == expected
    finally:
        torch.set_num_threads(threads)
