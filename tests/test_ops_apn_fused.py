"""APN's fused C++ kernel beyond what test_ops_apn.py runs for every fast mode: shapes that cover
each of its vector paths, ``mode="auto"`` and the fallback, and threads that split the tokens."""

import pytest
import torch
from apn_inputs import assert_close_scaled, forward_backward, good_inputs, make_inputs

from routemem.ops.apn import fused, patch_mixture


@pytest.mark.skipif(not fused.available(), reason="the fused kernel needs a C++ compiler")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("r", [3, 8, 16, 32, 64])
@pytest.mark.parametrize("d", [64, 100, 130])
def test_fused_matches_reference_at_shapes_its_vector_paths_cover(d, r, dtype):
    """The kernel works on 64-byte vectors (16 floats, 8 doubles): d in blocks of 4 vectors plus a
    remainder, and the code gradient vectorised over r when r is 1, 2 or 4 vectors (else one dot
    product per code entry). These widths cover each path, with and without remainders."""
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    x = make_inputs(24, d, 5, r, dtype)
    assert_close_scaled(forward_backward("fused", x, 2), forward_backward("reference", x, 2), rtol)


@pytest.mark.skipif(not fused.available(), reason="the fused kernel needs a C++ compiler")
def test_auto_is_fused_on_cpu_and_grouped_where_fused_cannot_run():
    x = good_inputs()
    assert torch.equal(patch_mixture(**x, mode="auto"), patch_mixture(**x, mode="fused"))
    half = {n: (t.to(torch.bfloat16) if t.is_floating_point() else t) for n, t in x.items()}
    with pytest.raises(ValueError, match="float32 or float64"):
        patch_mixture(**half, mode="fused")
    torch.testing.assert_close(patch_mixture(**half, mode="auto"), patch_mixture(**half, mode="grouped"))


@pytest.mark.skipif(not fused.available(), reason="the fused kernel needs a C++ compiler")
def test_fused_threads_split_tokens_and_sum_partial_gradients():
    """Tokens are split across threads; U, a, b gradients are per-thread partial sums added up."""
    x = make_inputs(50, 8, 6, 4)
    indices = torch.randint(0, 6, (50, 3))
    weights = torch.rand(50, 3, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x["z"], weights, x["V"], x["U"], x["a"], x["b"])]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            z, w, V, U, a, b = leaves
            out = patch_mixture(z, indices, w, V, U, a, b, mode="fused")
            results.append((out, *torch.autograd.grad(out.pow(2).sum(), leaves)))
    finally:
        torch.set_num_threads(threads)
    for one, many in zip(*results):
        torch.testing.assert_close(one, many, rtol=1e-12, atol=1e-12)  # only the summation order differs
