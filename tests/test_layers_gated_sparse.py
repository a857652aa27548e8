"""Tests of the gated_sparse mixer (routemem/layers/gated_sparse.py): step decoding equals the
parallel form for every gate, mode and deploy path (learned positions and RoPE); causality at every
position; gate "none" is the plain attention mixer; hard top-k passes exactly zero gradient to the
gate and soft a non-zero one; a random gate is frozen and out of the optimizer; the semantics of
mask randomisation and of the deploy paths; option errors; metrics; accounting."""

from __future__ import annotations

import itertools

import pytest
import torch

from routemem.errors import ConfigError
from routemem.layers import LayerSpec, build_mixer
from routemem.layers.attention import CausalSelfAttention
from routemem.layers.gated_sparse import GatedSparseAttention
from routemem.models import LMConfig, TransformerLM
from routemem.ops import attention_probs, gate_scores, gated_attention, oracle_mask, random_causal_mask, topk_mask
from routemem.train.optim import param_groups

D, H, S, T, K, R = 16, 2, 16, 13, 3, 4

COMBOS = [(g, m, d) for g, m, d in itertools.product(("learned", "random", "none"), ("soft", "hard"),
                                                      ("gate", "dense", "oracle")) if not (g == "none" and m == "hard")]


def layer(pos="learned", dtype=torch.float64, seed=0, **options) -> GatedSparseAttention:
    """A mixer with torch's default Linear init (attention logits of order one), in eval mode."""
    torch.manual_seed(seed)
    options = {"k": K, "rank": R, **options}
    return build_mixer("gated_sparse", LayerSpec(d_model=D, n_head=H, max_seq_len=S, pos=pos), options).to(dtype).eval()


def inputs(B=2, length=T, seed=1) -> torch.Tensor:
    return torch.randn(B, length, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def decode(mixer, x) -> torch.Tensor:
    state, out = None, []
    for t in range(x.shape[1]):
        y, state = mixer.step(x[:, t], state)
        out.append(y)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("gate, mode, deploy", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_step_equals_parallel(gate, mode, deploy, pos):
    mixer = layer(pos, gate=gate, mode=mode, deploy=deploy)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(decode(mixer, x), mixer(x), rtol=1e-10, atol=1e-10)


def test_step_equals_parallel_with_default_k():
    """k = None is max_seq_len // 8 in both forms (not T // 8 of the prefix decoded so far)."""
    mixer = layer(gate="learned", mode="hard", k=None)
    assert mixer.k == S // 8
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(decode(mixer, x), mixer(x), rtol=1e-10, atol=1e-10)
    assert layer(k=None).k == 2 and GatedSparseAttention(LayerSpec(D, H, max_seq_len=5)).k == 1


def test_paths_differ_so_the_step_tests_can_fail():
    """With k = 3 < T, every deploy path gives its own output (a step that ignored one would show)."""
    x = inputs()
    with torch.no_grad():
        outs = {(m, d): layer(mode=m, deploy=d)(x) for m in ("soft", "hard") for d in ("gate", "dense", "oracle")}
    for (a, out_a), (b, out_b) in itertools.combinations(outs.items(), 2):
        if a[1] == b[1] != "gate":  # dense and oracle do not read the mode
            torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
        else:
            assert not torch.allclose(out_a, out_b, atol=1e-6), (a, b)


@pytest.mark.parametrize("options", [dict(mode="soft"), dict(mode="hard"), dict(gate="random", mode="hard"),
                                     dict(deploy="oracle"), dict(gate="none", mask_randomisation=1.0)],
                         ids=["soft", "hard", "random-hard", "oracle", "random-mask"])
def test_causal_at_every_position(options):
    mixer = layer(**options)
    if options.get("mask_randomisation"):
        mixer.train()  # the random-mask path: the same seed gives the same mask below
    x = inputs()
    with torch.no_grad():
        torch.manual_seed(5)
        base = mixer(x)
        for t in range(T):
            changed = x.clone()
            changed[0, t] += torch.randn(D, dtype=torch.float64)
            torch.manual_seed(5)
            out = mixer(changed)
            torch.testing.assert_close(out[0, :t], base[0, :t], rtol=0, atol=1e-12)
            assert not torch.allclose(out[0, t], base[0, t])
            torch.testing.assert_close(out[1], base[1], rtol=0, atol=0)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_gate_none_is_plain_attention(pos):
    mixer = layer(pos, gate="none")
    assert not any("gate" in name for name, _ in mixer.named_parameters())
    attention = CausalSelfAttention(LayerSpec(d_model=D, n_head=H, max_seq_len=S, pos=pos)).double().eval()
    attention.load_state_dict(mixer.state_dict(), strict=True)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), attention(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gate", ["learned", "random"])
def test_hard_forms_gather_and_mask_agree_in_outputs_and_gradients(gate):
    """hard_form "mask" (a T x T boolean mask to SDPA) is the same function as "gather"."""
    x = inputs()
    outs, grads = {}, {}
    for form in ("gather", "mask"):
        mixer = layer(gate=gate, mode="hard", hard_form=form).train()
        xi = x.clone().requires_grad_()
        outs[form] = mixer(xi)
        outs[form].pow(2).sum().backward()
        grads[form] = (xi.grad, mixer.qkv.weight.grad, mixer.out.weight.grad)
    torch.testing.assert_close(outs["mask"], outs["gather"], rtol=1e-10, atol=1e-10)
    for a, b in zip(grads["mask"], grads["gather"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("hard_form", ["gather", "mask"])
@pytest.mark.parametrize("gate", ["learned", "random"])
def test_hard_mode_gives_the_gate_exactly_zero_gradient(gate, hard_form):
    mixer = layer(gate=gate, mode="hard", hard_form=hard_form).train()
    for p in (mixer.gate_q.weight, mixer.gate_k.weight):
        p.requires_grad_(True)  # even a random gate, unfrozen: nothing reaches it through the indices
    x = inputs().requires_grad_()
    mixer(x).pow(2).sum().backward()
    for p in (mixer.gate_q.weight, mixer.gate_k.weight):
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    assert torch.count_nonzero(mixer.qkv.weight.grad) > 0


def test_soft_mode_gives_the_gate_a_gradient():
    mixer = layer(mode="soft").train()
    mixer(inputs()).pow(2).sum().backward()
    for p in (mixer.gate_q.weight, mixer.gate_k.weight):
        assert p.grad is not None and p.grad.abs().max() > 1e-8


def lm(**mixer_kwargs) -> TransformerLM:
    torch.manual_seed(0)
    config = LMConfig(vocab_size=17, n_layer=2, d_model=D, n_head=H, max_seq_len=S, mixer="gated_sparse",
                      mixer_kwargs={"rank": R, "k": K, **mixer_kwargs})
    return TransformerLM(config)


@pytest.mark.parametrize("gate", ["learned", "random"])
def test_random_gate_is_frozen_and_learned_gate_trains(gate):
    model = lm(gate=gate)
    gate_weights = [p for b in model.blocks for p in (b.mixer.gate_q.weight, b.mixer.gate_k.weight)]
    in_optimizer = {id(p) for group in param_groups(model, 0.1) for p in group["params"]}
    assert all((id(p) in in_optimizer) == (gate == "learned") for p in gate_weights)
    before = [p.detach().clone() for p in gate_weights]
    qkv_before = model.blocks[0].mixer.qkv.weight.detach().clone()
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    idx = torch.randint(0, 17, (2, S), generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        optimizer.zero_grad()
        model(idx, idx)[1].backward()
        optimizer.step()
    changed = [not torch.equal(p, b) for p, b in zip(gate_weights, before)]
    assert all(changed) if gate == "learned" else not any(changed)
    assert not torch.equal(model.blocks[0].mixer.qkv.weight, qkv_before)


def test_model_init_gives_the_gate_unit_scale_and_scales_only_out():
    model = lm(gate="random")
    mixer = model.blocks[0].mixer
    for linear in (mixer.gate_q, mixer.gate_k):  # N(0, 1/d), not the model's 0.02 nor the residual scale
        assert abs(linear.weight.std().item() - D ** -0.5) < 0.05
    assert mixer.out.weight.std().item() < 0.02
    x = model.blocks[0].mixer_norm(model.tok_emb(torch.arange(S)[None]))
    scores = gate_scores(*mixer._gate_heads(x))
    assert scores[torch.isfinite(scores)].std() > 0.3  # a soft random gate is not a constant


def test_mask_randomisation_semantics():
    x = inputs()
    never = layer(mode="soft", mask_randomisation=0.0).train()
    rng = torch.get_rng_state()
    for _ in range(5):
        never(x)
        assert never.last_path == "soft"
    assert torch.equal(torch.get_rng_state(), rng)  # p = 0 draws nothing

    mixer = layer(mode="hard", mask_randomisation=0.5).train()
    paths = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = mixer(x)
        paths.add(mixer.last_path)
        torch.manual_seed(seed)  # the documented draws: the coin, then the mask
        with torch.no_grad():
            q, k, v = mixer._heads(x, 0)
            if float(torch.rand(())) < 0.5:
                expected = gated_attention(q, k, v, gating="mask", mask=random_causal_mask(2, H, T, K))
            else:
                expected = gated_attention(q, k, v, gating="hard", gate_scores=gate_scores(*mixer._gate_heads(x)), top_k=K)
        torch.testing.assert_close(out, mixer.out(expected.flatten(2)), rtol=1e-12, atol=1e-12)
    assert paths == {"random", "hard"}

    mixer.eval()
    with torch.no_grad():
        evaluated = mixer(x)
        for _ in range(10):
            torch.testing.assert_close(mixer(x), evaluated, rtol=0, atol=0)
            assert mixer.last_path == "hard"
    always = layer(gate="none", mask_randomisation=1.0, deploy="dense").train()
    torch.manual_seed(0)
    first = always(x)
    assert always.last_path == "random" and not torch.allclose(first, always(x))  # a new mask each forward


def test_deploy_paths():
    x = inputs()
    mixer = layer(mode="hard", deploy="dense")
    attention = CausalSelfAttention(LayerSpec(d_model=D, n_head=H, max_seq_len=S)).double().eval()
    attention.load_state_dict({n: p for n, p in mixer.state_dict().items() if not n.startswith("gate")})
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), attention(x), rtol=1e-12, atol=1e-12)
        mixer.set_deploy("oracle")
        q, k, v = mixer._heads(x, 0)
        mask = oracle_mask(attention_probs(q, k), K)
        expected = mixer.out(gated_attention(q, k, v, gating="mask", mask=mask).flatten(2))
        torch.testing.assert_close(mixer(x), expected, rtol=1e-12, atol=1e-12)
        wide = layer(mode="hard", deploy="oracle", k=T)  # the oracle keeps every key: dense
        torch.testing.assert_close(wide(x), attention(x), rtol=1e-12, atol=1e-12)
        mixer.train()  # training ignores deploy
        gated = layer(mode="hard").train()(x)
        torch.testing.assert_close(mixer(x), gated, rtol=0, atol=0)


@pytest.mark.parametrize("options, match", [
    ({"gate": "fixed"}, "gate must be one of"),
    ({"mode": "topk"}, "mode must be one of"),
    ({"gate": "none", "mode": "hard"}, "needs a gate"),
    ({"rank": 0}, "rank must be an int >= 1"),
    ({"k": 0}, "k must be an int >= 1"),
    ({"tau": 0.0}, "tau must be a finite number > 0"),
    ({"tau": -1}, "tau must be a finite number > 0"),
    ({"mask_randomisation": 1.5}, r"mask_randomisation must be a number in \[0, 1\]"),
    ({"mask_randomisation": -0.1}, r"mask_randomisation must be a number in \[0, 1\]"),
    ({"deploy": "sparse"}, "deploy must be one of"),
    ({"hard_form": "dense"}, "hard_form must be one of"),
    ({"topk": 4}, "unknown option 'topk'"),
    ({"rank": "4"}, "option rank must be an int"),
])
def test_option_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        build_mixer("gated_sparse", LayerSpec(d_model=D, n_head=H, max_seq_len=S), options)


def test_set_deploy_checks():
    with pytest.raises(ConfigError, match="deploy must be one of"):
        layer().set_deploy("none")


def test_metrics():
    x = inputs()
    assert set(layer(gate="none").metrics()) == set()
    mixer = layer(mode="soft").train()
    grads = []
    for track in (False, True):
        mixer.zero_grad()
        mixer.track_stats = track
        mixer(x).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in mixer.parameters()])
    for a, b in zip(*grads):  # measuring changes no gradient
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    stats = mixer.metrics()
    assert set(stats) == {"concentration", "gate_score_rms", "gate_mean_sigmoid", "gate_oracle_f1", "gate_weight_rms"}
    with torch.no_grad():  # by hand, over the queries i >= k
        scores, probs = mixer.maps(x)
        oracle = oracle_mask(probs, K)
        share = (probs * oracle).sum(-1)[..., K:].mean()
        f1 = ((topk_mask(scores, K) & oracle).sum(-1) / K)[..., K:].mean()
        causal = torch.isfinite(scores)
    assert stats["concentration"] == pytest.approx(float(share), abs=1e-6)
    assert stats["gate_oracle_f1"] == pytest.approx(float(f1), abs=1e-6)
    assert stats["gate_score_rms"] == pytest.approx(float(scores[causal].pow(2).mean().sqrt()), rel=1e-5)
    assert 0 < stats["gate_mean_sigmoid"] < 1
    wide = layer(k=T)
    wide.track_stats = True
    with torch.no_grad():
        wide(x)
    assert wide.metrics()["concentration"] == pytest.approx(1.0) and wide.metrics()["gate_oracle_f1"] == 1.0
    model = lm()
    for block in model.blocks:
        block.mixer.track_stats = True
    model(torch.zeros(1, S, dtype=torch.long))
    assert "blocks.1.mixer.concentration" in model.layer_metrics()


def test_state_size_and_flops():
    plain, gated, hard = layer(gate="none"), layer(), layer(mode="hard")
    attention = CausalSelfAttention(LayerSpec(d_model=D, n_head=H, max_seq_len=S))
    assert plain.state_size(10) == attention.state_size(10)
    assert gated.state_size(10) == attention.state_size(10) + H * R * 10
    assert plain.extra_flops_per_token(S) == attention.extra_flops_per_token(S)
    assert gated.extra_flops_per_token(S) == attention.extra_flops_per_token(S) + 2 * H * R * (S + 1) / 2
    assert hard.extra_flops_per_token(S) < gated.extra_flops_per_token(S)
    _, state = gated.step(inputs(length=1)[:, 0], None)
    assert state["gk"].shape == (2, H, 1, R)
