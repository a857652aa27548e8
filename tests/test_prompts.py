"""Tests of routemem.layers.prompts: L2P, DualPrompt and CODA-Prompt with a tiny frozen ViT."""

import pytest
import torch
import torch.nn.functional as F

from routemem.errors import ConfigError
from routemem.layers.prompts import (
    L2P,
    CodaPrompt,
    DualPrompt,
    orthonormal_rows,
    pull_loss,
    scale_layers,
)
from routemem.models import VisionTransformer, ViTConfig

D = 32


def frozen_vit(n_layer=3) -> VisionTransformer:
    model = VisionTransformer(ViTConfig(image_size=16, patch_size=4, in_chans=1, d_model=D, n_layer=n_layer,
                                        n_head=4, mlp_hidden=48, n_classes=5)).double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def images(batch=4):
    return torch.randn(batch, 1, 16, 16, dtype=torch.float64)


def test_scale_layers_maps_the_official_ranges_proportionally():
    assert scale_layers(0, 5, 12) == (0, 1, 2, 3, 4)  # the original
    assert scale_layers(0, 2, 12) == (0, 1) and scale_layers(2, 5, 12) == (2, 3, 4)
    assert scale_layers(0, 5, 6) == (0, 1, 2)
    assert scale_layers(0, 2, 4) == (0,) and scale_layers(2, 5, 4) == (1,) and scale_layers(0, 5, 4) == (0, 1)
    assert scale_layers(0, 2, 3) == (0,) and scale_layers(2, 5, 3) == (1,)
    assert scale_layers(2, 5, 1) == (0,)  # at least one layer, never past the last


# --- L2P -----------------------------------------------------------------------------------


def test_l2p_picks_the_top_n_keys_by_cosine():
    l2p = L2P(D, pool_size=10, length=5, top_n=3).double()
    query = torch.randn(4, D, dtype=torch.float64)
    prompts, aux = l2p(query)
    kind, P = prompts[0]
    assert kind == "input" and set(prompts) == {0} and P.shape == (4, 3 * 5, D)
    cos = torch.stack([torch.stack([F.cosine_similarity(q, k, dim=0) for k in l2p.keys]) for q in query])
    order = cos.argsort(dim=1, descending=True)[:, :3]
    torch.testing.assert_close(P, torch.stack([l2p.prompts[o].reshape(15, D) for o in order]))
    best = cos.gather(1, order)
    torch.testing.assert_close(aux, 0.1 * (1 - best).sum(1).mean())


def test_pull_loss_decreases_when_keys_move_toward_the_queries():
    l2p = L2P(D).double()
    query = torch.randn(8, D, dtype=torch.float64)
    _, before = l2p(query)
    before.backward()
    with torch.no_grad():
        l2p.keys -= 1.0 * l2p.keys.grad  # one SGD step on the keys
    _, after = l2p(query)
    assert after < before
    assert l2p.prompts.grad is None  # the pull loss trains the keys only


def test_l2p_with_the_vit():
    vit = frozen_vit()
    l2p = L2P(D).double()
    x = images()
    with torch.no_grad():
        query = vit.features(x)
    prompts, aux = l2p(query)
    logits = vit(x, prompts=prompts, pool=l2p.pool)
    assert logits.shape == (4, 5)
    (F.cross_entropy(logits, torch.arange(4) % 5) + aux).backward()
    assert l2p.prompts.grad.abs().sum() > 0 and l2p.keys.grad.abs().sum() > 0
    assert all(p.grad is None for p in vit.parameters())


def test_prompt_length_zero_leaves_the_vit_unchanged():
    vit = frozen_vit()
    x = images()
    query = vit.features(x)
    l2p = L2P(D, length=0, head="cls").double()
    assert torch.equal(vit(x, prompts=l2p(query)[0], pool=l2p.pool), vit(x))
    dual = DualPrompt(D, 3, g_length=0, e_length=0).double()
    assert torch.equal(vit(x, prompts=dual(query)[0], pool=dual.pool), vit(x))


def test_l2p_config_errors():
    with pytest.raises(ConfigError, match="top_n"):
        L2P(D, pool_size=3, top_n=5)
    with pytest.raises(ConfigError, match="head"):
        L2P(D, head="mean")
    with pytest.raises(ConfigError, match="length"):
        L2P(D, length=0)  # head="prompt" needs prompt tokens


# --- DualPrompt ----------------------------------------------------------------------------


def test_dualprompt_prefixes_at_general_and_expert_layers():
    dual = DualPrompt(D, n_layer=4, g_length=5, e_length=6, pool_size=10).double()
    assert dual.g_layers == (0,) and dual.e_layers == (1,)
    query = torch.randn(3, D, dtype=torch.float64)
    prompts, aux = dual(query)
    assert set(prompts) == {0, 1}
    kind, (gk, gv) = prompts[0]
    assert kind == "prefix" and gk.shape == gv.shape == (3, 5, D)
    torch.testing.assert_close(gk[1], dual.g_prompts[0, 0])
    torch.testing.assert_close(gv[2], dual.g_prompts[0, 1])
    _, (ek, ev) = prompts[1]
    assert ek.shape == ev.shape == (3, 6, D)
    best = F.normalize(query, dim=1) @ F.normalize(dual.keys, dim=1).T
    chosen = best.argmax(dim=1)
    for b in range(3):  # top-1 expert by cosine
        torch.testing.assert_close(ek[b], dual.e_prompts[0, 0, chosen[b]])
        torch.testing.assert_close(ev[b], dual.e_prompts[0, 1, chosen[b]])
    torch.testing.assert_close(aux, pull_loss(best.max(dim=1, keepdim=True).values))


def test_dualprompt_task_forces_the_expert_and_layers_can_overlap():
    dual = DualPrompt(D, n_layer=2).double()  # 2 blocks: G and E both at block 0, concatenated
    assert dual.g_layers == dual.e_layers == (0,)
    query = torch.randn(3, D, dtype=torch.float64)
    prompts, aux = dual(query, task=7)
    _, (k, _) = prompts[0]
    assert k.shape == (3, 5 + 5, D)
    torch.testing.assert_close(k[:, 5:], dual.e_prompts[0, 0, 7].expand(3, -1, -1))
    torch.testing.assert_close(aux, pull_loss(F.cosine_similarity(query, dual.keys[7:8], dim=1)[:, None]))
    with pytest.raises(ValueError, match="task"):
        dual(query, task=10)


def test_dualprompt_with_the_vit_trains_the_prompts_and_keys():
    vit = frozen_vit()
    dual = DualPrompt(D, n_layer=3).double()
    x = images()
    prompts, aux = dual(vit.features(x))
    logits = vit(x, prompts=prompts)
    assert not torch.allclose(logits, vit(x))
    (logits.sum() + aux).backward()
    assert dual.g_prompts.grad.abs().sum() > 0 and dual.keys.grad.abs().sum() > 0
    used = dual.e_prompts.grad.abs().sum(dim=(0, 1, 3, 4)) > 0
    assert 1 <= used.sum() <= 4  # only the chosen experts get a gradient


# --- CODA-Prompt ---------------------------------------------------------------------------


def assert_orthonormal_rows(X, tol=1e-5):
    X = X.reshape(X.shape[0], -1).double()
    torch.testing.assert_close(X @ X.T, torch.eye(X.shape[0], dtype=torch.float64), rtol=tol, atol=tol)


def test_coda_components_are_orthonormal_at_init():
    coda = CodaPrompt(D, n_layer=4, n_tasks=3, n_components=9, length=8)
    assert coda.layers == (0, 1)
    for group in (coda.components, coda.keys, coda.attention):
        for layer in range(2):
            assert_orthonormal_rows(group[0][layer])
            assert group[1].abs().sum() == 0  # later tasks: not initialised yet
    assert coda.ortho_penalty() < 1e-10


def test_coda_start_task_freezes_the_old_and_adds_orthogonal_new_components():
    coda = CodaPrompt(D, n_layer=3, n_tasks=3, n_components=9)
    with torch.no_grad():  # as if task 0 had been trained
        for group in (coda.components, coda.keys, coda.attention):
            group[0].add_(0.3 * torch.randn_like(group[0]))
    old = [group[0].detach().clone() for group in (coda.components, coda.keys, coda.attention)]
    coda.start_task(1)
    for group, before in zip((coda.components, coda.keys, coda.attention), old):
        assert torch.equal(group[0], before) and not group[0].requires_grad and group[1].requires_grad
        new = group[1][0].flatten(1).double()
        assert_orthonormal_rows(new)
        assert (new @ before[0].flatten(1).double().T).abs().max() < 1e-5  # orthogonal to the trained rows
    prompts, _ = coda(torch.randn(2, D))
    sum(k.sum() + v.sum() for _, (k, v) in prompts.values()).backward()
    assert coda.keys[0].grad is None and coda.keys[1].grad.abs().sum() > 0 and coda.keys[2].grad is None
    coda.start_task(1)  # the same task again: nothing changes
    assert torch.equal(coda.keys[0], old[1])
    with pytest.raises(ValueError, match="before"):
        coda.start_task(0)


def test_coda_prompt_is_the_attention_weighted_sum_split_into_key_and_value():
    coda = CodaPrompt(D, n_layer=3, n_tasks=2, n_components=8, length=8).double()
    coda.start_task(1)
    query = torch.randn(3, D, dtype=torch.float64)
    prompts, aux = coda(query)
    assert set(prompts) == {0} and aux == 0
    kind, (k, v) = prompts[0]
    assert kind == "prefix" and k.shape == v.shape == (3, 4, D)
    P = torch.cat([coda.components[0][0], coda.components[1][0]])  # [8, 8, D]
    K = torch.cat([coda.keys[0][0], coda.keys[1][0]])
    A = torch.cat([coda.attention[0][0], coda.attention[1][0]])
    for b in range(3):
        alpha = torch.stack([F.cosine_similarity(query[b] * A[m], K[m], dim=0) for m in range(8)])
        expected = (alpha[:, None, None] * P).sum(0)
        torch.testing.assert_close(torch.cat([k[b], v[b]]), expected)


def test_coda_with_the_vit_and_the_ortho_loss():
    vit = frozen_vit(n_layer=4)
    coda = CodaPrompt(D, n_layer=4, n_tasks=2, ortho_mu=0.1).double()
    assert sum(p.numel() for p in coda.keys) == 2 * 2 * 16 * D  # min(100, 32) components, 16 per task, 2 layers
    x = images()
    prompts, aux = coda(vit.features(x))
    assert set(prompts) == {0, 1} and aux.item() == pytest.approx(0.0, abs=1e-8)  # orthonormal at init
    logits = vit(x, prompts=prompts)
    assert not torch.allclose(logits, vit(x))
    logits.sum().backward()
    assert coda.components[0].grad.abs().sum() > 0


def test_coda_config_errors():
    with pytest.raises(ConfigError, match="d_model"):
        CodaPrompt(D, n_layer=3, n_tasks=5, n_components=40)
    with pytest.raises(ConfigError, match="multiple"):
        CodaPrompt(D, n_layer=3, n_tasks=3, n_components=10)
    with pytest.raises(ConfigError, match="even"):
        CodaPrompt(D, n_layer=3, n_tasks=2, length=5)
    with pytest.raises(ConfigError, match="layers"):
        CodaPrompt(D, n_layer=3, n_tasks=2, layers=(0, 3))


def test_orthonormal_rows_against_a_span():
    against = torch.randn(5, 12, dtype=torch.float64)
    rows = orthonormal_rows(7, 12, against)
    assert_orthonormal_rows(rows, tol=1e-10)
    assert (rows @ against.T).abs().max() < 1e-10
