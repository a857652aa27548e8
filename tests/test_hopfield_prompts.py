"""Tests of routemem.layers.hopfield_prompts (RwF's prompt generator) with a tiny frozen ViT: the
prompts are the Hopfield retrieval written out, they depend on the image, they reach the ViT as
prompt-tuning or prefix tokens and leave after their block, gradients reach the generator and not
the backbone, ``train`` freezes what it says, and the defaults and bad settings."""

import math

import pytest
import torch
import torch.nn.functional as F

from routemem.errors import ConfigError
from routemem.layers.hopfield_prompts import HopfieldPromptGenerator
from routemem.models import VisionTransformer, ViTConfig

D, N_LAYER = 32, 3


def frozen_vit(n_layer=N_LAYER) -> VisionTransformer:
    model = VisionTransformer(ViTConfig(image_size=8, patch_size=4, in_chans=1, d_model=D, n_layer=n_layer,
                                        n_head=4, mlp_hidden=48, n_classes=5)).double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def generator(**options) -> HopfieldPromptGenerator:
    return HopfieldPromptGenerator(D, N_LAYER, **{"layers": (0, 1), "length": 4, **options}).double()


def images(batch=3):
    return torch.randn(batch, 1, 8, 8, dtype=torch.float64)


def test_prompts_are_the_hopfield_retrieval_written_out():
    betas = (0.2, 0.9)  # one per head
    gen = generator(heads=2, layers=(1,), beta=betas)
    block = gen.blocks["1"]
    with torch.no_grad():  # non-trivial layer norms, so that dropping one would show
        for norm in (block.norm_state, block.norm_stored):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    X = torch.randn(2, 6, D, dtype=torch.float64)
    P = gen.generate(1, X)
    assert P.shape == (2, 4, D)
    ln = lambda x, norm: F.layer_norm(x, (D,), norm.weight, norm.bias, 1e-5)
    q = ln(block.state_patterns, block.norm_state) @ block.q_proj.weight.T + block.q_proj.bias
    k = ln(X, block.norm_stored) @ block.k_proj.weight.T + block.k_proj.bias
    v = ln(X, block.norm_stored) @ block.v_proj.weight.T + block.v_proj.bias
    heads = []
    for h in range(2):
        c = slice(h * 16, (h + 1) * 16)
        A = torch.softmax(betas[h] * q[:, c] @ k[..., c].transpose(1, 2), dim=-1)  # [B, L_p, T]
        torch.testing.assert_close(gen.last_weights[1][:, h], A)
        heads.append(A @ v[..., c])
    expected = torch.cat(heads, -1) @ block.out_proj.weight.T + block.out_proj.bias
    torch.testing.assert_close(P, expected)


def test_prompts_depend_on_the_image():
    vit, gen = frozen_vit(), generator()
    hook, aux = gen()
    assert float(aux) == 0.0
    x = images(2)
    with torch.no_grad():
        vit(x, prompts=hook)
    for layer in (0, 1):
        P = gen.last_prompts[layer]
        assert P.shape == (2, 4, D)
        assert (P[0] - P[1]).abs().max() > 1e-3 * P.abs().max()  # two images, two sets of prompts
    assert set(gen.last_prompts) == {0, 1}  # block 2 is not prompted


@pytest.mark.parametrize("insertion", ["prompt", "prefix"])
def test_both_insertions_run_through_the_vit_and_change_its_output(insertion):
    vit, gen = frozen_vit(), generator(insertion=insertion)
    x = images()
    hook, _ = gen()
    kinds, lengths = {}, {}

    def spy(layer, tokens):
        lengths[layer] = tokens.shape[1]
        prompt = hook(layer, tokens)
        kinds[layer] = None if prompt is None else prompt[0]
        if prompt is not None and prompt[0] == "prefix":
            pk, pv = prompt[1]
            assert pk.shape == pv.shape == (3, 2, D)  # key and value halves of the 4 prompts
            torch.testing.assert_close(torch.cat([pk, pv], 1), gen.last_prompts[layer])
        return prompt

    logits = vit(x, prompts=spy)
    assert kinds == {0: insertion, 1: insertion, 2: None}
    assert lengths == {0: 1 + 4, 1: 1 + 4, 2: 1 + 4}  # prompt tokens leave after their block: CLS + 4 patches
    assert vit.tokens_at(x, N_LAYER, prompts=gen()[0]).shape == (3, 5, D)
    assert logits.shape == (3, 5) and not torch.allclose(logits, vit(x))


@pytest.mark.parametrize("insertion", ["prompt", "prefix"])
def test_a_zero_output_projection_is_not_a_zero_effect_init(insertion):
    # why the init is not zero-effect: zero prompts still take attention mass (a zero prompt token's
    # key is the projected norm bias; a zero prefix key scores 0 for every query), so no choice of
    # W_O leaves the frozen ViT's output unchanged
    vit, gen = frozen_vit(), generator(insertion=insertion)
    with torch.no_grad():
        for block in gen.blocks.values():
            block.out_proj.weight.zero_()
            block.out_proj.bias.zero_()
    x = images()
    prompted = vit(x, prompts=gen()[0])
    assert all(P.abs().max() == 0 for P in gen.last_prompts.values())
    assert (prompted - vit(x)).abs().max() > 1e-6


def test_no_prompted_blocks_leaves_the_vit_exactly_as_it_is():
    vit, gen = frozen_vit(), generator(layers=())
    x = images()
    assert torch.equal(vit(x, prompts=gen()[0]), vit(x))
    assert list(gen.parameters()) == []


def test_gradients_reach_the_generator_and_not_the_backbone():
    vit, gen = frozen_vit(), generator(heads=2, steps=2)
    x = images()
    F.cross_entropy(vit(x, prompts=gen()[0]), torch.arange(3)).backward()
    for layer in ("0", "1"):
        for name, p in gen.blocks[layer].named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (layer, name)
    assert all(p.grad is None for p in vit.parameters())


@pytest.mark.parametrize("train, trains", [
    ("all", {"state_patterns", "norm_state.weight", "norm_state.bias", "norm_stored.weight", "norm_stored.bias",
             "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
             "out_proj.weight", "out_proj.bias"}),
    ("queries", {"state_patterns"}),
    ("output", {"out_proj.weight", "out_proj.bias"}),
])
def test_train_option_freezes_what_it_says(train, trains):
    vit, gen = frozen_vit(), generator(train=train)
    F.cross_entropy(vit(images(), prompts=gen()[0]), torch.arange(3)).backward()
    for block in gen.blocks.values():
        for name, p in block.named_parameters():
            assert p.requires_grad == (name in trains), name
            assert (p.grad is not None and p.grad.abs().sum() > 0) == (name in trains), name


@pytest.mark.parametrize("insertion", ["prompt", "prefix"])
def test_static_ablation_gives_every_image_the_same_learned_prompt(insertion):
    vit, gen = frozen_vit(), generator(retrieval=False, insertion=insertion)
    assert {name for name, _ in gen.named_parameters()} == {"blocks.0.prompt", "blocks.1.prompt"}
    assert gen.blocks["0"].prompt.shape == (4, D) and gen.blocks["0"].prompt.abs().max() <= 1  # U(-1, 1)
    x = images(2)
    logits = vit(x, prompts=gen()[0])
    assert not torch.allclose(logits, vit(x))
    for layer in (0, 1):
        P = gen.last_prompts[layer]
        assert torch.equal(P[0], P[1]) and torch.equal(P[0], gen.blocks[str(layer)].prompt)
    assert gen.retrieval_stats() == {}
    F.cross_entropy(logits, torch.arange(2)).backward()
    assert all(p.grad.abs().sum() > 0 for p in gen.parameters())


def test_more_steps_change_the_prompts():
    X = torch.randn(2, 6, D, dtype=torch.float64)
    one, three = generator(), generator(steps=3)
    three.load_state_dict(one.state_dict())
    assert not torch.allclose(one.generate(0, X), three.generate(0, X))


def test_retrieval_stats_report_the_entropy_of_the_last_weights():
    gen = generator(layers=(0, 2))
    X = torch.randn(2, 6, D, dtype=torch.float64)
    gen()
    gen.generate(2, X)
    stats = gen.retrieval_stats()
    assert set(stats) == {2}
    w = gen.last_weights[2]
    entropy = -(w * w.log()).sum(-1)
    assert stats[2]["entropy"] == pytest.approx(entropy.mean().item())
    assert stats[2]["normalized_entropy"] == pytest.approx((entropy / math.log(6)).mean().item())
    assert 0 < stats[2]["normalized_entropy"] <= 1 and stats[2]["max_weight"] == pytest.approx(w.amax(-1).mean().item())
    with torch.no_grad():
        gen.blocks["2"].beta.fill_(1e4)  # a near one-hot retrieval: entropy near 0
    gen.generate(2, X)
    assert gen.retrieval_stats()[2]["normalized_entropy"] < 0.05


def test_defaults():
    gen = HopfieldPromptGenerator(192, 6)
    assert gen.layers == (0, 1)  # 3 blocks from layer 0 of 12, scaled to 6
    assert HopfieldPromptGenerator(192, 12).layers == (0, 1, 2) and HopfieldPromptGenerator(192, 3).layers == (0,)
    assert gen.length == 10 and gen.heads == 1 and gen.head_dim == 192 and gen.steps == 1
    assert gen.insertion == "prompt" and gen.train_what == "all" and gen.pool == "cls"
    assert gen.beta == pytest.approx(1 / math.sqrt(192))
    assert torch.equal(gen.blocks["0"].beta, torch.full((1, 1, 1), 1 / math.sqrt(192), dtype=torch.float64))
    assert gen.blocks["0"].state_patterns.std().item() == pytest.approx(0.02, rel=0.1)
    assert gen.blocks["0"].out_proj.bias.abs().sum() == 0 and gen.blocks["0"].out_proj.weight.abs().sum() > 0
    assert HopfieldPromptGenerator(192, 6, heads=3).blocks["0"].beta.flatten().tolist() == [1 / 8] * 3
    per_head = HopfieldPromptGenerator(192, 6, heads=2, beta=[0.5, 4.0]).blocks["1"].beta.flatten().tolist()
    assert per_head == [0.5, 4.0]
    narrow = HopfieldPromptGenerator(32, 2, heads=2, head_dim=8, layers=(0,)).double()
    assert narrow.blocks["0"].q_proj.out_features == 16 and narrow.blocks["0"].out_proj.in_features == 16
    assert narrow.blocks["0"].beta.flatten().tolist() == [1 / math.sqrt(8)] * 2
    assert narrow.generate(0, torch.randn(2, 5, 32, dtype=torch.float64)).shape == (2, 10, 32)
    plain = HopfieldPromptGenerator(32, 2, norms=False)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in plain.modules())


@pytest.mark.parametrize("options, message", [
    ({"layers": (0, 3)}, "layers must be distinct ints in 0..2"),
    ({"layers": (1, 1)}, "layers must be distinct"),
    ({"length": 0}, "length must be an int >= 1"),
    ({"insertion": "prefix", "length": 3}, "length must be even"),
    ({"insertion": "input"}, "insertion must be one of"),
    ({"train": "keys"}, "train must be one of"),
    ({"heads": 3}, "not divisible by heads=3"),
    ({"beta": 0}, "beta must be"),
    ({"beta": [1.0, -1.0], "heads": 2}, "beta must be"),
    ({"beta": [1.0, 2.0]}, "one per head \\(1\\), got 2"),
    ({"steps": 0}, "steps must be an int >= 1"),
    ({"norms": "yes"}, "norms must be true or false"),
    ({"retrieval": 0}, "retrieval must be true or false"),
    ({"retrieval": False, "train": "queries"}, "use train='all'"),
])
def test_bad_settings_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        HopfieldPromptGenerator(D, N_LAYER, **options)


def test_generate_rejects_unprompted_blocks_and_bad_tokens():
    gen = generator()
    with pytest.raises(ValueError, match="block 2 is not prompted"):
        gen.generate(2, torch.randn(1, 5, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="tokens must be"):
        gen.generate(0, torch.randn(1, 5, D + 1, dtype=torch.float64))
