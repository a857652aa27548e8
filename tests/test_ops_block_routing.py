"""Block routing (routemem/ops/gated_sparse/block*.py): the gather and flex forms held equal to the
T x T masked softmax (outputs and every gradient, float64 for gather; flex's forward on the CPU, its
gradients on CUDA), ragged T, T shorter than a block, top_k_blocks 0 and beyond the block count;
the selection against a brute-force loop, ties to the lower block; zero gradient to the scores under
hard routing, a non-zero one under soft; causality by redrawing every later token at every position
(the scores computed from the redrawn q and k, so the selection's causality is tested too); float64
gradcheck; the oracle's mass and block concentration; input validation."""

import pytest
import torch
from devices import on_cuda

from op_checks import assert_close_scaled
from routemem.ops.gated_sparse import block_flex
from routemem.ops.gated_sparse.block import block_routed_attention
from routemem.ops.gated_sparse.block_flex import NO_CPU_BACKWARD
from routemem.ops.gated_sparse.block_select import (
    block_attention_mass, block_concentration, block_means, block_scores, select_past_blocks, selected_block_mask,
)

B, H, DK, DV = 2, 2, 4, 3
# (T, block_size, top_k_blocks): ragged T, one short block, k = 0, k beyond the past blocks
SHAPES = [(37, 8, 2), (32, 8, 1), (5, 8, 3), (29, 4, 0), (24, 4, 9)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """flex compiles once per shape; a fresh dynamo keeps the cases under its recompile limit."""
    torch._dynamo.reset()
    yield


def inputs(T, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, d, generator=g, dtype=dtype).to(device) for d in (DK, DK, DV)]


def run(x, block_size, gating, mode, top_k_blocks=None):
    """Output and the gradients of q, k, v (moba scores from q, k: the scores' gradient too)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in x)
    scores = block_scores(q, k, block_size, DK ** -0.5)
    extra = {"top_k_blocks": top_k_blocks} if gating == "hard" else {}
    out = block_routed_attention(q, k, v, scores, block_size=block_size, gating=gating, mode=mode, **extra)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out.device)
    (out * cotangent).sum().backward()
    return {"out": out.detach(), "grad q": q.grad, "grad k": k.grad, "grad v": v.grad}


@pytest.mark.parametrize("gating", ["hard", "soft"])
@pytest.mark.parametrize("T,block_size,top_k_blocks", SHAPES)
def test_gather_equals_reference(T, block_size, top_k_blocks, gating):
    x = inputs(T)
    expected = run(x, block_size, gating, "reference", top_k_blocks)
    actual = run(x, block_size, gating, "gather", top_k_blocks)
    assert_close_scaled(actual, expected, 1e-10)


@pytest.fixture(params=[1, 2, 3], ids=["tile=block", "tile=2 blocks", "tile=3 blocks"])
def flex_tile(request, monkeypatch):
    """The BlockMask tile as a multiple of the routing block: CUDA's coarse tiles (block_flex.py),
    here on the CPU."""
    monkeypatch.setattr(block_flex, "tile_size", lambda block_size, device: request.param * block_size)
    return request.param


@pytest.mark.parametrize("gating", ["hard", "soft"])
@pytest.mark.parametrize("T,block_size,top_k_blocks", SHAPES[:3])
def test_flex_forward_equals_reference_on_cpu(T, block_size, top_k_blocks, gating, flex_tile):
    q, k, v = inputs(T, torch.float32)
    scores = block_scores(q, k, block_size, DK ** -0.5)
    extra = {"top_k_blocks": top_k_blocks} if gating == "hard" else {}
    with torch.no_grad():
        expected = block_routed_attention(q, k, v, scores, block_size=block_size, gating=gating, mode="reference", **extra)
        actual = block_routed_attention(q, k, v, scores, block_size=block_size, gating=gating, mode="flex", **extra)
    assert_close_scaled({"out": actual}, {"out": expected}, 1e-5)


@pytest.mark.parametrize("gating", ["hard", "soft"])
@pytest.mark.parametrize("device", [on_cuda("cuda", id="cuda")])
def test_flex_bf16_at_the_fields_block_size_on_cuda(gating, device):
    """bf16, head dim 64, blocks of 64 (the bench's shape, smaller; BlockMask tiles of 128): flex's
    Triton forward and backward against the float32 reference, bf16 tolerance."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1000, 2, 64, generator=g).to(device) for _ in range(3))
    results = {}
    for mode, dtype in (("reference", torch.float32), ("flex", torch.bfloat16)):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        scores = block_scores(leaves[0], leaves[1], 64, 0.125)
        extra = {"top_k_blocks": 3} if gating == "hard" else {}
        out = block_routed_attention(*leaves, scores, block_size=64, gating=gating, mode=mode, **extra)
        out.float().pow(2).sum().backward()
        results[mode] = {"out": out.float().detach(), **{f"grad {n}": t.grad.float() for n, t in zip("qkv", leaves)}}
    assert_close_scaled(results["flex"], results["reference"], 5e-2)


@pytest.mark.parametrize("gating", ["hard", "soft"])
@pytest.mark.parametrize("device", [on_cuda("cuda", id="cuda")])
def test_flex_equals_reference_on_cuda(gating, device):
    """flex's forward and backward (Triton) against the reference, float32 with TF32 off; block 16
    (BlockMask tiles of 128, each spanning 8 routing blocks), ragged T."""
    prior = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        x = inputs(150, torch.float32, device=device)
        expected = run(x, 16, gating, "reference", 3)
        actual = run(x, 16, gating, "flex", 3)
        assert_close_scaled(actual, expected, 1e-4)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prior


def test_flex_with_gradients_on_a_cpu_is_a_one_line_error():
    q, k, v = (t.float().requires_grad_() for t in inputs(16))
    scores = block_scores(q, k, 8, 0.5)
    with pytest.raises(ValueError, match="^mode='flex' has no backward on the CPU"):
        block_routed_attention(q, k, v, scores, block_size=8, top_k_blocks=1, mode="flex")
    assert "\n" not in NO_CPU_BACKWARD


def test_gather_gradcheck_float64():
    q, k, v = (t.requires_grad_() for t in inputs(11))
    scores = block_scores(q.detach(), k.detach(), 4, 0.5)  # hard: the choice is fixed, no gradient

    def hard(q, k, v):
        return block_routed_attention(q, k, v, scores, block_size=4, top_k_blocks=1, mode="gather")

    def soft(q, k, v):  # soft: the scores' gradient flows back into q and k
        return block_routed_attention(q, k, v, block_scores(q, k, 4, 0.5), block_size=4, gating="soft",
                                      tau=2.0, mode="gather")

    assert torch.autograd.gradcheck(hard, (q, k, v))
    assert torch.autograd.gradcheck(soft, (q, k, v))


@pytest.mark.parametrize("mode", ["reference", "gather"])
def test_hard_routing_gives_the_scores_zero_gradient_and_soft_a_nonzero_one(mode):
    q, k, v = inputs(24)
    v.requires_grad_()  # so the hard output has a graph at all
    scores = block_scores(q, k, 4, 0.5).requires_grad_()
    block_routed_attention(q, k, v, scores, block_size=4, top_k_blocks=2, mode=mode).sum().backward()
    assert scores.grad is None or torch.count_nonzero(scores.grad) == 0
    scores.grad = None
    block_routed_attention(q, k, v, scores, block_size=4, gating="soft", mode=mode).sum().backward()
    assert torch.count_nonzero(scores.grad) > 0


def brute_selection(scores, top_k):
    n = scores.shape[-1]
    chosen = torch.zeros(scores.shape, dtype=torch.bool)
    for b in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            for i in range(n):
                ranked = sorted(range(i), key=lambda j: (-scores[b, h, i, j].item(), j))
                chosen[b, h, i, ranked[:top_k] + [i]] = True
    return chosen


@pytest.mark.parametrize("top_k", [0, 1, 3, 10])
def test_selection_matches_a_brute_force_loop_with_ties_to_the_lower_block(top_k):
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 3, (B, H, 9, 9), generator=g).double()  # many ties
    blocks, valid = select_past_blocks(scores, top_k)
    assert torch.equal(selected_block_mask(blocks, valid, 9), brute_selection(scores, top_k))


@pytest.mark.parametrize("mode", ["reference", "gather", "flex", "flex, tile=2 blocks"])
@pytest.mark.parametrize("gating", ["hard", "soft"])
def test_causal_when_the_future_changes(mode, gating, monkeypatch):
    """For every t: redraw q, k, v at every position after t. Outputs at positions <= t stay bit-equal
    (the block scores and selection are recomputed from the redrawn q and k), t + 1's changes."""
    T, block_size = 21, 4
    exact = True
    if mode == "flex, tile=2 blocks":
        # A tile spans two query blocks, so a later block's choice changes which tiles are read (and
        # whether one is full or masked), hence the order of the float sums of the earlier block: equal
        # to rounding (measured 9e-8), where a leak would move them by O(1).
        monkeypatch.setattr(block_flex, "tile_size", lambda block_size, device: 2 * block_size)
        mode, exact = "flex", False
    dtype = torch.float32 if mode == "flex" else torch.float64
    x = inputs(T, dtype)
    gen = torch.Generator().manual_seed(7)

    def out(x):
        extra = {"top_k_blocks": 2} if gating == "hard" else {}
        with torch.no_grad():
            return block_routed_attention(*x, block_scores(x[0], x[1], block_size, 0.5), block_size=block_size,
                                          gating=gating, mode=mode, **extra)

    base = out(x)
    for t in range(-1, T - 1):
        changed = [a.clone() for a in x]
        for a in changed:
            a[:, t + 1:] = torch.randn(a[:, t + 1:].shape, generator=gen, dtype=dtype)
        after = out(changed)
        if exact:
            assert torch.equal(after[:, :t + 1], base[:, :t + 1]), f"positions <= {t} saw later tokens"
        else:
            assert torch.allclose(after[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-6), \
                f"positions <= {t} saw later tokens"
        assert not torch.equal(after[:, t + 1], base[:, t + 1])


def test_block_scores_pool_the_previous_query_block_and_past_key_blocks():
    q, k, _ = inputs(10)
    scores = block_scores(q, k, 4, 0.5)  # blocks [0..3], [4..7], [8, 9]
    qm, km = block_means(q, 4), block_means(k, 4)
    assert torch.allclose(km[:, :, 2], k[:, 8:10].mean(1))  # the short block: its own tokens only
    assert torch.allclose(scores[:, :, 2, 1], 0.5 * (qm[:, :, 1] * km[:, :, 1]).sum(-1))
    assert torch.isinf(scores[:, :, 1, 1:]).all() and torch.isinf(scores[:, :, 0]).all()


def test_block_mass_and_concentration():
    q, k, _ = inputs(32)
    mass = block_attention_mass(q, k, 4)
    assert torch.allclose(mass.sum(-1), torch.full((B, H, 8), 4.0, dtype=mass.dtype))
    assert torch.count_nonzero(mass.triu(1)) == 0
    one_hot = torch.eye(8, dtype=torch.float64).expand(B, H, 8, 8) * 4  # all mass on the own block
    assert block_concentration(one_hot) == 1.0
    uniform = torch.ones(8, 8, dtype=torch.float64).tril().expand(B, H, 8, 8)  # 1 of i + 1 blocks
    assert torch.isclose(block_concentration(uniform), torch.tensor([1 / (i + 1) for i in range(1, 8)]).double().mean())


@pytest.mark.parametrize("bad,match", [
    (dict(block_size=0), "block_size must be an int >= 1"),
    (dict(top_k_blocks=None), "needs top_k_blocks"),
    (dict(gating="soft"), "top_k_blocks is not used with gating='soft'"),
    (dict(gating="sideways"), "gating must be one of"),
    (dict(mode="fast"), "mode must be one of"),
    (dict(block_scores=torch.zeros(B, H, 2, 2, dtype=torch.float64)), "block_scores has shape"),
    (dict(block_scores=torch.full((B, H, 3, 3), float("nan"), dtype=torch.float64)), "block_scores has NaN"),
])
def test_bad_arguments_are_one_line_errors(bad, match):
    q, k, v = inputs(12)  # 3 blocks of 4
    call = dict(block_scores=torch.zeros(B, H, 3, 3, dtype=torch.float64), block_size=4, top_k_blocks=1,
                gating="hard", mode="reference")
    call.update(bad)
    with pytest.raises(ValueError, match=match) as error:
        block_routed_attention(q, k, v, **call)
    assert "\n" not in str(error.value)
