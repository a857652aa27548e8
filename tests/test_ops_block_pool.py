"""Tests of routemem.ops.block_pool (the slow path of fast-slow coupled attention): the vectorized
forms held equal to the plain loops (outputs and gradients, float64), float64 gradcheck, the
pooling and broadcast semantics written out by hand, causality of pool -> block attention ->
broadcast checked by perturbing the future at every position, and input validation. Tests that
take ``device`` run on the CPU and on CUDA (conftest.py)."""

import pytest
import torch

from op_checks import assert_close_scaled
from routemem.ops.block_pool import (
    block_broadcast,
    block_causal_attention,
    causal_block_pool,
    num_complete_blocks,
)

B, D, H, DH = 2, 6, 2, 3


def lengths(P: int) -> list[int]:
    """The issue's sequence lengths for block size P: 1, P - 1 (when >= 1), P and 5P + 2."""
    return sorted({T for T in (1, P - 1, P, 5 * P + 2) if T >= 1})


GRID = [(P, T) for P in (1, 3, 16) for T in lengths(P)]
GRID_IDS = [f"P{P}-T{T}" for P, T in GRID]


def blocks(T: int, P: int) -> int:
    return -(-T // P)  # ceil(T / P): pooling keeps a last, partial block


def rand(*shape, device="cpu"):
    """float64, drawn on the CPU (the same numbers on every device), then moved."""
    return torch.randn(*shape, dtype=torch.float64).to(device)


def with_grads(fn, **inputs) -> dict[str, torch.Tensor]:
    """fn(**leaves) and the gradient of every leaf under a fixed random cotangent (zeros where the
    output does not depend on the leaf: the loop broadcast before any block completes)."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    out = fn(**leaves)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if out.requires_grad:
        (out * cotangent.to(out.device)).sum().backward()
    grads = {f"grad {n}": torch.zeros_like(t) if t.grad is None else t.grad for n, t in leaves.items()}
    return {"out": out.detach(), **grads}


# --- the vectorized forms equal the loops --------------------------------------------------------


@pytest.mark.parametrize("P, T", GRID, ids=GRID_IDS)
def test_pool_vectorized_matches_reference(P, T, device):
    x = rand(B, T, D, device=device)
    run = lambda mode: with_grads(lambda x: causal_block_pool(x, P, mode=mode), x=x)
    expected = run("reference")
    assert expected["out"].shape == (B, blocks(T, P), D)
    assert_close_scaled(run("vectorized"), expected, rtol=1e-12)


@pytest.mark.parametrize("P, T", GRID, ids=GRID_IDS)
def test_broadcast_vectorized_matches_reference(P, T, device):
    y = rand(B, blocks(T, P), D, device=device)  # a row per block, the partial one too (never read)
    run = lambda mode: with_grads(lambda y: block_broadcast(y, P, T, mode=mode), y=y)
    expected = run("reference")
    assert expected["out"].shape == (B, T, D)
    assert_close_scaled(run("vectorized"), expected, rtol=1e-12)


@pytest.mark.parametrize("P, T", GRID, ids=GRID_IDS)
def test_attention_vectorized_matches_reference(P, T, device):
    N = blocks(T, P)
    q, k, v = (rand(B, N, H, DH, device=device) for _ in range(3))
    run = lambda mode: with_grads(lambda q, k, v: block_causal_attention(q, k, v, mode=mode), q=q, k=k, v=v)
    expected = run("reference")
    assert expected["out"].shape == (B, N, H, DH)
    assert_close_scaled(run("vectorized"), expected, rtol=1e-10)


def test_gradcheck_pool(device):
    x = rand(1, 8, 3, device=device).requires_grad_()  # P = 3: two full blocks and one of 2 tokens
    assert torch.autograd.gradcheck(lambda x: causal_block_pool(x, 3), (x,))


def test_gradcheck_broadcast(device):
    y = rand(1, 3, 2, device=device).requires_grad_()  # row 2 is never read at T = 8, P = 3
    assert torch.autograd.gradcheck(lambda y: block_broadcast(y, 3, 8), (y,))


def test_gradcheck_attention(device):
    q, k, v = (rand(1, 4, 2, 3, device=device).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: block_causal_attention(q, k, v), (q, k, v))


# --- semantics, written out by hand ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reference", "vectorized"])
@pytest.mark.parametrize("P, T", [(1, 5), (3, 11), (4, 4), (4, 3), (5, 17), (16, 82)])
def test_pool_is_the_block_mean(mode, P, T):
    x = rand(B, T, D)
    pooled = causal_block_pool(x, P, mode=mode)
    assert pooled.shape == (B, blocks(T, P), D)
    for c in range(blocks(T, P)):
        tokens = range(c * P, min((c + 1) * P, T))  # the last block may hold fewer than P tokens
        expected = sum(x[:, t] for t in tokens) / len(tokens)
        torch.testing.assert_close(pooled[:, c], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["reference", "vectorized"])
@pytest.mark.parametrize("P, T", [(1, 5), (3, 11), (4, 4), (4, 3), (5, 17), (16, 82)])
def test_broadcast_hands_out_only_complete_blocks(mode, P, T, device):
    """Token t gets zeros while t < P - 1, then the row of block (t + 1) // P - 1: the last block
    whose every token is at a position <= t. Rows hold their own index + 1, so each output names
    the row it came from (0 = nothing)."""
    N = blocks(T, P)
    y = (torch.arange(1, N + 1, dtype=torch.float64)[None, :, None] * torch.ones(B, 1, D)).to(device)
    out = block_broadcast(y, P, T, mode=mode)
    assert out.shape == (B, T, D)
    for t in range(T):
        row = (t + 1) // P - 1
        expected = 0.0 if t < P - 1 else float(row + 1)
        assert row < num_complete_blocks(T, P)  # a partial last block is never handed out
        assert torch.all(out[:, t] == expected), f"P={P}, T={T}: token {t} got {out[0, t, 0].item()}, want {expected}"
    if T % P:  # the partial block's row is in y but appears nowhere in the output
        assert not (out == float(N)).any()


def test_broadcast_accepts_exactly_the_complete_blocks():
    y = rand(B, 3, D)
    torch.testing.assert_close(block_broadcast(y, 4, 14), block_broadcast(torch.cat([y, rand(B, 1, D)], 1), 4, 14))


def test_num_complete_blocks():
    assert [num_complete_blocks(T, 4) for T in (1, 3, 4, 5, 7, 8, 22)] == [0, 0, 1, 1, 1, 2, 5]
    assert num_complete_blocks(7, 1) == 7


def test_attention_block_c_sees_blocks_up_to_c():
    """Block attention against a dense masked softmax written out (causal over blocks)."""
    q, k, v = (rand(B, 5, H, DH) for _ in range(3))
    scores = torch.einsum("bchd,bshd->bhcs", q, k) / DH ** 0.5
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    expected = torch.einsum("bhcs,bshd->bchd", weights, v)
    torch.testing.assert_close(block_causal_attention(q, k, v), expected, rtol=1e-12, atol=1e-12)


# --- causality the hard way ------------------------------------------------------------------------


class SlowPath:
    """pool -> per-head q, k, v -> causal block attention -> output projection -> broadcast, as the
    layer composes the ops. The whole sequence is pooled, partial last block included, so a
    broadcast that handed that block out would leak the future and show here."""

    def __init__(self, P: int, device):
        self.P = P
        self.w_qkv, self.w_out = rand(D, 3 * H * DH, device=device), rand(H * DH, D, device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        u = causal_block_pool(x, self.P)
        q, k, v = (u @ self.w_qkv).view(B, u.shape[1], 3, H, DH).unbind(dim=2)
        y = block_causal_attention(q, k, v).flatten(2) @ self.w_out
        return block_broadcast(y, self.P, T)


@pytest.mark.parametrize("P, T", GRID, ids=GRID_IDS)
def test_pooled_path_is_causal_when_the_future_changes(P, T, device):
    """For every t: redraw every token after t. Outputs stay exactly equal at every position before
    the first block holding a changed token completes (so at every position <= t), and change at
    the position where that block completes, if it is inside the sequence."""
    path = SlowPath(P, device)
    gen = torch.Generator().manual_seed(T * 100 + P)
    x = torch.randn(B, T, D, generator=gen, dtype=torch.float64).to(device)
    base = path(x)
    assert base.shape == (B, T, D)
    positives = 0
    for t in range(-1, T - 1):  # t = -1: every token changes
        changed = x.clone()
        changed[:, t + 1 :] = torch.randn(B, T - t - 1, D, generator=gen, dtype=torch.float64).to(device)
        out = path(changed)
        completes = ((t + 1) // P + 1) * P - 1  # where the first block with a changed token completes
        assert completes > t
        same = min(completes, T)
        assert torch.equal(out[:, :same], base[:, :same]), f"P={P}, T={T}: positions < {same} saw tokens > {t}"
        if completes < T:
            assert not torch.allclose(out[:, completes], base[:, completes]), \
                f"P={P}, T={T}: position {completes} completes a changed block but did not change"
            positives += 1
    assert positives == num_complete_blocks(T, P) * P  # every t before the last complete block's end


# --- input checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("P", [0, -1, 2.5, True, "4", None])
def test_bad_block_size_is_named(P):
    x = rand(B, 8, D)
    with pytest.raises(ValueError, match=r"^block size P must be an int >= 1"):
        causal_block_pool(x, P)
    with pytest.raises(ValueError, match=r"^block size P must be an int >= 1"):
        block_broadcast(x, P, 8)


BAD_INPUTS = {  # case: (call, expected message)
    "pool x 2-d": (lambda: causal_block_pool(rand(8, D), 2), r"^x must be \[B, T, D\], got \(8, 6\)"),
    "pool x 4-d": (lambda: causal_block_pool(rand(B, 8, H, DH), 2), r"^x must be \[B, T, D\]"),
    "pool x not a tensor": (lambda: causal_block_pool([[1.0]], 2), r"^x must be \[B, T, D\], got list"),
    "pool no tokens": (lambda: causal_block_pool(rand(B, 0, D), 2), r"^x has no tokens"),
    "pool mode": (lambda: causal_block_pool(rand(B, 8, D), 2, mode="fast"), r"mode"),
    "broadcast y 2-d": (lambda: block_broadcast(rand(3, D), 2, 6), r"^y must be \[B, T, D\]"),
    "broadcast y 4-d": (lambda: block_broadcast(rand(B, 3, H, DH), 2, 6), r"^y must be \[B, T, D\]"),
    "too few blocks": (lambda: block_broadcast(rand(B, 2, D), 2, 6), r"^y has 2 blocks but T=6, P=2 completes 3"),
    "broadcast mode": (lambda: block_broadcast(rand(B, 3, D), 2, 6, mode="fast"), r"mode"),
    "attention q 3-d": (lambda: block_causal_attention(*(rand(B, 3, DH) for _ in range(3))),
                        r"^q must be \[B, N, H, Dh\]"),
    "attention k shape": (lambda: block_causal_attention(rand(B, 3, H, DH), rand(B, 4, H, DH), rand(B, 3, H, DH)),
                          r"^k must have q's shape"),
    "attention v shape": (lambda: block_causal_attention(rand(B, 3, H, DH), rand(B, 3, H, DH), rand(B, 3, H, 2)),
                          r"^v must have q's shape"),
    "attention mode": (lambda: block_causal_attention(*(rand(B, 3, H, DH) for _ in range(3)), mode="fast"), r"mode"),
    "reference dropout": (lambda: block_causal_attention(*(rand(B, 3, H, DH) for _ in range(3)), mode="reference",
                                                          dropout=0.1), r"reference block attention has no dropout"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_naming_the_problem(case):
    call, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        call()
