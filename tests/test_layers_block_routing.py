"""The gated_sparse mixer at block granularity (routemem/layers/block_routing.py): step decoding equals
the parallel form for every gate, mode and deploy path that can decode (learned positions and RoPE),
the block oracle refuses to decode; causality at every position; moba has no gate parameters; hard
routing passes exactly zero gradient to the gate and soft a non-zero one; the oracle deploys the op's
choice by block mass; option errors; metrics; accounting."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_layers_gated_sparse import decode  # token-by-token through step()

from routemem.errors import ConfigError
from routemem.layers import LayerSpec, build_mixer
from routemem.layers.block_routing import ORACLE_STEP
from routemem.ops.gated_sparse.block import block_routed_attention
from routemem.ops.gated_sparse.block_select import block_attention_mass

D, H, S, T, BS, KB = 16, 2, 32, 23, 4, 2
COMBOS = [(g, m, d) for g, m, d in itertools.product(("learned", "random", "moba", "none"), ("soft", "hard"),
                                                      ("gate", "dense")) if not (g == "none" and m == "hard")]


def layer(pos="learned", seed=0, **options):
    torch.manual_seed(seed)
    options = {"granularity": "block", "block_size": BS, "top_k_blocks": KB, "rank": 4, **options}
    spec = LayerSpec(d_model=D, n_head=H, max_seq_len=S, pos=pos)
    return build_mixer("gated_sparse", spec, options).double().eval()


def inputs(B=2, length=T, seed=1):
    return torch.randn(B, length, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("gate,mode,deploy", COMBOS)
def test_step_equals_parallel(gate, mode, deploy, pos):
    mixer = layer(pos, gate=gate, mode=mode, deploy=deploy)
    x = inputs()
    with torch.no_grad():
        assert torch.allclose(decode(mixer, x), mixer(x), atol=1e-12, rtol=0)


def test_block_oracle_refuses_to_decode_in_one_line():
    mixer = layer(deploy="oracle")
    mixer(inputs())  # the parallel form deploys it
    with pytest.raises(ValueError, match="^deploy 'oracle' at granularity 'block'"):
        mixer.step(inputs()[:, 0], None)
    assert "\n" not in ORACLE_STEP


def test_oracle_deploys_the_top_blocks_by_dense_mass():
    mixer = layer(deploy="oracle")
    x = inputs()
    q, k, v = mixer._heads(x, 0)
    mass = block_attention_mass(q, k, BS)
    expected = mixer.out(block_routed_attention(q, k, v, mass, block_size=BS, top_k_blocks=KB, mode="reference")
                         .reshape(x.shape))
    assert torch.allclose(mixer(x), expected, atol=1e-12)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("gate,mode", [("learned", "soft"), ("learned", "hard"), ("moba", "hard"), ("moba", "soft")])
def test_causal_when_the_future_changes(gate, mode, train):
    mixer = layer(gate=gate, mode=mode).train(train)
    x = inputs()
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        base = mixer(x)
        for t in range(-1, T - 1):
            changed = x.clone()
            changed[:, t + 1:] = torch.randn(changed[:, t + 1:].shape, generator=gen, dtype=x.dtype)
            after = mixer(changed)
            assert torch.equal(after[:, :t + 1], base[:, :t + 1]), f"positions <= {t} saw later tokens"


def test_moba_has_no_gate_parameters_and_random_is_frozen():
    names = {n for n, _ in layer(gate="moba", mode="hard").named_parameters()}
    assert names == {n for n, _ in layer(gate="none").named_parameters()}
    frozen = layer(gate="random")
    assert not frozen.gate_q.weight.requires_grad and not frozen.gate_k.weight.requires_grad


def test_hard_gives_the_gate_zero_gradient_and_soft_a_nonzero_one():
    x = inputs()
    for mode, nonzero in (("hard", False), ("soft", True)):
        mixer = layer(mode=mode).train()
        mixer(x).pow(2).sum().backward()
        grads = [p.grad for p in (mixer.gate_q.weight, mixer.gate_k.weight)]
        moved = any(g is not None and torch.count_nonzero(g) > 0 for g in grads)
        assert moved == nonzero, mode
        assert mixer.qkv.weight.grad is not None and torch.count_nonzero(mixer.qkv.weight.grad) > 0


@pytest.mark.parametrize("options,match", [
    ({"granularity": "token", "gate": "moba"}, "options of granularity 'block'"),
    ({"granularity": "token", "top_k_blocks": 2}, "options of granularity 'block'"),
    ({"k": 3}, "k apply to granularity 'token'"),
    ({"mask_randomisation": 0.5}, "mask_randomisation apply to granularity 'token'"),
    ({"block_size": 0}, "block_size must be an int >= 1"),
    ({"top_k_blocks": -1}, "top_k_blocks must be an int >= 0"),
    ({"block_form": "fast"}, "block_form must be one of"),
    ({"granularity": "tile"}, "granularity must be one of"),
    ({"gate": "none", "mode": "hard"}, "needs a gate"),
])
def test_option_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        layer(**options)


def test_default_top_k_blocks_is_an_eighth_of_the_blocks():
    spec = LayerSpec(d_model=D, n_head=H, max_seq_len=1024)
    assert build_mixer("gated_sparse", spec, {"granularity": "block"}).block.top_k_blocks == 2  # 16 blocks of 64
    assert build_mixer("gated_sparse", spec, {"granularity": "block", "block_size": 8}).block.top_k_blocks == 16


def test_metrics_report_block_concentration_and_the_gate_against_the_oracle():
    mixer = layer()
    mixer.track_stats = True
    mixer(inputs())
    metrics = mixer.metrics()
    assert 0 < metrics["block_concentration"] <= 1 and 0 <= metrics["gate_oracle_f1"] <= 1
    assert metrics["gate_score_rms"] > 0 and metrics["gate_weight_rms"] > 0


def test_hard_routing_counts_fewer_flops_than_soft_and_decoding_state_grows_with_features():
    hard, soft = layer(mode="hard"), layer(mode="soft")
    assert hard.extra_flops_per_token(S) < soft.extra_flops_per_token(S)
    assert layer(gate="moba").state_size() > layer(gate="none").state_size()
