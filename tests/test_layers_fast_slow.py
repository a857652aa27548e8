"""Tests of the fast_slow mixer (routemem/layers/fast_slow.py) in a TransformerLM: a closed gate is
plain attention, the first backward reaches the gate and not the slow path, the gate is not
decayed and freeze_slow freezes exactly the slow path, step decoding equals the parallel form and
the model is causal with the gate open and blocks that complete inside the sequence, option
errors, gate metrics (by hand, in layer_metrics and in a Trainer's metrics.jsonl), bf16 autocast
and the state size. Tests that take ``device`` run on the CPU and on CUDA (conftest.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from routemem.config import from_dict
from routemem.errors import ConfigError
from routemem.layers import LayerSpec, build_mixer
from routemem.layers.attention import CausalSelfAttention
from routemem.layers.fast_slow import FastSlowAttention
from routemem.models import LMConfig, TransformerLM
from routemem.train import RunConfig, Trainer
from routemem.train.optim import param_groups

V, D, H, S = 17, 16, 2, 29
GATES = ["vector", "scalar", "tanh"]


def config(mixer_kwargs=None, **kw) -> LMConfig:
    base = dict(vocab_size=V, n_layer=2, d_model=D, n_head=H, max_seq_len=S, mixer="fast_slow",
                mixer_kwargs={"block": 4, **(mixer_kwargs or {})})
    base.update(kw)
    return LMConfig(**base)


def lm(dtype=torch.float64, device="cpu", mixer_kwargs=None, **kw) -> TransformerLM:
    """Initialised on the CPU (the same weights on every device), then moved; eval mode."""
    return TransformerLM(config(mixer_kwargs, **kw)).to(device, dtype).eval()


def mixers(model: TransformerLM) -> list[FastSlowAttention]:
    return [block.mixer for block in model.blocks]


def tokens(B=2, T=S, generator=None, device="cpu") -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=generator).to(device)


def open_gates(model: TransformerLM) -> TransformerLM:
    """Random non-zero gates, and the slow path's weights scaled up so that its share of the logits
    is well above the tolerances below (at init it is ~1e-4)."""
    with torch.no_grad():
        for m in mixers(model):
            m.gate.copy_(torch.randn(m.gate.shape).to(m.gate))
            for p in m.slow_parameters():
                p.mul_(5.0)
    return model


def slow_share(model: TransformerLM, idx: torch.Tensor) -> torch.Tensor:
    """Max |logits(gates as set) - logits(gates closed)| per position [T]."""
    with torch.no_grad():
        opened = model(idx)
        saved = [m.gate.clone() for m in mixers(model)]
        for m in mixers(model):
            m.gate.zero_()
        closed = model(idx)
        for m, g in zip(mixers(model), saved):
            m.gate.copy_(g)
    return (opened - closed).abs().amax(dim=(0, 2))


# --- a closed gate is plain attention ------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_closed_gate_is_plain_attention_with_the_same_weights(pos, window, device):
    """A fresh model (g = 0) gives bit for bit the logits of the attention-only model holding its
    weights: the slow path adds exactly nothing until the gate opens."""
    coupled = lm(device=device, pos=pos, mixer_kwargs={"window": window})
    plain = TransformerLM(LMConfig(**{**vars(config(pos=pos)), "mixer": "attention", "mixer_kwargs": {"window": window}}))
    plain = plain.to(device, torch.float64).eval()
    weights = {}
    for name, tensor in coupled.state_dict().items():
        if ".mixer." not in name:
            weights[name] = tensor
        elif ".mixer.fast." in name:
            weights[name.replace(".mixer.fast.", ".mixer.")] = tensor
    plain.load_state_dict(weights)  # strict: every weight of the plain model comes from the coupled one
    idx = tokens(device=device)
    with torch.no_grad():
        assert torch.equal(coupled(idx), plain(idx))
    # and the slow path does compute something: an open gate changes the logits (so this can fail)
    assert slow_share(open_gates(coupled), idx)[3:].min() > 1e-3


# --- the gate gets the first gradient, the slow path none ----------------------------------------


def backward_on_random_data(model: TransformerLM, T: int = 16) -> None:
    model.train()
    idx, targets = tokens(4, T), tokens(4, T)
    _, loss = model(idx, targets)
    loss.backward()


@pytest.mark.parametrize("gate", GATES)
def test_first_backward_reaches_the_gate_and_not_the_slow_path(gate):
    model = TransformerLM(config({"gate": gate}))
    backward_on_random_data(model)
    for i, m in enumerate(mixers(model)):
        assert m.gate.grad is not None and m.gate.grad.abs().min() > 0, f"layer {i}: the gate has no gradient"
        assert m.gate.grad.shape == ((1,) if gate == "scalar" else (D,))
        slow = m.slow_parameters()
        assert {id(p) for p in slow} == {id(p) for mod in (m.slow_qkv, m.slow_out, m.phi) for p in mod.parameters()}
        for p in slow:  # the slow path's gradient passes through g = 0
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, f"layer {i}: slow path got a gradient"
        assert m.fast.qkv.weight.grad.abs().max() > 0  # the fast path trains as usual


def test_slow_path_gets_gradient_once_the_gate_is_open():
    model = TransformerLM(config())
    with torch.no_grad():
        for m in mixers(model):
            m.gate.fill_(0.1)
    backward_on_random_data(model)
    for m in mixers(model):
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in m.slow_parameters())


@pytest.mark.parametrize("gate", GATES)
def test_zero_init_residual_leaves_phi_open(gate):
    """zero_init_residual zeroes the fast path's output projection, never phi's last layer: with
    both g and phi's output at zero the gate could never get a gradient."""
    model = TransformerLM(config({"gate": gate}, zero_init_residual=True))
    for m in mixers(model):
        assert torch.count_nonzero(m.fast.out.weight) == 0
        assert m.phi[-1].weight.abs().min() > 0
        assert torch.count_nonzero(m.gate) == 0
    backward_on_random_data(model)
    for i, m in enumerate(mixers(model)):
        assert m.gate.grad.abs().min() > 0, f"layer {i}: the gate has no gradient"


# --- optimizer groups and freeze_slow ---------------------------------------------------------


def group_ids(model: TransformerLM, weight_decay: float = 0.1) -> tuple[set[int], set[int]]:
    decay, no_decay = param_groups(model, weight_decay)
    assert decay["weight_decay"] == weight_decay and no_decay["weight_decay"] == 0.0
    return {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}


@pytest.mark.parametrize("gate", GATES)
def test_gate_is_not_weight_decayed(gate):
    model = TransformerLM(config({"gate": gate}))
    decay, no_decay = group_ids(model)
    for m in mixers(model):
        assert id(m.gate) in no_decay and id(m.gate) not in decay
        assert id(m.phi[0].weight) in decay and id(m.slow_qkv.weight) in decay  # matrices are decayed


def test_freeze_slow_trains_the_gate_and_fast_path_only():
    torch.manual_seed(3)
    model = TransformerLM(config({"freeze_slow": True}))
    decay, no_decay = group_ids(model)
    slow = [p for m in mixers(model) for p in m.slow_parameters()]
    assert slow and all(not p.requires_grad for p in slow)
    assert not {id(p) for p in slow} & (decay | no_decay)  # not in the optimizer at all
    assert all(m.gate.requires_grad and id(m.gate) in no_decay for m in mixers(model))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        _, loss = model(tokens(4, 16), tokens(4, 16))
        loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        if any(p is q for q in slow):
            assert not moved, f"frozen {name} moved"
        elif name.endswith("mixer.gate") or ".mixer.fast." in name:
            assert moved, f"{name} did not train"


# --- step decoding and causality with the gate open ----------------------------------------------


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("block, T", [(3, 29), (4, 18)])
def test_step_equals_parallel_with_the_gate_open(block, T, pos, window, gate, device):
    model = open_gates(lm(device=device, pos=pos, mixer_kwargs={"block": block, "window": window, "gate": gate}))
    idx = tokens(2, T, device=device)
    with torch.no_grad():
        parallel = model(idx)
    assert slow_share(model, idx)[block - 1 :].min() > 1e-3  # the slow path is in every logit after block 0
    cache, steps = None, []
    for t in range(T):
        logits, cache = model.step(idx[:, t], cache)
        steps.append(logits)
        state = cache["layers"][0]
        assert state["slow_k"].shape[2] == (t + 1) // block  # one slow update per completed block
        assert state["count"] == (t + 1) % block
    torch.testing.assert_close(torch.stack(steps, dim=1), parallel, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("block", [3, 4])
def test_causal_with_the_gate_open(block, pos, window, device):
    """For every t: redraw every token after t; the logits at positions <= t stay exactly equal and
    the logits at t + 1 change. Batch row 1 is never touched and must not move."""
    model = open_gates(lm(device=device, pos=pos, mixer_kwargs={"block": block, "window": window}))
    gen = torch.Generator().manual_seed(block)
    idx = tokens(2, S, generator=gen, device=device)
    with torch.no_grad():
        base = model(idx)
        for t in range(-1, S - 1):
            changed = idx.clone()
            changed[0, t + 1 :] = (changed[0, t + 1 :] + tokens(1, S - t - 1, generator=gen, device=device)[0] % (V - 1)
                                   + 1) % V  # every later token really changes
            out = model(changed)
            assert torch.equal(out[0, : t + 1], base[0, : t + 1]), f"positions <= {t} saw a later token"
            assert not torch.allclose(out[0, t + 1], base[0, t + 1])
            assert torch.equal(out[1], base[1])


@pytest.mark.parametrize("block", [3, 4])
def test_window_1_leaves_the_slow_path_as_the_only_channel(block):
    """With a fast window of 1 a token reaches a later one only through the slow path, so changing
    token j changes nothing until j's block completes, and everything from there on."""
    model = open_gates(lm(mixer_kwargs={"block": block, "window": 1}))
    idx = tokens(1, S)
    with torch.no_grad():
        base = model(idx)
        for j in range(S):
            changed = idx.clone()
            changed[0, j] = (changed[0, j] + 1) % V
            diff = (model(changed) - base)[0].abs().amax(dim=-1)
            completes = (j // block + 1) * block - 1
            assert diff[j] > 0  # the token itself
            assert torch.count_nonzero(diff[j + 1 : completes]) == 0, f"token {j} leaked before its block completed"
            assert (diff[completes:] > 0).all(), f"token {j} did not reach positions >= {completes}"


# --- options --------------------------------------------------------------------------------------


BAD_OPTIONS = {  # case: (mixer_kwargs, message)
    "block 0": ({"block": 0}, r"block must be an int >= 1, got 0"),
    "block -2": ({"block": -2}, r"block must be an int >= 1, got -2"),
    "block 2.5": ({"block": 2.5}, r"block must be an int"),
    "block true": ({"block": True}, r"block must be an int"),
    "gate name": ({"gate": "sigmoid"}, r"gate must be one of \('vector', 'scalar', 'tanh'\), got 'sigmoid'"),
    "slow_heads not dividing": ({"slow_heads": 3}, r"d_model=16 is not divisible by slow_heads=3"),
    "slow_heads 0": ({"slow_heads": 0}, r"slow_heads must be an int >= 1"),
    "window 0": ({"window": 0}, r"window must be >= 1"),
    "unknown option": ({"blocks": 4}, r"unknown option 'blocks'"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_options_are_config_errors_naming_them(case):
    kwargs, message = BAD_OPTIONS[case]
    spec = LayerSpec(d_model=D, n_head=H, max_seq_len=S)
    with pytest.raises(ConfigError, match=message):
        build_mixer("fast_slow", spec, kwargs)
    with pytest.raises(ConfigError, match=message):
        TransformerLM(LMConfig(vocab_size=V, n_layer=1, d_model=D, n_head=H, max_seq_len=S, mixer="fast_slow",
                               mixer_kwargs=kwargs))


def test_rope_needs_an_even_slow_head_dim():
    """RoPE rotates pairs of channels: an odd slow head dimension is a ConfigError at build time,
    not a crash (or a silently wrong rotation) in the first forward."""
    for d_model, n_head, slow_heads in ((16, 2, 16), (24, 4, 8)):
        spec = LayerSpec(d_model=d_model, n_head=n_head, max_seq_len=S, pos="rope")
        with pytest.raises(ConfigError, match=rf"even slow head dimension.*slow_heads={slow_heads}"):
            build_mixer("fast_slow", spec, {"slow_heads": slow_heads})
        build_mixer("fast_slow", LayerSpec(d_model=d_model, n_head=n_head, max_seq_len=S), {"slow_heads": slow_heads})
    layer = build_mixer("fast_slow", LayerSpec(d_model=D, n_head=H, max_seq_len=S, pos="rope"), {"slow_heads": 4})
    assert layer.slow_head_dim == 4 and layer(torch.randn(1, S, D)).shape == (1, S, D)


# --- gate statistics ------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", GATES)
def test_metrics_are_the_gate_statistics_by_hand(gate):
    layer = build_mixer("fast_slow", LayerSpec(d_model=4, n_head=2, max_seq_len=8), {"gate": gate, "block": 2})
    raw = [0.5] if gate == "scalar" else [0.5, -1.0, 2.0, 0.0]
    with torch.no_grad():
        layer.gate.copy_(torch.tensor(raw))
    g = [math.tanh(w) for w in raw] if gate == "tanh" else raw
    metrics = layer.metrics()
    assert set(metrics) == {"gate_mean_abs", "gate_rms"} and all(type(v) is float for v in metrics.values())
    assert metrics["gate_mean_abs"] == pytest.approx(sum(abs(w) for w in g) / len(g), rel=1e-6)
    assert metrics["gate_rms"] == pytest.approx(math.sqrt(sum(w * w for w in g) / len(g)), rel=1e-6)
    torch.testing.assert_close(layer.gate_values(), torch.tensor(g))
    fresh = build_mixer("fast_slow", LayerSpec(d_model=4, n_head=2, max_seq_len=8), {"gate": gate})
    assert fresh.metrics() == {"gate_mean_abs": 0.0, "gate_rms": 0.0}  # closed at init


def test_layer_metrics_name_each_layers_gate():
    model = open_gates(TransformerLM(config(n_layer=3)))
    logged = model.layer_metrics()
    for i, m in enumerate(mixers(model)):
        for key in ("gate_rms", "gate_mean_abs"):
            assert logged[f"blocks.{i}.mixer.{key}"] == m.metrics()[key]
        assert logged[f"blocks.{i}.mixer.gate_rms"] > 0


def test_trainer_logs_gate_statistics_at_every_log_step(tmp_path):
    run = from_dict(RunConfig, {
        "model": {"n_layer": 2, "d_model": 16, "n_head": 2, "max_seq_len": 16, "mixer": "fast_slow",
                  "mixer_kwargs": {"block": 4}},
        "data": {"corpus": "pydocs", "tokenizer": "char"},
        "train": {"batch_size": 4, "max_steps": 4, "warmup_steps": 1, "log_interval": 2, "eval_interval": 4,
                  "eval_tokens": 256, "precision": "fp32", "progress": False, "device": "cpu"},
    })
    trainer = Trainer(run, tmp_path / "r")
    trainer.fit()
    trainer.close()
    records = [json.loads(line) for line in (tmp_path / "r/metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    for r in train:
        for i in range(2):
            assert r[f"blocks.{i}.mixer.gate_rms"] > 0  # the gate opens from the first step
            assert r[f"blocks.{i}.mixer.gate_mean_abs"] > 0
    last = trainer.model.layer_metrics()
    assert train[-1]["blocks.1.mixer.gate_rms"] == pytest.approx(last["blocks.1.mixer.gate_rms"])


# --- precision and accounting ---------------------------------------------------------------------


def test_bf16_autocast_forward_is_close_to_float32():
    model = open_gates(lm(torch.float32, mixer_kwargs={"block": 3}))
    idx = tokens()
    with torch.no_grad():
        full = model(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(idx)
    assert torch.isfinite(half).all() and half.shape == full.shape
    err = (half.float() - full).abs().max().item()
    assert err <= 0.05 * full.abs().max().item(), f"bf16 autocast error {err:.3g}"


def state_floats(state) -> int:
    """Floats per sequence held in a mixer's decoding state (tensors' numel / batch)."""
    if isinstance(state, dict):
        return sum(state_floats(v) for v in state.values())
    return state[0].numel() if isinstance(state, torch.Tensor) else 0


@pytest.mark.parametrize("window", [None, 4])
def test_state_size_grows_with_length_and_exceeds_attention(window):
    spec = LayerSpec(d_model=D, n_head=H, max_seq_len=64)
    layer = build_mixer("fast_slow", spec, {"block": 4, "window": window})
    attention = CausalSelfAttention(spec, window=window)
    sizes = [layer.state_size(T) for T in (4, 16, 32, 64)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4  # the slow KV cache grows even with a window
    for T in (4, 16, 33, 64):
        assert layer.state_size(T) > attention.state_size(T)
    assert layer.state_size() == layer.state_size(64)
    state = None  # what decoding actually holds is within the stated size (equal at a block boundary)
    with torch.no_grad():
        for t in range(1, 18):
            _, state = layer.step(torch.randn(2, D), state)
            held = state_floats(state)
            assert held <= layer.state_size(t)
            if t % 4 == 0:
                assert held == layer.state_size(t)
