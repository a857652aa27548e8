"""Tests of the Attractor Patch Network FFN (routemem.layers.apn): registration and option errors,
reference == grouped == fused at the layer level, the load-balance aux loss (and its way into
TransformerLM's loss), the EMA prototype pull, a learned tau, the dense trunk, the usage counter,
metrics, locality of a token's gradient, and the layer inside a TransformerLM (zero init, bf16
autocast, parameter count). Tests that take ``device`` run on the CPU and on CUDA (conftest.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from routemem.errors import ConfigError
from routemem.layers import FFNS, AttractorPatchFFN, DenseFFN, LayerSpec, build_ffn
from routemem.models import LMConfig, TransformerLM
from routemem.ops.apn import load_balance_loss, route, routing_stats

from op_checks import on_devices

D, H = 16, 2
SPEC = LayerSpec(d_model=D, n_head=H, max_seq_len=32)
SMALL = {"n_patches": 8, "rank": 4, "top_k": 2}


def make(dtype=torch.float32, **kw) -> AttractorPatchFFN:
    return build_ffn("apn", SPEC, {**SMALL, **kw}).to(dtype)


def tokens(layer, x):
    """The routing the layer will use for input x (computed from its current prototypes)."""
    return route(x.reshape(-1, D), layer.prototypes, layer.top_k, layer.tau)


def lm_config(**kw) -> LMConfig:
    base = {"vocab_size": 13, "n_layer": 2, "d_model": D, "n_head": H, "max_seq_len": 16, "ffn": "apn",
            "ffn_kwargs": dict(SMALL)}
    base.update(kw)
    return LMConfig(**base)


# --- registration and options ----------------------------------------------------------------


def test_registered_and_built_from_options():
    assert FFNS["apn"] is AttractorPatchFFN
    layer = build_ffn("apn", SPEC, {"n_patches": 5, "rank": 3, "top_k": 2, "tau": 0.2, "gamma": 0.5, "ema_decay": 0.9,
                                    "load_balance": 0.1, "prototype_update": "ema", "mode": "reference"})
    assert isinstance(layer, AttractorPatchFFN)
    assert (layer.n_patches, layer.rank, layer.top_k, layer.mode) == (5, 3, 2, "reference")
    assert layer.prototype_update == "ema" and layer.ema_decay == 0.9 and layer.load_balance == 0.1
    assert layer.gamma == 0.5 and math.isclose(layer.tau.item(), 0.2, rel_tol=1e-6)
    assert layer.prototypes.shape == (5, D) and layer.code.shape == (D, 3) and layer.up.shape == (5, D, 3)
    assert layer.gate_scale.shape == layer.gate_bias.shape == (5, 3)
    default = build_ffn("apn", SPEC)
    assert default.mode == "auto" and default.prototype_update == "sgd" and default.trunk is None
    # unit-norm prototypes; gates start at sigmoid(0)
    torch.testing.assert_close(default.prototypes.norm(dim=-1), torch.ones(default.n_patches))
    assert not default.gate_scale.any() and not default.gate_bias.any()


@pytest.mark.parametrize("kw, words", [
    ({"top_k": 9}, ["top_k", "n_patches"]),
    ({"tau": 0.0}, ["tau"]),
    ({"tau": -0.5}, ["tau"]),
    ({"tau": float("inf")}, ["tau"]),
    ({"prototype_update": "adam"}, ["prototype_update", "adam"]),
    ({"ema_decay": 1.0}, ["ema_decay"]),
    ({"ema_decay": -0.1}, ["ema_decay"]),
    ({"load_balance": -0.01}, ["load_balance"]),
    ({"load_balance": "0.01"}, ["load_balance"]),
    ({"mode": "fast"}, ["mode", "fast"]),
    ({"n_patches": 8.0}, ["n_patches"]),
    ({"n_patches": True}, ["n_patches"]),
    ({"rank": 0}, ["rank"]),
    ({"top_k": 0}, ["top_k"]),
    ({"trunk_hidden": -1}, ["trunk_hidden"]),
    ({"n_patch": 8}, ["n_patch"]),  # a typo: the registry turns the TypeError into a ConfigError
])
def test_bad_options_are_config_errors(kw, words):
    with pytest.raises(ConfigError) as info:
        build_ffn("apn", SPEC, {**SMALL, **kw})
    for word in words:
        assert word in str(info.value)


def test_good_edge_options():
    make(top_k=8)  # top_k = n_patches
    make(ema_decay=0.0, prototype_update="ema")
    make(load_balance=0)


# --- reference == grouped == fused --------------------------------------------------------------------


@pytest.mark.parametrize("kw, dtype", [
    ({}, torch.float64),
    ({"learn_tau": True, "trunk_hidden": 8, "top_k": 3, "gamma": 0.7}, torch.float64),
    ({"top_k": 1, "n_patches": 3}, torch.float64),
    ({"prototype_update": "ema", "ema_decay": 0.5}, torch.float32),
], ids=["default", "learn_tau-trunk", "k1", "ema"])
@pytest.mark.parametrize("mode, device", on_devices("grouped", "fused"))
def test_reference_and_fast_layers_agree(kw, dtype, mode, device):
    grouped = make(dtype, mode=mode, load_balance=0.05, **kw).to(device).train()
    ref = make(dtype, mode="reference", load_balance=0.05, **kw).to(device).train()
    ref.load_state_dict(grouped.state_dict())
    with torch.no_grad():  # non-zero gates, so a and b matter
        for layer in (grouped, ref):
            layer.gate_scale.copy_(torch.linspace(-1, 1, layer.gate_scale.numel()).view_as(layer.gate_scale))
            layer.gate_bias.fill_(0.3)
    x = torch.randn(2, 9, D, dtype=dtype).to(device)
    w = torch.randn(2, 9, D, dtype=dtype).to(device)
    results = []
    for layer in (grouped, ref):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        ((y * w).sum() + layer.aux_loss).backward()
        grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
        results.append((y.detach(), xi.grad, grads, layer.aux_loss.detach(), layer.prototypes.detach().clone()))
    (y_g, gx_g, grads_g, aux_g, p_g), (y_r, gx_r, grads_r, aux_r, p_r) = results
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(y_g, y_r, **tol)
    torch.testing.assert_close(gx_g, gx_r, **tol)
    torch.testing.assert_close(aux_g, aux_r, **tol)
    torch.testing.assert_close(p_g, p_r, **tol)  # (the ema pull does not depend on the mode)
    assert grads_g.keys() == grads_r.keys()
    for name in grads_g:
        assert grads_g[name] is not None, name
        torch.testing.assert_close(grads_g[name], grads_r[name], **tol, msg=lambda m, name=name: f"grad {name}\n{m}")
    assert grads_g["up"].abs().max() > 0 and grads_g["gate_scale"].abs().max() > 0


# --- aux loss --------------------------------------------------------------------------------


def test_aux_loss_train_eval_and_off():
    layer = make(load_balance=0.05).train()
    x = torch.randn(2, 7, D)
    layer(x)
    assert isinstance(layer.aux_loss, torch.Tensor) and layer.aux_loss.dim() == 0 and layer.aux_loss.requires_grad
    expected = 0.05 * load_balance_loss(tokens(layer, x))
    torch.testing.assert_close(layer.aux_loss, expected)
    assert layer.aux_loss.item() > 0
    layer.eval()
    layer(x)
    assert layer.aux_loss is None  # reset, not left over from the training forward
    off = make(load_balance=0.0).train()
    off(x)
    assert off.aux_loss is None


def test_transformer_loss_includes_aux():
    with_aux = TransformerLM(lm_config(ffn_kwargs={**SMALL, "load_balance": 0.05})).train()
    without = TransformerLM(lm_config(ffn_kwargs={**SMALL, "load_balance": 0.0})).train()
    without.load_state_dict(with_aux.state_dict())
    idx, targets = torch.randint(0, 13, (2, 10)), torch.randint(0, 13, (2, 10))
    logits_a, loss_a = with_aux(idx, targets)
    logits_b, loss_b = without(idx, targets)
    torch.testing.assert_close(logits_a, logits_b)
    assert without.aux_loss() is None
    aux = sum(block.ffn.aux_loss for block in with_aux.blocks)
    assert aux.item() > 0.05  # two layers, each 0.05 * (a loss near 1 for a balanced router)
    torch.testing.assert_close(loss_a - loss_b, aux)
    torch.testing.assert_close(with_aux.aux_loss(), aux)
    loss_a.backward()
    loss_b.backward()
    # the aux term trains the router: it changes the prototypes' gradient
    pa, pb = with_aux.blocks[0].ffn.prototypes.grad, without.blocks[0].ffn.prototypes.grad
    assert not torch.allclose(pa, pb)
    with_aux.eval()
    _, loss_eval = with_aux(idx, targets)
    torch.testing.assert_close(loss_eval, F.cross_entropy(logits_a.reshape(-1, 13), targets.reshape(-1)))


# --- prototypes: ema pull and sgd ------------------------------------------------------------


def cos(a, b):
    return F.cosine_similarity(a, b, dim=-1)


def test_ema_pulls_used_prototypes_towards_their_tokens():
    layer = make(n_patches=16, top_k=2, prototype_update="ema", ema_decay=0.8).train()
    assert not layer.prototypes.requires_grad
    with torch.no_grad():  # off the unit sphere (routing ignores norms): the pull must renormalise
        layer.prototypes.mul_(torch.linspace(0.5, 3.0, 16)[:, None])
    x = torch.randn(1, 4, D)
    routing = tokens(layer, x)
    before = layer.prototypes.detach().clone()
    y = layer(x)
    after = layer.prototypes.detach().clone()
    unit = F.normalize(x.reshape(-1, D), dim=-1)
    used = routing.indices.unique().tolist()
    assert len(used) < 16  # some patches unused
    for i in range(16):
        rows = (routing.indices == i).any(-1)
        if i not in used:
            assert torch.equal(after[i], before[i]), f"unused prototype {i} moved"
            continue
        mean = unit[rows].mean(0)
        assert cos(after[i], mean) > cos(before[i], mean), f"prototype {i} did not move towards its tokens"
        expected = 0.8 * F.normalize(before[i], dim=-1) + 0.2 * mean
        torch.testing.assert_close(after[i], expected, msg=lambda m, i=i: f"prototype {i}\n{m}")
    y.sum().backward()
    assert layer.prototypes.grad is None  # ema mode: no gradient
    # no pull in eval mode, nor when the flag is off
    layer.eval()
    layer(x)
    assert torch.equal(layer.prototypes, after)
    layer.train()
    layer.update_prototypes = False
    layer(x)
    assert torch.equal(layer.prototypes, after)


def test_ema_counts_a_token_once_per_slot():
    """A patch chosen by one token only: the pull goes exactly towards that token's direction."""
    layer = make(n_patches=4, top_k=1, prototype_update="ema", ema_decay=0.0).train()
    x = torch.randn(1, 1, D)
    i = int(tokens(layer, x).indices[0, 0])
    layer(x)
    torch.testing.assert_close(layer.prototypes[i], F.normalize(x[0, 0], dim=-1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_ema_in_a_non_float32_layer(dtype):
    layer = make(dtype, prototype_update="ema").train()
    before = layer.prototypes.detach().clone()
    layer(torch.randn(2, 3, D, dtype=dtype))
    assert layer.prototypes.dtype == dtype and not torch.equal(layer.prototypes, before)


def test_routing_runs_in_full_precision_under_autocast():
    layer = make(torch.float32).train()
    x = torch.randn(4, 16, D)
    with torch.no_grad():
        plain = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = layer(x)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain)  # the whole layer is autocast-free: identical choices


def test_empty_training_batch_has_zero_aux_loss():
    layer = make(torch.float32).train()
    layer(torch.randn(0, 3, D))
    assert layer.aux_loss is not None and float(layer.aux_loss.detach()) == 0.0


def test_sgd_prototypes_learn_by_gradient_not_by_forward():
    layer = make(prototype_update="sgd").train()
    assert layer.prototypes.requires_grad
    before = layer.prototypes.detach().clone()
    x = torch.randn(2, 5, D)
    (layer(x) * torch.randn(2, 5, D)).sum().add(layer.aux_loss).backward()
    assert torch.equal(layer.prototypes.detach(), before)
    assert layer.prototypes.grad is not None and layer.prototypes.grad.abs().max() > 0


def test_frozen_prototypes_stay_at_their_random_init_through_training():
    """prototype_update="frozen" is a random router: neither the gradient nor the EMA pull moves the
    prototypes, while the patches still learn (the "random routing" arm of the absorption study)."""
    layer = make(prototype_update="frozen").train()
    assert not layer.prototypes.requires_grad
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        x = torch.randn(2, 5, D)
        (layer(x) * torch.randn(2, 5, D)).sum().add(layer.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(layer.prototypes.detach(), before["prototypes"])
    assert torch.allclose(layer.prototypes.norm(dim=-1), torch.ones(SMALL["n_patches"]))  # unit-norm random
    assert not torch.equal(layer.up.detach(), before["up"])


# --- tau, trunk, usage, metrics -------------------------------------------------------------


def test_learn_tau():
    layer = make(learn_tau=True, tau=0.3).train()
    params = dict(layer.named_parameters())
    assert "log_tau" in params and params["log_tau"].requires_grad
    assert math.isclose(layer.tau.item(), 0.3, rel_tol=1e-6)
    x = torch.randn(2, 6, D)
    (layer(x) * torch.randn(2, 6, D)).sum().backward()
    assert layer.log_tau.grad is not None and layer.log_tau.grad.abs() > 0
    assert math.isclose(layer.metrics()["tau"], 0.3, rel_tol=1e-6)

    fixed = make(learn_tau=False, tau=0.3)
    assert "log_tau" not in dict(fixed.named_parameters())
    assert "log_tau" in dict(fixed.named_buffers())
    assert math.isclose(fixed.tau.item(), 0.3, rel_tol=1e-6)


def test_trunk():
    layer = make(trunk_hidden=8).train()
    assert isinstance(layer.trunk, DenseFFN) and layer.trunk.up.out_features == 8
    residual = layer.residual_weights()
    assert len(residual) == 2 and residual[0] is layer.up and residual[1] is layer.trunk.down.weight
    plain = make(trunk_hidden=0)
    assert plain.trunk is None and len(plain.residual_weights()) == 1 and plain.residual_weights()[0] is plain.up
    missing, unexpected = plain.load_state_dict(layer.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("trunk.") for k in unexpected)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        layer.eval(), plain.eval()
        torch.testing.assert_close(layer(x), plain(x) + layer.trunk(x))
        assert layer.trunk(x).abs().max() > 0


def test_usage_counter_accumulates():
    layer = make(n_patches=8, top_k=3)
    assert layer.usage is None
    layer(torch.randn(1, 3, D))  # no counter: nothing happens
    layer.usage = torch.zeros(8, dtype=torch.long)
    expected = torch.zeros(8, dtype=torch.long)
    for mode, shape in (("train", (2, 5, D)), ("eval", (1, 7, D)), ("train", (3, 1, D))):
        layer.train(mode == "train")
        x = torch.randn(*shape)
        expected += torch.bincount(tokens(layer, x).indices.flatten(), minlength=8)
        layer(x)
    assert torch.equal(layer.usage, expected)
    assert int(layer.usage.sum()) == (10 + 7 + 3) * 3


def test_metrics_after_a_training_forward():
    layer = make(n_patches=8, top_k=2, tau=0.25).train()
    x = torch.randn(2, 11, D)
    expected = routing_stats(tokens(layer, x))
    layer(x)
    metrics = layer.metrics()
    assert set(metrics) == {"load_entropy", "router_entropy", "max_load", "unused_fraction", "tau"}
    assert all(type(v) is float for v in metrics.values())
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value.item(), rel=1e-6, abs=1e-7), name
    assert metrics["tau"] == pytest.approx(0.25)
    assert 0 < metrics["load_entropy"] <= math.log(8) + 1e-6
    model = TransformerLM(lm_config()).train()
    model(torch.randint(0, 13, (2, 6)))
    logged = model.layer_metrics()
    assert {f"blocks.{i}.ffn.{k}" for i in range(2) for k in metrics} <= set(logged)


# --- locality, parameter groups, accounting ----------------------------------------------------


def test_one_token_touches_only_its_top_k_patches():
    layer = make(n_patches=8, top_k=3, trunk_hidden=0).train()
    with torch.no_grad():
        layer.gate_scale.normal_(), layer.gate_bias.normal_()
    x = torch.randn(1, 1, D)
    chosen = set(tokens(layer, x).indices[0].tolist())
    (layer(x) * torch.randn(1, 1, D)).sum().backward()
    for p in layer.patch_parameters():
        touched = {i for i in range(8) if (p.grad[i] != 0).any()}
        assert touched == chosen, (touched, chosen)


def test_patch_parameters():
    layer = make()
    params = layer.patch_parameters()
    assert len(params) == 3 and params[0] is layer.up and params[1] is layer.gate_scale and params[2] is layer.gate_bias
    with_code = layer.patch_parameters(include_code=True)
    assert len(with_code) == 4 and with_code[:3] == params and with_code[3] is layer.code
    assert all(isinstance(p, torch.nn.Parameter) for p in with_code)
    assert not any(p is layer.prototypes for p in with_code)


@pytest.mark.parametrize("kw", [{}, {"learn_tau": True}, {"trunk_hidden": 12}])
def test_parameter_count_is_the_sum_of_the_parts(kw):
    K, r, k = SMALL["n_patches"], SMALL["rank"], SMALL["top_k"]
    apn = K * D + D * r + K * D * r + 2 * K * r + (1 if kw.get("learn_tau") else 0) + 2 * D * kw.get("trunk_hidden", 0)
    layer = make(**kw)
    assert sum(p.numel() for p in layer.parameters()) == apn
    trunk = 2 * D * kw.get("trunk_hidden", 0)
    assert layer.active_params_per_token() == K * D + D * r + k * (D * r + 2 * r) + trunk
    model = TransformerLM(lm_config(ffn_kwargs={**SMALL, **kw}))
    attention = 4 * D * D  # q, k, v, out projections, no bias
    norm = 2 * D  # LayerNorm weight and bias
    block = attention + 2 * norm + apn
    emb = 13 * D + 16 * D  # tied token embedding, learned positions
    assert model.num_params() == emb + 2 * block + norm
    assert sum(p.numel() for p in model.blocks[0].ffn.parameters()) == apn


# --- inside a TransformerLM ------------------------------------------------------------------


@pytest.mark.parametrize("trunk_hidden", [0, 8])
def test_zero_init_residual_zeroes_the_ffn_branch(trunk_hidden):
    ffn_kwargs = {**SMALL, "trunk_hidden": trunk_hidden}
    outputs = {}
    for zero in (True, False):
        model = TransformerLM(lm_config(ffn_kwargs=ffn_kwargs, zero_init_residual=zero)).eval()
        seen = []
        hooks = [b.ffn.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o)) for b in model.blocks]
        with torch.no_grad():
            model(torch.randint(0, 13, (2, 9)))
        for h in hooks:
            h.remove()
        assert len(seen) == 2
        outputs[zero] = seen
        if zero:  # routing itself is intact: prototypes still unit norm
            for block in model.blocks:
                torch.testing.assert_close(block.ffn.prototypes.norm(dim=-1), torch.ones(SMALL["n_patches"]))
    for out in outputs[True]:
        assert torch.equal(out, torch.zeros_like(out))
    for out in outputs[False]:
        assert out.abs().max() > 0


@pytest.mark.parametrize("kw", [{"mode": "grouped"}, {"mode": "reference"},
                                {"prototype_update": "ema", "learn_tau": True, "trunk_hidden": 8}],
                         ids=["grouped", "reference", "ema-learn_tau-trunk"])
def test_bf16_autocast_in_a_model(kw):
    model = TransformerLM(lm_config(ffn_kwargs={**SMALL, **kw})).eval()
    idx, targets = torch.randint(0, 13, (2, 12)), torch.randint(0, 13, (2, 12))
    with torch.no_grad():
        full = model(idx)  # float32, before any ema pull
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, targets)
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert model.aux_loss() is not None
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.blocks[0].ffn.up.grad.abs().max() > 0
    rel = (logits.float() - full).norm() / full.norm()
    assert rel < 0.05, rel  # bf16 only rounded, did not break anything
