"""Tests of routemem.ops.apn (Attractor Patch Network ops): cosine top-k routing held equal to a
brute-force computation, the grouped patch mixture and the fused kernel held equal to the per-patch
loop (outputs and every gradient, through the router too), float64 gradcheck, exact zero gradients
for unrouted patches, the load-balance loss and the routing diagnostics, input validation and empty
input. The fused kernel's own cases are in test_ops_apn_fused.py. Tests that take ``device`` run on
the CPU and on CUDA (conftest.py); the fused kernel is CPU code, so on CUDA ``auto`` must pick the
grouped form and ``fused`` must refuse."""

import math

import pytest
import torch

from routemem.ops.apn import (
    MODES,
    Routing,
    group_by_patch,
    load_balance_loss,
    patch_load,
    patch_mixture,
    route,
    routing_stats,
)
from routemem.ops.apn.grouped import patch_mixture_grouped

from apn_inputs import D0, K0, R0, assert_close_scaled, forward_backward, good_inputs, make_inputs
from devices import on_cuda
from op_checks import needs_compiler, on_devices

# (mode, device): every fast form, held equal to the reference; fused on the CPU only
FAST = on_devices("grouped", "fused")
ALL_MODES = on_devices("reference", "grouped", "fused", "auto")


def brute_force_route(z, prototypes, k, tau):
    """Per token: cosine via explicit dot products and norms, sort all K, keep the first k,
    softmax over the kept. Built from scalar tensor ops so autograd can differentiate it too."""
    N, K = z.shape[0], prototypes.shape[0]
    rows_idx, rows_w, rows_s = [], [], []
    for n in range(N):
        zn = z[n]
        z_norm = (zn * zn).sum().sqrt()
        scores = []
        for i in range(K):
            p = prototypes[i]
            scores.append((zn * p).sum() / (z_norm * (p * p).sum().sqrt()) / tau)
        order = sorted(range(K), key=lambda i: -scores[i].item())[:k]
        kept = torch.stack([scores[i] for i in order])
        e = (kept - kept.max()).exp()
        rows_idx.append(order)
        rows_w.append(e / e.sum())
        rows_s.append(torch.stack(scores))
    return torch.tensor(rows_idx, dtype=torch.long).view(N, k), torch.stack(rows_w), torch.stack(rows_s)


# --- routing --------------------------------------------------------------------------------


@pytest.mark.parametrize("N, d, K, k", [(1, 4, 3, 1), (6, 5, 4, 1), (9, 8, 6, 3), (7, 6, 5, 5), (1, 3, 4, 4)])
@pytest.mark.parametrize("learned_tau", [False, True])
def test_route_equals_brute_force(N, d, K, k, learned_tau):
    x = make_inputs(N, d, K, 1)
    z, prototypes = x["z"].requires_grad_(), x["prototypes"].requires_grad_()
    log_tau = torch.tensor(math.log(0.3), dtype=torch.float64, requires_grad=True)
    tau = log_tau.exp() if learned_tau else 0.3
    idx, w, s = brute_force_route(z, prototypes, k, tau)
    gaps = s.detach().sort(-1, descending=True).values.diff(dim=-1).abs()
    assert gaps.numel() == 0 or gaps.min() > 1e-6  # ties-free data: the top-k set is well defined

    routing = route(z, prototypes, k, tau)
    assert isinstance(routing, Routing)
    assert routing.indices.dtype == torch.long and routing.indices.shape == (N, k)
    assert torch.equal(routing.indices, idx), "top-k indices (best first) differ from sorting all K"
    torch.testing.assert_close(routing.scores, s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(routing.weights, w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(N, dtype=torch.float64))

    # gradients of weights and scores (w.r.t. z, prototypes and a learned tau) match too
    gen = torch.Generator().manual_seed(3)
    cw = torch.randn(N, k, generator=gen, dtype=torch.float64)
    cs = torch.randn(N, K, generator=gen, dtype=torch.float64)
    leaves = [z, prototypes] + ([log_tau] if learned_tau else [])
    got = torch.autograd.grad((routing.weights * cw).sum() + (routing.scores * cs).sum(), leaves,
                              retain_graph=True)  # tau = exp(log_tau) is shared by both graphs
    want = torch.autograd.grad((w * cw).sum() + (s * cs).sum(), leaves)
    for name, g, e in zip(["z", "prototypes", "log_tau"], got, want):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"grad {name}\n{m}")
    if learned_tau:
        assert got[2].abs() > 0


def test_route_ignores_norms_and_scales_with_tau():
    x = make_inputs(8, 6, 5, 1)
    base = route(x["z"], x["prototypes"], 2, 0.5)
    scaled = route(3.0 * x["z"], 0.1 * x["prototypes"], 2, 0.5)  # cosine: norms do not matter
    assert torch.equal(base.indices, scaled.indices)
    torch.testing.assert_close(base.scores, scaled.scores)
    colder = route(x["z"], x["prototypes"], 2, 0.25)
    torch.testing.assert_close(colder.scores, 2 * base.scores)
    assert torch.equal(colder.indices, base.indices)
    assert base.scores.abs().max() <= 1 / 0.5 + 1e-12  # |cos| <= 1


# --- patch mixture: grouped, fused == reference -----------------------------------------------------


SHAPES = [  # N, d, K, r, k
    (1, 4, 3, 2, 1),  # one token
    (1, 6, 4, 3, 4),  # one token, k = K
    (7, 6, 3, 2, 2),  # K does not divide N
    (13, 8, 5, 3, 2),
    (33, 16, 8, 4, 3),
    (20, 8, 6, 4, 6),  # k = K: every patch gets every token
]


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("N, d, K, r, k", SHAPES)
@pytest.mark.parametrize("mode, device", FAST)
def test_fast_modes_match_reference_through_route(N, d, K, r, k, dtype, rtol, mode, device):
    x = make_inputs(N, d, K, r, dtype, device=device)
    expected = forward_backward("reference", x, k)
    actual = forward_backward(mode, x, k)
    assert actual["out"].dtype == dtype
    assert_close_scaled(actual, expected, rtol)
    # the comparison is not vacuous: output and the gradients we compare are non-trivial
    for name in ("out", "grad z", "grad V", "grad U", "grad a", "grad b", "grad weights"):
        assert expected[name].abs().max() > 0, name
    if k > 1:  # with k = 1 the weight is softmax of one score: constant, no prototype gradient
        assert expected["grad prototypes"].abs().max() > 0


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("mode, device", FAST)
def test_fast_modes_match_reference_unbalanced_routing(k, dtype, rtol, mode, device):
    x = make_inputs(40, 8, 6, 3, dtype, unbalanced=True, device=device)
    expected = forward_backward("reference", x, k)
    load = patch_load(expected["indices"][:, 0], 6)
    assert load[0] >= 0.8 and (load == 0).any(), load  # most tokens' first choice is patch 0
    assert_close_scaled(forward_backward(mode, x, k), expected, rtol)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("mode, device", FAST)
def test_fast_modes_match_reference_fixed_indices(dtype, rtol, mode, device):
    """Hand-made indices: 95% of slot 0 on patch 2, patches 0 and 5 never chosen, and repeated
    patches within a row (the op must add both slots' contributions)."""
    N, d, K, r, k = 60, 8, 6, 3, 3
    x = make_inputs(N, d, K, r, dtype, device=device)
    del x["prototypes"]
    gen = torch.Generator().manual_seed(7)
    indices = torch.randint(1, 5, (N, k), generator=gen)
    indices[: int(0.95 * N), 0] = 2
    indices[3, 1] = indices[3, 2] = 4  # a duplicate
    indices = indices.to(device)
    weights = torch.rand(N, k, generator=gen, dtype=torch.float64).to(device, dtype)
    expected = forward_backward("reference", x, k, indices=indices, weights=weights)
    actual = forward_backward(mode, x, k, indices=indices, weights=weights)
    assert_close_scaled(actual, expected, rtol)
    for name in ("grad U", "grad a", "grad b"):  # never-chosen patches: exactly zero in both
        for i in (0, 5):
            assert torch.equal(actual[name][i], torch.zeros_like(actual[name][i])), (name, i)


def test_reference_is_the_formula():
    """Reference mode against the docstring formula, token by token and slot by slot."""
    N, d, K, r, k = 5, 4, 3, 2, 2
    x = make_inputs(N, d, K, r)
    indices = torch.tensor([[0, 1], [2, 2], [1, 0], [2, 1], [0, 0]])
    weights = torch.rand(N, k, dtype=torch.float64)
    for mode in MODES:
        out = patch_mixture(x["z"], indices, weights, x["V"], x["U"], x["a"], x["b"], mode=mode)
        for n in range(N):
            u = x["V"].T @ x["z"][n]
            want = sum(weights[n, j] * x["U"][i] @ (u * torch.sigmoid(x["a"][i] * u + x["b"][i]))
                       for j, i in enumerate(indices[n].tolist()))
            torch.testing.assert_close(out[n], want, rtol=1e-12, atol=1e-12,
                                       msg=lambda m, n=n, mode=mode: f"{mode} token {n}\n{m}")


def test_group_by_patch_layout():
    indices = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 2]])
    order, slot, tile_patch = group_by_patch(indices, 4, tile=2)
    flat = indices.flatten()
    patch = flat[order]
    assert bool((patch[1:] >= patch[:-1]).all())  # sorted by patch
    assert order.tolist()[:2] == [1, 4]  # stable: patch 0's assignments in token order
    # counts (2, 1, 5, 0) -> tiles of 2 rows: patch 0 one, patch 1 one, patch 2 three, patch 3 none
    assert tile_patch.tolist() == [0, 1, 2, 2, 2]
    assert torch.equal(tile_patch[slot // 2], patch)  # every assignment sits in a tile of its patch
    assert slot.unique().numel() == flat.numel()  # no two assignments share a row
    assert sorted(slot[patch == 2].tolist()) == [4, 5, 6, 7, 8]  # patch 2 fills its tiles in order


@pytest.mark.parametrize("tile", [1, 3, 8, 64])
def test_grouped_equals_reference_for_any_tile_size(tile, device):
    """Patches with several tiles, a partly filled last tile, and unused patches."""
    x = make_inputs(120, 6, 5, 3, unbalanced=True, device=device)
    routing = route(x["z"], x["prototypes"], 2, 0.1)
    counts = torch.bincount(routing.indices.flatten(), minlength=5)
    assert int(counts.max()) > 64 and int((counts == 0).sum()) >= 1  # the shapes this test is for
    weights = routing.weights.detach()
    ref = patch_mixture(x["z"], routing.indices, weights, x["V"], x["U"], x["a"], x["b"], mode="reference")
    out = patch_mixture_grouped(x["z"], routing.indices, weights, x["V"], x["U"], x["a"], x["b"], tile=tile)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


# --- gradcheck ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, device", ALL_MODES)
def test_gradcheck_float64(mode, device):
    N, d, K, r = 5, 3, 4, 2
    x = make_inputs(N, d, K, r, device=device)
    indices = torch.tensor([[0, 2], [2, 0], [3, 3], [0, 1], [2, 3]], device=device)  # a repeated patch in row 2
    weights = torch.rand(N, 2, dtype=torch.float64).to(device)

    def fn(z, w, V, U, a, b, idx):
        return patch_mixture(z, idx, w, V, U, a, b, mode=mode)

    inputs = tuple(t.clone().requires_grad_() for t in (x["z"], weights, x["V"], x["U"], x["a"], x["b"]))
    assert torch.autograd.gradcheck(fn, inputs + (indices,))


def test_gradcheck_route_float64():
    x = make_inputs(4, 3, 5, 1)
    log_tau = torch.tensor(math.log(0.7), dtype=torch.float64)

    def fn(z, prototypes, log_tau):  # the kept set is fixed under eps for this ties-free data
        routing = route(z, prototypes, 3, log_tau.exp())
        return routing.weights, routing.scores

    inputs = tuple(t.clone().requires_grad_() for t in (x["z"], x["prototypes"], log_tau))
    assert torch.autograd.gradcheck(fn, inputs)


# --- locality: unrouted patches get exactly zero gradient ------------------------------------


@pytest.mark.parametrize("mode, device", ALL_MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unrouted_patches_get_exactly_zero_gradient(mode, device, dtype):
    N, d, K, r, k = 11, 6, 5, 3, 2
    x = make_inputs(N, d, K, r, dtype, device=device)
    gen = torch.Generator().manual_seed(5)
    used = torch.tensor([0, 2, 3])
    indices = used[torch.randint(0, 3, (N, k), generator=gen)]
    assert set(indices.unique().tolist()) == {0, 2, 3}
    weights = torch.rand(N, k, generator=gen, dtype=torch.float64).to(device, dtype)
    indices = indices.to(device)
    V, U, a, b = (x[n].clone().requires_grad_() for n in ("V", "U", "a", "b"))
    out = patch_mixture(x["z"], indices, weights, V, U, a, b, mode=mode)
    (out * torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device, dtype)).sum().backward()
    for name, p in (("U", U), ("a", a), ("b", b)):
        assert p.grad is not None, name
        for i in (1, 4):
            assert torch.equal(p.grad[i], torch.zeros_like(p.grad[i])), f"{mode}: grad {name}[{i}] not exactly 0"
        for i in (0, 2, 3):
            assert (p.grad[i] != 0).any(), f"{mode}: routed patch {i} got no gradient for {name}"
    assert (V.grad != 0).any()


# --- load-balance loss ----------------------------------------------------------------------


def test_load_balance_is_one_when_routing_is_uniform():
    K, k = 4, 2
    indices = torch.tensor([[0, 1], [2, 3]] * 4)  # every patch gets 4 of the 16 assignments
    assert torch.equal(patch_load(indices, K), torch.full((K,), 0.25))
    for scores in (torch.zeros(8, K, dtype=torch.float64), torch.randn(8, K, dtype=torch.float64)):
        # uniform f makes the loss K * (1/K) * sum_i P_i = 1 whatever the router probabilities
        routing = Routing(indices, torch.full((8, k), 0.5, dtype=torch.float64), scores)
        torch.testing.assert_close(load_balance_loss(routing).double(), torch.tensor(1.0, dtype=torch.float64))


def test_load_balance_is_about_K_when_one_patch_takes_everything():
    K, N = 6, 10
    scores = torch.randn(N, K, dtype=torch.float64)
    indices = torch.full((N, 1), 2)
    routing = Routing(indices, torch.ones(N, 1, dtype=torch.float64), scores)
    expected = K * scores.softmax(-1)[:, 2].mean()
    torch.testing.assert_close(load_balance_loss(routing).double(), expected)
    scores[:, 2] = 50.0  # the router is sure of patch 2 too: the worst case, K
    loss = load_balance_loss(Routing(indices, routing.weights, scores))
    assert K * (1 - 1e-6) < loss.item() <= K * (1 + 1e-6)


def test_load_balance_formula_and_gradient():
    N, d, K, k, tau = 12, 5, 4, 2, 0.4
    x = make_inputs(N, d, K, 1)
    z, prototypes = x["z"].requires_grad_(), x["prototypes"].requires_grad_()
    loss = load_balance_loss(route(z, prototypes, k, tau))
    grads = torch.autograd.grad(loss, (z, prototypes))
    # brute force: f counted by hand (a constant), P the mean softmax over all K of the scores
    idx, _, s = brute_force_route(z, prototypes, k, tau)
    f = torch.tensor([sum(row.count(i) for row in idx.tolist()) / (N * k) for i in range(K)], dtype=torch.float64)
    expected = K * (f * s.softmax(-1).mean(0)).sum()
    torch.testing.assert_close(loss.double(), expected.detach())
    expected_grads = torch.autograd.grad(expected, (z, prototypes))
    for name, g, e in zip(("z", "prototypes"), grads, expected_grads):
        assert (g != 0).any(), f"load-balance loss gives {name} no gradient"
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"grad {name}\n{m}")
    # the count term alone carries no gradient: a loss built from it would train nothing
    fraction = patch_load(idx, K)
    assert not fraction.requires_grad and fraction.grad_fn is None
    assert not (K * (fraction * fraction).sum()).requires_grad
    torch.testing.assert_close(fraction.sum(), torch.tensor(1.0))


def test_load_balance_gradient_pushes_away_from_the_overloaded_patch():
    N, K = 8, 5
    scores = torch.randn(N, K, dtype=torch.float64, requires_grad=True)
    routing = Routing(torch.zeros(N, 1, dtype=torch.long), torch.ones(N, 1, dtype=torch.float64), scores)
    load_balance_loss(routing).backward()
    # d/ds_n0 = K/N P_n0 (1 - P_n0) > 0 and d/ds_nj = -K/N P_nj P_n0 < 0: descent lowers patch 0
    assert (scores.grad[:, 0] > 0).all() and (scores.grad[:, 1:] < 0).all()
    P = scores.detach().softmax(-1)
    torch.testing.assert_close(scores.grad[:, 0].double(), K / N * P[:, 0] * (1 - P[:, 0]), rtol=1e-5, atol=1e-8)


# --- routing diagnostics --------------------------------------------------------------------


def test_routing_stats_uniform():
    K = 4
    indices = torch.tensor([[0, 1], [2, 3], [3, 2], [1, 0]])
    stats = routing_stats(Routing(indices, torch.full((4, 2), 0.5), torch.zeros(4, K)))
    assert set(stats) == {"load_entropy", "router_entropy", "max_load", "unused_fraction"}
    for name, value in stats.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, name
    torch.testing.assert_close(stats["load_entropy"], torch.tensor(math.log(K)))
    torch.testing.assert_close(stats["router_entropy"], torch.tensor(math.log(K)))
    torch.testing.assert_close(stats["max_load"], torch.tensor(1 / K))
    assert stats["unused_fraction"].item() == 0.0


def test_routing_stats_hand_built():
    K = 4
    indices = torch.tensor([[0], [0], [0], [1]])  # load [3/4, 1/4, 0, 0]
    scores = torch.zeros(4, K, requires_grad=True)
    with torch.no_grad():
        scores[:, 0] = 100.0  # a sure router: entropy ~ 0
    stats = routing_stats(Routing(indices, torch.ones(4, 1), scores))
    assert all(not v.requires_grad for v in stats.values())
    torch.testing.assert_close(stats["load_entropy"], torch.tensor(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    torch.testing.assert_close(stats["max_load"], torch.tensor(0.75))
    torch.testing.assert_close(stats["unused_fraction"], torch.tensor(0.5))
    assert 0 <= stats["router_entropy"].item() < 1e-6
    # router entropy for arbitrary scores: the mean over tokens of -sum_i p log p
    scores = torch.randn(6, K, dtype=torch.float64)
    p = scores.softmax(-1)
    stats = routing_stats(Routing(torch.zeros(6, 1, dtype=torch.long), torch.ones(6, 1), scores))
    torch.testing.assert_close(stats["router_entropy"].double(), -(p * p.log()).sum(-1).mean(), rtol=1e-6, atol=1e-7)
    assert stats["load_entropy"].item() == 0.0 and stats["max_load"].item() == 1.0
    torch.testing.assert_close(stats["unused_fraction"], torch.tensor(0.75))


# --- input validation and edge cases ----------------------------------------------------------

BAD_INPUTS = {  # case: (argument replaced, its bad value given the good inputs, expected message)
    "z not 2-d": ("z", lambda x: x["z"][None], r"^z must be \[N, d\]"),
    "U not 3-d": ("U", lambda x: x["U"][0], r"^U must be \[K, d"),
    "U wrong d": ("U", lambda x: torch.randn(K0, D0 + 1, R0), r"^U must be \[K, d=4"),
    "indices wrong N": ("indices", lambda x: x["indices"][:-1], r"^indices must be \[N=6"),
    "indices 1-d": ("indices", lambda x: x["indices"][:, 0], r"^indices must be \[N=6"),
    "indices int32": ("indices", lambda x: x["indices"].int(), r"^indices must be torch.long"),
    "indices float": ("indices", lambda x: x["indices"].float(), r"^indices must be torch.long"),
    "indices >= K": ("indices", lambda x: x["indices"].index_fill(0, torch.tensor([2]), K0),
                     r"^indices must lie in \[0, 3\)"),
    "indices < 0": ("indices", lambda x: x["indices"].index_fill(0, torch.tensor([0]), -1),
                    r"^indices must lie in \[0, 3\)"),
    "weights shape": ("weights", lambda x: x["weights"][:, :1], r"^weights has shape"),
    "weights not a tensor": ("weights", lambda x: x["weights"].tolist(), r"^weights must be a torch.Tensor"),
    "V shape": ("V", lambda x: x["V"].T, r"^V has shape"),
    "a shape": ("a", lambda x: x["a"][:-1], r"^a has shape"),
    "b shape": ("b", lambda x: x["b"][:, None], r"^b has shape"),
    "weights dtype": ("weights", lambda x: x["weights"].double(), r"^weights has dtype torch.float64 but z"),
    "V dtype": ("V", lambda x: x["V"].double(), r"^V has dtype"),
    "U dtype": ("U", lambda x: x["U"].half(), r"^U has dtype"),
    "b dtype": ("b", lambda x: x["b"].double(), r"^b has dtype"),
    "unknown mode": ("mode", lambda x: "fast", r"^mode must be one of"),
}


@pytest.mark.parametrize("mode", ["reference", "grouped", needs_compiler("fused"), needs_compiler("auto")])
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_naming_the_culprit(case, mode):
    arg, bad_value, message = BAD_INPUTS[case]
    x = good_inputs()
    x["mode"] = mode
    patch_mixture(**x)  # the good inputs are fine
    x[arg] = bad_value(x)
    with pytest.raises(ValueError, match=message):
        patch_mixture(**x)


def test_modes():
    assert set(MODES) == {"reference", "grouped", "fused", "grouped_mm", "auto"}
    x = good_inputs()
    torch.testing.assert_close(patch_mixture(**x), patch_mixture(**x, mode="grouped"))  # grouped by default


@pytest.mark.parametrize("mode, device", FAST)
def test_empty_input(mode, device):
    x = make_inputs(0, 4, 3, 2, torch.float32, device=device)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    routing = route(leaves["z"], leaves["prototypes"], 2, 0.5)
    assert routing.indices.shape == (0, 2) and routing.weights.shape == (0, 2)
    out = patch_mixture(leaves["z"], routing.indices, routing.weights, leaves["V"], leaves["U"], leaves["a"],
                        leaves["b"], mode=mode)
    assert out.shape == (0, 4) and out.dtype == torch.float32
    out.sum().backward()  # the graph is kept: a training step on an empty batch does not crash
    for name in ("V", "U", "a", "b"):
        g = leaves[name].grad
        assert g is not None and torch.equal(g, torch.zeros_like(g)), name
    order, slot, tile_patch = group_by_patch(routing.indices, 3)
    assert order.numel() == slot.numel() == tile_patch.numel() == 0
    # reference mode returns the right (empty) shape as well
    ref = patch_mixture(x["z"], routing.indices, routing.weights.detach(), x["V"], x["U"], x["a"], x["b"],
                        mode="reference")
    assert ref.shape == (0, 4)


@pytest.mark.parametrize("device", [on_cuda("cuda", id="cuda")])
def test_on_cuda_auto_is_grouped_and_fused_refuses(device):
    """The fused kernel is CPU code: on CUDA ``auto`` runs the grouped form (and matches the
    reference), and asking for ``fused`` is a ValueError that names the way out."""
    x = make_inputs(30, 8, 6, 3, torch.float32, device=device)
    auto = forward_backward("auto", x, 2)
    assert auto["out"].device.type == "cuda"
    assert_close_scaled(auto, forward_backward("grouped", x, 2), rtol=1e-6)  # (index_add's order varies)
    assert_close_scaled(auto, forward_backward("reference", x, 2), rtol=1e-5)
    with pytest.raises(ValueError, match="mode='fused' is a CPU kernel.*mode='grouped'"):
        patch_mixture(**good_inputs(device=device), mode="fused")
