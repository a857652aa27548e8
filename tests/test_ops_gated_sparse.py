"""Tests of routemem.ops.gated_sparse (gated sparse attention): the fast forms held equal to the
full masked softmax (outputs and gradients, float64) for every gating, hard top-k on odd T, T = 1,
k = 1, k >= T and ties; the top-k choice against a brute-force loop; exactly zero gradient to the
gate under hard top-k and a non-zero one under soft gating; causality by redrawing the future at
every position; float64 gradcheck of soft gating; the limits that reduce to plain causal attention;
the random and oracle masks; input validation. Tests that take ``device`` run on the CPU and on
CUDA (conftest.py)."""

import pytest
import torch

from op_checks import assert_close_scaled
from routemem.ops import attention_probs, gate_scores, gated_attention, oracle_mask, random_causal_mask, topk_mask
from routemem.ops.gated_sparse import GATINGS, topk_key_indices
from routemem.ops.gated_sparse.selection import topk_mask_by_rank

B, H, DK, DV, R = 2, 2, 4, 3, 3


def rand(*shape, device="cpu", gen=None):
    """float64, drawn on the CPU (the same numbers on every device), then moved."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)


def make_inputs(T, device="cpu", gen=None) -> dict[str, torch.Tensor]:
    """q, k [B, T, H, DK]; v [B, T, H, DV]; gq, gk [B, T, H, R] (the gate's projections)."""
    shapes = {"q": DK, "k": DK, "v": DV, "gq": R, "gk": R}
    return {n: rand(B, T, H, d, device=device, gen=gen) for n, d in shapes.items()}


def plain_causal(q, k, v):
    """torch's own causal attention, the yardstick for the limits that reduce to it."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


def run(inputs, gating, mode, **options):
    """gated_attention on leaves made from ``inputs``, the gate scores from gq, gk (soft, hard);
    returns the output and every leaf's gradient (zeros where none flowed) under a fixed cotangent."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    if gating in ("soft", "hard"):
        options["gate_scores"] = gate_scores(leaves["gq"], leaves["gk"])
    out = gated_attention(leaves["q"], leaves["k"], leaves["v"], gating=gating, mode=mode, **options)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out * cotangent.to(out.device)).sum().backward()
    grads = {f"grad {n}": torch.zeros_like(t) if t.grad is None else t.grad for n, t in leaves.items()}
    return {"out": out.detach(), **grads}


def brute_topk(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Query i keeps the first min(k, i + 1) of its causal keys ordered by (-score, index)."""
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    for b in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            for i in range(scores.shape[2]):
                ranked = sorted(range(i + 1), key=lambda j: (-scores[b, h, i, j].item(), j))
                mask[b, h, i, ranked[:top_k]] = True
    return mask


# --- fast == reference -----------------------------------------------------------------------------

HARD_CASES = [(1, 1), (1, 4), (2, 1), (7, 1), (7, 3), (7, 7), (7, 12), (16, 5)]  # (T, k): k >= T too


@pytest.mark.parametrize("T, top_k", HARD_CASES, ids=[f"T{T}-k{k}" for T, k in HARD_CASES])
def test_hard_fast_matches_reference(T, top_k, device):
    inputs = make_inputs(T, device)
    expected = run(inputs, "hard", "reference", top_k=top_k)
    assert expected["out"].shape == (B, T, H, DV)
    assert_close_scaled(run(inputs, "hard", "fast", top_k=top_k), expected, rtol=1e-12)


@pytest.mark.parametrize("levels", [1, 3])  # 1: every gate score equal; 3: many ties per row
def test_hard_forms_agree_on_ties(levels, device):
    """Gate scores from few values, so most choices are ties: both forms must pick the same keys
    (the lower index), or their outputs differ."""
    T, top_k = 11, 4
    inputs = make_inputs(T, device)
    scores = torch.randint(0, levels, (B, H, T, T), generator=torch.Generator().manual_seed(2)).double().to(device)
    out = {mode: gated_attention(inputs["q"], inputs["k"], inputs["v"], gating="hard", gate_scores=scores,
                                 top_k=top_k, mode=mode) for mode in ("reference", "fast")}
    assert_close_scaled({"out": out["fast"]}, {"out": out["reference"]}, rtol=1e-12)
    expected = brute_topk(scores.cpu(), top_k).to(device)
    assert torch.equal(topk_mask(scores, top_k), expected)
    kept = expected.clone()
    kept[..., :top_k] = False  # with equal scores the first k keys win: nothing kept beyond them
    assert levels > 1 or not kept.any()
    # The hard output is attention restricted to exactly the brute-force keys.
    assert_close_scaled({"out": out["fast"]}, {"out": gated_attention(
        inputs["q"], inputs["k"], inputs["v"], gating="mask", mask=expected, mode="reference")}, rtol=1e-12)


@pytest.mark.parametrize("gating", ["dense", "soft", "mask"])
@pytest.mark.parametrize("T", [1, 7, 16])
def test_sdpa_forms_match_reference(gating, T, device):
    inputs = make_inputs(T, device)
    options = {"soft": {"tau": 0.7}, "dense": {},
               "mask": {"mask": random_causal_mask(B, H, T, 3, generator=torch.Generator().manual_seed(3),
                                                   device=device)}}[gating]
    expected = run(inputs, gating, "reference", **options)
    if gating == "soft" and T > 1:  # the gate learns through soft gating (one key: softmax is 1)
        assert expected["grad gq"].abs().max() > 0
    assert_close_scaled(run(inputs, gating, "fast", **options), expected, rtol=1e-12)


def test_topk_matches_brute_force():
    scores = rand(B, H, 9, 9)
    for top_k in (1, 2, 5, 9, 20):
        assert torch.equal(topk_mask(scores, top_k), brute_topk(scores, top_k)), top_k
    indices, valid = topk_key_indices(scores, 5)
    assert indices.shape == valid.shape == (B, H, 9, 5)
    assert (indices <= torch.arange(9)[:, None]).all()  # no slot points at a future key
    assert torch.equal(valid.sum(-1), torch.arange(1, 10).clamp(max=5).expand(B, H, 9))


# --- the gate's gradient ---------------------------------------------------------------------------


def gate_gradient(gating: str, mode: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A toy attention block: x -> q, k, v (one linear map) and x -> gq, gk (the gate's). Returns
    the gate's weight gradient (None if none reached it) and the q/k/v map's, after one backward."""
    torch.manual_seed(4)
    T = 12
    x = torch.randn(B, T, 8, dtype=torch.float64)
    qkv = torch.nn.Linear(8, H * (2 * DK + DV), dtype=torch.float64)
    gate = torch.nn.Linear(8, 2 * H * R, dtype=torch.float64)
    q, k, v = qkv(x).view(B, T, H, -1).split([DK, DK, DV], dim=-1)
    gq, gk = gate(x).view(B, T, H, 2 * R).split([R, R], dim=-1)
    options = {"top_k": 3} if gating == "hard" else {}
    out = gated_attention(q, k, v, gating=gating, gate_scores=gate_scores(gq, gk), mode=mode, **options)
    (out * torch.randn_like(out)).sum().backward()
    return gate.weight.grad, qkv.weight.grad


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_hard_topk_gives_the_gate_exactly_zero_gradient(mode):
    """The routing-absorption paper's claim 2: the mask is built from integer indices, so the gate
    that chose them learns nothing, while q, k and v do."""
    gate_grad, qkv_grad = gate_gradient("hard", mode)
    assert qkv_grad is not None and qkv_grad.abs().max() > 0
    assert gate_grad is None or torch.count_nonzero(gate_grad) == 0


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_soft_gating_gives_the_gate_a_gradient(mode):
    gate_grad, _ = gate_gradient("soft", mode)
    assert gate_grad is not None and gate_grad.abs().max() > 1e-6


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_gradcheck_soft(mode, device):
    inputs = {n: t.requires_grad_() for n, t in make_inputs(5, device).items()}

    def fn(q, k, v, gq, gk):
        return gated_attention(q, k, v, gating="soft", gate_scores=gate_scores(gq, gk), tau=0.8, mode=mode)

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()))


# --- causality -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reference", "fast"])
@pytest.mark.parametrize("gating", GATINGS)
def test_causal_when_the_future_changes(gating, mode, device):
    """For every t: redraw q, k, v and the gate's projections at every position after t (and the
    explicit mask's rows and columns there). Outputs at positions <= t stay exactly equal, and the
    output at t + 1 changes."""
    T = 9
    gen = torch.Generator().manual_seed(5)
    inputs = make_inputs(T, device, gen)
    mask = random_causal_mask(B, H, T, 3, generator=gen, device=device) | (torch.rand(B, H, T, T, generator=gen) > 0.5).to(device)

    def out(x, mask):
        options = {"hard": {"top_k": 3}, "mask": {"mask": mask}}.get(gating, {})
        if gating in ("soft", "hard"):
            options["gate_scores"] = gate_scores(x["gq"], x["gk"])
        return gated_attention(x["q"], x["k"], x["v"], gating=gating, mode=mode, **options)

    base = out(inputs, mask)
    for t in range(-1, T - 1):  # t = -1: every token changes
        changed = {n: x.clone() for n, x in inputs.items()}
        for n, x in changed.items():
            x[:, t + 1 :] = rand(B, T - t - 1, H, x.shape[-1], device=device, gen=gen)
        new_mask = mask.clone()
        new_mask[..., t + 1 :, :] = ~new_mask[..., t + 1 :, :]
        new_mask[..., :, t + 1 :] = ~new_mask[..., :, t + 1 :]
        new_mask[..., t + 1 :, t + 1 :] |= torch.eye(T, dtype=torch.bool, device=device)[t + 1 :, t + 1 :]
        after = out(changed, new_mask)
        assert torch.equal(after[:, : t + 1], base[:, : t + 1]), f"positions <= {t} saw later tokens"
        assert not torch.allclose(after[:, t + 1], base[:, t + 1]), f"position {t + 1} did not change"


# --- limits that are plain causal attention --------------------------------------------------------


@pytest.mark.parametrize("mode", ["reference", "fast"])
@pytest.mark.parametrize("T", [1, 10])
def test_limits_are_plain_causal_attention(mode, T, device):
    """Soft gating with every gate score +inf (sigmoid = 1), a mask that keeps every key, hard
    top-k with k >= T and no gate at all are each torch's causal SDPA."""
    x = make_inputs(T, device)
    q, k, v = x["q"], x["k"], x["v"]
    expected = plain_causal(q, k, v)
    scores = gate_scores(x["gq"], x["gk"])
    outs = {
        "soft, gate +inf": gated_attention(q, k, v, gating="soft", gate_scores=torch.full_like(scores, float("inf")),
                                           tau=3.0, mode=mode),
        "mask, all ones": gated_attention(q, k, v, gating="mask", mask=torch.ones(T, T, dtype=torch.bool,
                                                                                  device=device), mode=mode),
        "hard, k = T": gated_attention(q, k, v, gating="hard", gate_scores=scores, top_k=T, mode=mode),
        "hard, k > T": gated_attention(q, k, v, gating="hard", gate_scores=scores, top_k=T + 3, mode=mode),
        "dense": gated_attention(q, k, v, mode=mode),
    }
    for name, out in outs.items():
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12, msg=name)


def test_soft_gate_multiplies_the_attention_weights():
    """Soft gating is attention with weights p_ij sigmoid(s_ij / tau), renormalised: written out."""
    x = make_inputs(6)
    scores = gate_scores(x["gq"], x["gk"])
    probs = attention_probs(x["q"], x["k"]) * torch.sigmoid(scores / 2.0)
    expected = torch.einsum("bhij,bjhd->bihd", probs / probs.sum(-1, keepdim=True), x["v"])
    out = gated_attention(x["q"], x["k"], x["v"], gating="soft", gate_scores=scores, tau=2.0)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# --- the gate scorer, the random and the oracle masks ---------------------------------------------


def test_gate_scores_are_the_scaled_bilinear_form(device):
    x = make_inputs(5, device)
    s = gate_scores(x["gq"], x["gk"])
    assert s.shape == (B, H, 5, 5)
    for i in range(5):
        for j in range(5):
            expected = (x["gq"][:, i] * x["gk"][:, j]).sum(-1) / R ** 0.5  # [B, H]
            if j <= i:
                torch.testing.assert_close(s[:, :, i, j], expected, rtol=1e-12, atol=1e-12)
            else:
                assert (s[:, :, i, j] == float("-inf")).all()


def test_random_causal_mask_keeps_k_causal_keys_uniformly():
    T, top_k = 6, 2
    mask = random_causal_mask(400, 1, T, top_k, generator=torch.Generator().manual_seed(6))
    assert mask.shape == (400, 1, T, T) and mask.dtype == torch.bool
    assert not mask.triu(diagonal=1).any()
    assert torch.equal(mask.sum(-1), torch.arange(1, T + 1).clamp(max=top_k).expand(400, 1, T))
    # Each causal key of query 5 is kept with probability 2 / 6: 400 draws, std ~ 0.024.
    share = mask[:, 0, 5].double().mean(0)
    assert (share - top_k / T).abs().max() < 0.1, share
    again = random_causal_mask(400, 1, T, top_k, generator=torch.Generator().manual_seed(6))
    other = random_causal_mask(400, 1, T, top_k, generator=torch.Generator().manual_seed(7))
    assert torch.equal(again, mask) and not torch.equal(other, mask)


def test_oracle_mask_keeps_the_k_largest_probabilities():
    x = make_inputs(8)
    probs = attention_probs(x["q"], x["k"])
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, H, 8, dtype=torch.float64))
    mask = oracle_mask(probs, 3)
    assert torch.equal(mask, brute_topk(probs, 3))
    kept = (probs * mask).sum(-1)
    for i in range(8):  # no other choice of min(3, i + 1) causal keys holds more mass
        best = probs[..., i, : i + 1].topk(min(3, i + 1), dim=-1).values.sum(-1)
        torch.testing.assert_close(kept[..., i], best, rtol=1e-12, atol=1e-12)


# --- input checks ----------------------------------------------------------------------------------

T_BAD = 5
BAD_INPUTS = {  # case: (arguments over the good ones, expected message)
    "q not 4-d": (dict(q=torch.randn(T_BAD, H, DK)), r"^q must be \[B, T, H, Dk\]"),
    "T = 0": (dict(q=torch.randn(B, 0, H, DK), k=torch.randn(B, 0, H, DK), v=torch.randn(B, 0, H, DV)),
              r"^q has no tokens"),
    "dtype mix": (dict(k=torch.randn(B, T_BAD, H, DK, dtype=torch.float64)), r"^k has dtype"),
    "unknown gating": (dict(gating="sparse"), r"^gating must be one of"),
    "unknown mode": (dict(mode="chunk"), r"^mode must be one of"),
    "soft without scores": (dict(gating="soft"), r"needs gate_scores"),
    "scores shape": (dict(gating="soft", gate_scores=torch.randn(B, H, T_BAD, T_BAD + 1)), r"^gate_scores has shape"),
    "scores NaN": (dict(gating="hard", top_k=2, gate_scores=torch.full((B, H, T_BAD, T_BAD), float("nan"))),
                   r"^gate_scores has NaN"),
    "soft row all -inf": (dict(gating="soft", gate_scores=torch.full((B, H, T_BAD, T_BAD), float("-inf"))),
                          r"-inf at every key j <= i of query 0"),
    "hard without top_k": (dict(gating="hard", gate_scores=torch.randn(B, H, T_BAD, T_BAD)), r"needs top_k"),
    "top_k 0": (dict(gating="hard", gate_scores=torch.randn(B, H, T_BAD, T_BAD), top_k=0), r"^top_k must be an int >= 1"),
    "top_k float": (dict(gating="hard", gate_scores=torch.randn(B, H, T_BAD, T_BAD), top_k=2.0), r"^top_k must be"),
    "tau 0": (dict(gating="soft", gate_scores=torch.randn(B, H, T_BAD, T_BAD), tau=0.0), r"^tau must be a number > 0"),
    "top_k with soft": (dict(gating="soft", gate_scores=torch.randn(B, H, T_BAD, T_BAD), top_k=2),
                        r"^top_k is not used with gating='soft'"),
    "scores with dense": (dict(gate_scores=torch.randn(B, H, T_BAD, T_BAD)), r"^gate_scores is not used with gating='dense'"),
    "mask with hard": (dict(gating="hard", gate_scores=torch.randn(B, H, T_BAD, T_BAD), top_k=2,
                            mask=torch.ones(T_BAD, T_BAD, dtype=torch.bool)), r"^mask is not used"),
    "mask missing": (dict(gating="mask"), r"needs mask"),
    "mask not bool": (dict(gating="mask", mask=torch.ones(T_BAD, T_BAD)), r"^mask must be a bool tensor"),
    "mask shape": (dict(gating="mask", mask=torch.ones(T_BAD, T_BAD + 1, dtype=torch.bool)), r"^mask has shape"),
    "mask empty row": (dict(gating="mask", mask=~torch.eye(T_BAD, dtype=torch.bool)), r"^mask leaves query 0"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_naming_the_culprit(case):
    changes, message = BAD_INPUTS[case]
    args = {"q": torch.randn(B, T_BAD, H, DK), "k": torch.randn(B, T_BAD, H, DK), "v": torch.randn(B, T_BAD, H, DV)}
    args.update(changes)
    with pytest.raises(ValueError, match=message):
        gated_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize("call, message", [
    (lambda: gate_scores(torch.randn(B, 4, H), torch.randn(B, 4, H)), r"^gq must be \[B, T, H, r\]"),
    (lambda: gate_scores(torch.randn(B, 4, H, R), torch.randn(B, 4, H, R + 1)), r"^gk has shape"),
    (lambda: random_causal_mask(2, 2, 4, 0), r"^top_k must be an int >= 1"),
    (lambda: random_causal_mask(2, 2, 0, 1), r"^T must be an int >= 1"),
    (lambda: oracle_mask(torch.rand(B, H, 4, 5), 2), r"^probs must be \[B, H, T, T\]"),
    (lambda: oracle_mask(torch.rand(B, H, 4, 4), 0), r"^top_k must be"),
], ids=["gq 3-d", "gk shape", "random k 0", "random T 0", "oracle shape", "oracle k 0"])
def test_helpers_reject_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("levels", [1, 2, 3, 1000])
def test_topk_mask_threshold_form_matches_the_sorted_indices_and_the_rank_count(levels):
    """topk_mask (threshold + running count of ties) keeps the keys the stable sort gathers and
    the plain rank count keeps, with ties everywhere (few levels) and causal keys at -inf."""
    g = torch.Generator().manual_seed(levels)
    scores = torch.randint(0, levels, (2, 3, 17, 17), generator=g).double()
    scores[torch.rand(scores.shape, generator=g) < 0.3] = float("-inf")
    for top_k in (1, 4, 16, 17, 30):
        indices, valid = topk_key_indices(scores, top_k)
        from_indices = torch.zeros(scores.shape, dtype=torch.int32).scatter_add_(-1, indices, valid.to(torch.int32)) > 0
        mask = topk_mask(scores, top_k)
        assert torch.equal(mask, from_indices), top_k
        assert torch.equal(mask, topk_mask_by_rank(scores, top_k)), top_k
        assert torch.equal(mask.sum(-1), torch.arange(1, 18).clamp(max=top_k).expand(2, 3, 17))
