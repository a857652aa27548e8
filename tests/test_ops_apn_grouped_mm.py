"""APN's ``mode="grouped_mm"`` (torch's grouped_mm on patch-sorted rows) against the reference:
outputs and every gradient in float32, bfloat16 and float16, widths whose rows are not 16-byte
multiples (padded), patches no token chose (exactly zero gradients), empty input, the stride-0
gradient of ``out.sum()``, and ``torch.compile(fullgraph=True)``. Also the facts about grouped_mm
that the design rests on (it refuses float64 and unaligned strides), and the rule ``auto`` follows.
On the CPU; one case runs on CUDA too (``-m cuda``), where torch's grouped_mm is another kernel."""

import pytest
import torch
import torch.nn.functional as F
from apn_inputs import assert_close_scaled, forward_backward, good_inputs, make_inputs
from devices import on_cuda

import routemem.ops.apn as apn_ops
import routemem.ops.apn.grouped_mm as grouped_mm_module
from routemem.ops.apn import fused, patch_mixture
from routemem.ops.apn.grouped_mm import (
    grouped_matmul,
    grouped_matmul_backward,
    sort_by_patch,
)

GRADS = ("out", "grad z", "grad weights", "grad V", "grad U", "grad a", "grad b")


def fixed_routing(N, K, k, dtype, seed=7, unused=()):
    """indices [N, k] in [0, K) avoiding the patches in ``unused``, and weights [N, k]."""
    gen = torch.Generator().manual_seed(seed)
    used = torch.tensor([i for i in range(K) if i not in unused])
    indices = used[torch.randint(0, used.numel(), (N, k), generator=gen)]
    return indices, torch.rand(N, k, generator=gen, dtype=torch.float64).to(dtype)


@pytest.fixture
def calls(monkeypatch):
    """Which patch-mixture forms ``patch_mixture`` ran: their names, in call order (grouped_mm's
    own fallback to grouped included)."""
    seen = []

    def spy(mode, real):
        def run(*inputs):
            seen.append(mode)
            return real(*inputs)
        return run

    for mode in ("grouped", "fused", "grouped_mm"):
        name = f"patch_mixture_{mode}"
        monkeypatch.setattr(apn_ops, name, spy(mode, getattr(apn_ops, name)))
        if mode == "grouped":
            monkeypatch.setattr(grouped_mm_module, name, getattr(apn_ops, name))
    return seen


@pytest.mark.parametrize("N, d, K, r, k", [
    (13, 8, 5, 4, 2),  # aligned: no padding
    (33, 16, 8, 16, 3),
    (20, 8, 6, 4, 6),  # k = K: every patch gets every token
    (13, 5, 5, 3, 2),  # neither r nor d a multiple of 4 floats: both padded
    (9, 5, 4, 4, 2),  # d padded only
    (9, 8, 4, 3, 2),  # r padded only
    (7, 6, 3, 1, 1),
])
def test_matches_reference_through_route_float32(N, d, K, r, k):
    x = make_inputs(N, d, K, r, torch.float32)
    expected = forward_backward("reference", x, k)
    actual = forward_backward("grouped_mm", x, k)
    assert actual["out"].dtype == torch.float32
    assert_close_scaled(actual, expected, rtol=1e-5)
    for name in GRADS:  # the comparison is not vacuous
        assert expected[name].abs().max() > 0, name


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["f32", "bf16"])
@pytest.mark.parametrize("d, r", [(16, 8), (5, 3)])
@pytest.mark.parametrize("device", [on_cuda("cuda", id="cuda")])
def test_on_cuda_matches_reference(device, d, r, dtype, rtol):
    x = make_inputs(30, d, 6, r, dtype, device=device)
    indices, weights = fixed_routing(30, 6, 2, dtype, unused=(4,))
    actual = forward_backward("grouped_mm", x, 2, indices=indices.to(device), weights=weights.to(device))
    assert actual["out"].device.type == "cuda" and (actual["grad U"][4] == 0).all()
    wide = {n: t.double() for n, t in x.items()}
    expected = forward_backward("reference", wide, 2, indices=indices.to(device), weights=weights.double().to(device))
    assert_close_scaled({n: t.double() if t.is_floating_point() else t for n, t in actual.items()}, expected, rtol)


@pytest.mark.parametrize("dtype, rtol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)], ids=["bf16", "f16"])
@pytest.mark.parametrize("r", [4, 8])  # in half precision a 16-byte row is 8 values: r = 4 is padded
def test_half_precision_matches_float32_reference(dtype, rtol, r):
    """grouped_mm takes bfloat16 and float16: held to the float32 reference on the same (rounded)
    inputs, within that precision."""
    x = make_inputs(24, 12, 5, r, dtype)
    indices, weights = fixed_routing(24, 5, 2, dtype)
    actual = forward_backward("grouped_mm", x, 2, indices=indices, weights=weights)
    assert actual["out"].dtype == dtype
    wide = {n: t.float() for n, t in x.items()}
    expected = forward_backward("reference", wide, 2, indices=indices, weights=weights.float())
    assert_close_scaled({n: t.float() if t.is_floating_point() else t for n, t in actual.items()}, expected, rtol)


def test_float64_runs_grouped(calls):
    """torch's grouped_mm has no float64 (checked below): the mode runs grouped, the same function
    (what a float64 gradcheck of a model in this mode needs)."""
    x = make_inputs(13, 6, 5, 3, torch.float64)
    expected = forward_backward("reference", x, 2)
    actual = forward_backward("grouped_mm", x, 2)
    assert calls == ["grouped_mm", "grouped"] and actual["out"].dtype == torch.float64
    assert_close_scaled(actual, expected, rtol=1e-12)


def test_grouped_mm_facts_the_design_rests_on():
    """If torch lifts one of these limits, the padding or the float64 refusal can go."""
    offs = torch.tensor([2, 2, 6], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="Double"):
        F.grouped_mm(torch.randn(6, 4, dtype=torch.float64), torch.randn(3, 4, 8, dtype=torch.float64), offs=offs)
    with pytest.raises(RuntimeError, match="16 bytes"):
        F.grouped_mm(torch.randn(6, 3), torch.randn(3, 3, 8), offs=offs)  # rows of 3 floats
    with pytest.raises(RuntimeError, match="strides"):  # the stride-0 gradient of out.sum()
        a, b = torch.randn(6, 4, requires_grad=True), torch.randn(3, 4, 8, requires_grad=True)
        F.grouped_mm(a, b, offs=offs).sum().backward()


@pytest.mark.parametrize("layout", ["every other column", "transposed", "offset by one float"])
def test_strided_U_matches_reference(layout):
    """U as a view that is not contiguous or not 16-byte aligned (gradients flow to its base)."""
    K, d, r = 4, 8, 4
    x = make_inputs(9, d, K, r, torch.float32)
    indices, weights = fixed_routing(9, K, 2, torch.float32)
    base, view = {
        "every other column": (torch.zeros(K, d, 2 * r), lambda t: t[:, :, ::2]),
        "transposed": (torch.zeros(K, r, d), lambda t: t.transpose(1, 2)),
        "offset by one float": (torch.zeros(K * d * r + 1), lambda t: t[1:].view(K, d, r)),
    }[layout]
    view(base).copy_(x["U"])  # the same numbers in that layout
    results = []
    for mode in ("grouped_mm", "reference"):
        leaf = base.clone().requires_grad_()
        U = view(leaf)
        assert U.is_contiguous() == (layout == "offset by one float")
        out = patch_mixture(x["z"], indices, weights, x["V"], U, x["a"], x["b"], mode=mode)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        results.append({"out": out.detach(), "grad U": view(leaf.grad)})
    assert_close_scaled(*results, rtol=1e-5)


def test_unrouted_patches_get_exactly_zero_gradient():
    N, d, K, r, k = 40, 5, 7, 3, 2  # unaligned: the padded path
    x = make_inputs(N, d, K, r, torch.float32)
    indices, weights = fixed_routing(N, K, k, torch.float32, unused=(0, 3, 6))  # first, middle, last
    assert set(indices.unique().tolist()) == {1, 2, 4, 5}
    V, U, a, b = (x[n].clone().requires_grad_() for n in ("V", "U", "a", "b"))
    out = patch_mixture(x["z"], indices, weights, V, U, a, b, mode="grouped_mm")
    (out * torch.randn(out.shape)).sum().backward()
    for name, p in (("U", U), ("a", a), ("b", b)):
        for i in (0, 3, 6):
            assert (p.grad[i] == 0).all(), f"grad {name}[{i}] not exactly 0"
        for i in (1, 2, 4, 5):
            assert (p.grad[i] != 0).any(), f"routed patch {i} got no gradient for {name}"


def test_sort_by_patch_offsets_are_group_ends():
    indices = torch.tensor([[3, 0], [3, 1], [0, 3]])
    order, patch, offs = sort_by_patch(indices, 5)
    assert offs.dtype == torch.int32 and offs.tolist() == [2, 3, 3, 6, 6]  # patches 2 and 4 empty
    assert patch.tolist() == [0, 0, 1, 3, 3, 3]
    assert order.tolist() == [1, 4, 3, 0, 2, 5]  # stable: ties keep their flattened order


def test_empty_input():
    x = make_inputs(0, 4, 3, 2, torch.float32)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    indices, weights = torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, requires_grad=True)
    out = patch_mixture(leaves["z"], indices, weights, leaves["V"], leaves["U"], leaves["a"], leaves["b"],
                        mode="grouped_mm")
    assert out.shape == (0, 4) and out.dtype == torch.float32
    out.sum().backward()  # the graph is kept: a training step on an empty batch does not crash
    for name in ("V", "U", "a", "b"):
        g = leaves[name].grad
        assert g is not None and (g == 0).all(), name


@pytest.mark.parametrize("r", [4, 3])  # unpadded, where grouped_mm's own gradient would see stride 0
def test_stride_zero_upstream_gradient(r):
    x = make_inputs(11, 8, 4, r, torch.float32)
    indices, weights = fixed_routing(11, 4, 2, torch.float32)
    grads = []
    for mode in ("grouped_mm", "reference"):
        leaves = [t.clone().requires_grad_() for t in (x["z"], weights, x["V"], x["U"], x["a"], x["b"])]
        z, w, V, U, a, b = leaves
        patch_mixture(z, indices, w, V, U, a, b, mode=mode).sum().backward()  # d out = ones, stride 0
        grads.append({n: t.grad for n, t in zip(("z", "w", "V", "U", "a", "b"), leaves)})
    assert_close_scaled(*grads, rtol=1e-5)
    # the custom op on its own, where the stride-0 gradient reaches it directly
    phi, U = torch.randn(6, 4, requires_grad=True), torch.randn(3, 8, 4, requires_grad=True)
    grouped_matmul(phi, U.transpose(1, 2), torch.tensor([2, 2, 6], dtype=torch.int32)).sum().backward()
    torch.testing.assert_close(phi.grad, torch.cat([U[0].sum(0).expand(2, 4), U[2].sum(0).expand(4, 4)]).detach())
    assert (U.grad[1] == 0).all() and (U.grad[0] != 0).all()


def test_compiled_fullgraph_equals_eager():
    """One small compile. ``aot_eager`` keeps CI fast: it traces the whole graph (dynamo, fake
    tensors, the backward graph), which is where grouped_mm fails in float32 without the custom
    op; inductor's code generation (checked by hand, see the bench's --compile) adds a C++ build."""
    x = make_inputs(13, 5, 5, 3, torch.float32)  # unaligned: the padding is traced too
    indices, weights = fixed_routing(13, 5, 2, torch.float32, unused=(2,))
    compiled = torch.compile(lambda *t: patch_mixture(*t, mode="grouped_mm"), fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, lambda *t: patch_mixture(*t, mode="grouped_mm")):
        leaves = [t.clone().requires_grad_() for t in (x["z"], weights, x["V"], x["U"], x["a"], x["b"])]
        z, w, V, U, a, b = leaves
        out = fn(z, indices, w, V, U, a, b)
        out.sum().backward()
        results.append({"out": out.detach(), **{n: t.grad for n, t in zip("zwVUab", leaves)}})
    assert_close_scaled(*results, rtol=1e-6)
    assert (results[0]["U"][2] == 0).all()


def test_custom_ops_pass_opcheck():
    """The registrations compile relies on: schema, fake (shapes), autograd, and a traced graph."""
    phi, U = torch.randn(6, 4, requires_grad=True), torch.randn(3, 8, 4, requires_grad=True)
    offs = torch.tensor([2, 2, 6], dtype=torch.int32)  # group 1 empty
    torch.library.opcheck(grouped_matmul, (phi, U.transpose(1, 2), offs))
    torch.library.opcheck(grouped_matmul_backward, (torch.randn(6, 8), phi.detach(), U.detach().transpose(1, 2), offs))


# --- auto -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused_applies", [True, False], ids=["fused-built", "no-fused"])
def test_auto_on_cpu_is_fused_then_grouped_mm_for_float32_then_grouped(calls, monkeypatch, fused_applies):
    """The measured rule (routemem bench apn): fused beats grouped_mm beats grouped on a CPU."""
    monkeypatch.setattr(fused, "applies_to", lambda z: fused_applies and z.dtype in (torch.float32, torch.float64))
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        patch_mixture(**good_inputs(dtype), mode="auto")
    if fused_applies:
        assert calls == ["fused", "fused", "grouped"]
    else:
        assert calls == ["grouped_mm", "grouped", "grouped"]
