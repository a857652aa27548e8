"""Tests of the recurrent mixers (palimpsa, gla, mamba2, meta_mamba2, gated_deltanet) and their
shared parts: chunk == reference, step == parallel, bf16 autocast, gradients, state size, init,
palimpsa(beta = 0) == gla, overfitting in a TransformerLM, and option errors. Tests that take
``device`` run on the CPU and on CUDA (conftest.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from routemem.errors import ConfigError
from routemem.layers import MIXERS, LayerSpec, build_mixer
from routemem.layers.gated_deltanet import GatedDeltaNetMixer
from routemem.layers.mamba2 import Mamba2Mixer, MetaMamba2Mixer
from routemem.layers.palimpsa import GLAMixer, PalimpsaMixer
from routemem.layers.recurrent_parts import GatedRMSNorm, ShortConv, init_A_log, init_dt_bias
from routemem.models import LMConfig, TransformerLM

D, H = 32, 4
SPEC = LayerSpec(d_model=D, n_head=H, max_seq_len=64)
NAMES = ["palimpsa", "gla", "mamba2", "meta_mamba2", "gated_deltanet"]
# every mixer with defaults, plus non-default shapes/priors where the mixer has them
CASES = [(n, {}) for n in NAMES] + [
    ("palimpsa", {"expand_v": 2, "beta_rank": 4, "i_prior": 2.0, "conv_width": 2}),
    ("gla", {"i_prior": 0.5, "conv_width": 1}),
    ("meta_mamba2", {"expand": 1, "d_state": 8, "i_prior": 3.0}),
    ("gated_deltanet", {"expand_v": 2, "conv_width": 3}),
]
IDS = [n + "".join(f"-{k}{v}" for k, v in kw.items()) for n, kw in CASES]


def make(name, dtype=torch.float32, device="cpu", **kw):
    return build_mixer(name, SPEC, kw).to(device, dtype)  # initialised on the CPU: same weights


def state_numel(state: dict) -> int:
    return sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))


def test_registered():
    expected = {"palimpsa": PalimpsaMixer, "gla": GLAMixer, "mamba2": Mamba2Mixer,
                "meta_mamba2": MetaMamba2Mixer, "gated_deltanet": GatedDeltaNetMixer}
    for name, cls in expected.items():
        assert MIXERS[name] is cls
        # the fastest form by default: "auto" (the fused kernel, Triton or fla where they apply)
        assert make(name).mode == "auto"


# --- shared parts ----------------------------------------------------------------------------


@pytest.mark.parametrize("width", [1, 2, 4])
def test_short_conv_is_causal_depthwise_and_steps(width):
    conv = ShortConv(6, width, bias=True).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    y = conv(x)
    w = conv.weight[:, 0]  # [C, width]; tap width-1 multiplies the current input
    padded = F.pad(x, (0, 0, width - 1, 0))
    expected = sum(padded[:, j : j + 9] * w[:, j] for j in range(width)) + conv.bias
    torch.testing.assert_close(y, expected)
    buffer, steps = conv.init_buffer(2, dtype=torch.float64), []
    for t in range(9):
        y_t, buffer = conv.step(x[:, t], buffer)
        assert buffer.shape == (2, width - 1, 6)
        steps.append(y_t)
    torch.testing.assert_close(torch.stack(steps, 1), y)
    assert conv.state_size() == buffer[0].numel()


def test_gated_rmsnorm_orders():
    y, g = torch.randn(2, 3, 4, 8) * 3, torch.randn(2, 3, 4, 8)
    rms = lambda h: h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
    after = GatedRMSNorm(8, norm_before_gate=True)
    before = GatedRMSNorm(8, norm_before_gate=False)
    with torch.no_grad():
        after.weight.normal_(), before.weight.copy_(after.weight)
    torch.testing.assert_close(after(y, g), rms(y) * after.weight * F.silu(g))
    torch.testing.assert_close(before(y, g), rms(y * F.silu(g)) * before.weight)
    assert after(y.bfloat16(), g.bfloat16()).dtype == torch.bfloat16


def test_init_helpers():
    dt_bias, A_log = torch.empty(20000), torch.empty(20000)
    dt = F.softplus(init_dt_bias(dt_bias, 1e-3, 0.1).double())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    # log-uniform: the log's mean is the middle of [log 1e-3, log 0.1]
    assert abs(dt.log().mean().item() - 0.5 * (math.log(1e-3) + math.log(0.1))) < 0.05
    A = init_A_log(A_log, 1.0, 16.0).exp()
    assert A.min() >= 1.0 - 1e-5 and A.max() <= 16.0 + 1e-4 and abs(A.mean().item() - 8.5) < 0.1
    with pytest.raises(ConfigError):
        init_dt_bias(dt_bias, 0.1, 1e-3)


# --- mixers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kw", CASES, ids=IDS)
def test_chunk_equals_reference(name, kw, device):
    chunk = make(name, mode="chunk", chunk_size=16, device=device, **kw)
    ref = make(name, mode="reference", device=device, **kw)
    ref.load_state_dict(chunk.state_dict())
    x = torch.randn(2, 37, D).to(device).requires_grad_()  # 2 full chunks and a partial one
    y_chunk, y_ref = chunk(x), ref(x)
    torch.testing.assert_close(y_chunk, y_ref, rtol=1e-4, atol=1e-5)
    w = torch.randn_like(y_ref)
    (g_chunk,) = torch.autograd.grad((y_chunk * w).sum(), x)
    (g_ref,) = torch.autograd.grad((y_ref * w).sum(), x)
    torch.testing.assert_close(g_chunk, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, kw", CASES, ids=IDS)
def test_step_equals_parallel(name, kw, device):
    m = make(name, torch.float64, device, **kw)
    x = torch.randn(2, 20, D, dtype=torch.float64).to(device)
    with torch.no_grad():
        parallel = m(x)
        state, steps = None, []  # state None: the mixer makes its own
        for t in range(20):
            y_t, state = m.step(x[:, t], state)
            steps.append(y_t)
            if t == 11:
                after_prefix = state  # conv buffer full, recurrent state far from its start
        torch.testing.assert_close(torch.stack(steps, 1), parallel, rtol=1e-9, atol=1e-10)
        # continuing from the saved state again gives the same outputs: step never mutates it
        state, again = after_prefix, []
        for t in range(12, 20):
            y_t, state = m.step(x[:, t], state)
            again.append(y_t)
        torch.testing.assert_close(torch.stack(again, 1), parallel[:, 12:], rtol=1e-9, atol=1e-10)
        # an explicit float32 init_state works for a float32 mixer
        m32, state = m.float(), m.init_state(2, device)
        y0, _ = m32.step(x[:, 0].float(), state)
        torch.testing.assert_close(y0, parallel[:, 0].float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast(name):
    m = make(name)
    x = torch.randn(2, 24, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        y_t, _ = m.step(x[:, 0].detach(), None)
    assert torch.isfinite(y).all() and torch.isfinite(y_t).all()
    y.float().pow(2).mean().backward()
    for pname, p in m.named_parameters():
        assert torch.isfinite(p.grad).all(), pname
    with torch.no_grad():
        full = m(x)  # the recurrences ran in float32: only the projections lost precision
    rel = (y.float() - full).norm() / full.norm()
    assert rel < 0.05, rel


@pytest.mark.parametrize("name, kw", CASES, ids=IDS)
def test_gradients_reach_every_parameter(name, kw):
    m = make(name, **kw)
    x = torch.randn(2, 12, D, requires_grad=True)
    (m(x) * torch.randn(2, 12, D)).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    bad = [n for n, p in m.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    zero = [n for n, p in m.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0]
    assert not missing and not bad and not zero, (missing, bad, zero)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name, kw", CASES, ids=IDS)
def test_state_size_counts_the_state(name, kw):
    m = make(name, **kw)
    state = None
    with torch.no_grad():
        for t in range(5):
            _, state = m.step(torch.randn(1, D), state)
    assert m.state_size() == state_numel(state) == state_numel(m.init_state(1))
    assert m.state_size(10_000) == m.state_size(16)  # constant in the context length
    assert m.extra_flops_per_token(64) > 0


@pytest.mark.parametrize("name", NAMES)
def test_init_weights(name):
    m = make(name)
    model = TransformerLM(LMConfig(vocab_size=11, n_layer=1, d_model=D, n_head=H, mixer=name, ffn="none"))
    official = name in ("palimpsa", "gla")  # Palimpsa's official ranges (test_palimpsa_official_defaults)
    for mixer in (m, model.blocks[0].mixer):
        A, dt = mixer.A_log.exp(), F.softplus(mixer.dt_bias)
        assert A.min() >= (0 if official else 1 - 1e-5) and A.max() <= 16 + 1e-4, A
        assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5), dt
        if hasattr(mixer, "D"):
            assert torch.equal(mixer.D, torch.ones_like(mixer.D))
        if hasattr(mixer, "b_scale"):  # meta_mamba2: softplus(b_scale) = 1; palimpsa: b_scale = 1
            scale = mixer.b_scale if official else F.softplus(mixer.b_scale)
            torch.testing.assert_close(scale, torch.ones_like(scale))
    with torch.no_grad():  # _init_weights restores what training moved
        m.A_log.fill_(10.0), m.dt_bias.fill_(10.0)
    m._init_weights()
    assert m.A_log.exp().max() <= 16 + 1e-4 and F.softplus(m.dt_bias).max() <= 0.1 * (1 + 1e-5)


def test_palimpsa_without_importance_is_gla():
    gla = GLAMixer(SPEC, i_prior=2.0, mode="reference").double()
    pal = PalimpsaMixer(SPEC, i_prior=2.0, mode="reference").double()
    missing, unexpected = pal.load_state_dict(gla.state_dict(), strict=False)
    assert sorted(missing) == ["b_scale", "beta_down.weight", "beta_up.weight"]
    assert not unexpected and not any("beta" in n for n, _ in gla.named_parameters())
    x = torch.randn(2, 15, D, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.allclose(pal(x), gla(x), atol=1e-6)  # the importance does matter...
        pal.beta_down.weight.zero_(), pal.b_scale.fill_(-1e4)  # ...until beta = softplus(-1e4) = 0
        torch.testing.assert_close(pal(x), gla(x), rtol=1e-10, atol=1e-12)
        _, state = pal.step(x[:, 0], None)
        torch.testing.assert_close(state["importance"], torch.full_like(state["importance"], 2.0))


def test_palimpsa_official_defaults():
    """The defaults are the official layer's (its authors' code): short-conv weights N(0, 0.02), one
    b_scale per head starting at 1 (softplus 1.313), an importance projection without bias of rank
    ceil(d_model / 16), A ~ U(0, 16). gla shares the conv and decay defaults."""
    spec = LayerSpec(d_model=200, n_head=8, max_seq_len=16)
    torch.manual_seed(0)
    pal, gla = PalimpsaMixer(spec), GLAMixer(spec)
    for m in (pal, gla):
        w = m.conv.weight.detach().double()
        assert w.numel() > 2000 and abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
        assert m.a_init_range == (0.0, 16.0)
    assert pal.b_scale.shape == (8,) and torch.equal(pal.b_scale, torch.ones(8))
    assert abs(F.softplus(pal.b_scale[0]).item() - 1.3133) < 1e-4
    assert pal.beta_up.bias is None and pal.beta_down.out_features == math.ceil(200 / 16) == 13
    A = init_A_log(torch.empty(20000), *pal.a_init_range).exp()
    assert A.min() > 0 and A.max() <= 16 + 1e-4 and abs(A.mean().item() - 8.0) < 0.1
    assert (A < 1).float().mean().item() > 0.05  # U(0, 16): 1/16 of the heads start with slow decay
    # the previous parameterisation, each part still an option
    old = PalimpsaMixer(spec, beta_rank=16, beta_bias=True, importance_scale="channel",
                        b_scale_init=float(torch.log(torch.expm1(torch.tensor(1.0)))), conv_init_std=None,
                        a_init_range=(1.0, 16.0))
    assert old.b_scale.shape == (8 * pal.dv,) and old.beta_up.bias is not None and old.beta_down.out_features == 16
    torch.testing.assert_close(F.softplus(old.b_scale), torch.ones_like(old.b_scale))
    assert old.conv.weight.abs().max() <= 0.5 and old.conv.weight.std() > 0.2  # U(-1/2, 1/2): width 4
    assert old.A_log.exp().min() >= 1 - 1e-5


@pytest.mark.parametrize("importance_scale", ["head", "channel"])
def test_importance_scale_multiplies_the_rate(importance_scale):
    """beta = sigmoid(W_b2 W_b1 x) * softplus(b_scale) * bs, with b_scale broadcast per head or
    given per (head, value channel): checked against the formula written out for one channel."""
    m = PalimpsaMixer(SPEC, importance_scale=importance_scale, mode="reference").double()
    seen = {}
    import routemem.layers.palimpsa as module
    real = module.metaplastic_attention

    def spy(q, k, v, beta, log_alpha, **kw):
        seen["beta"] = beta
        return real(q, k, v, beta, log_alpha, **kw)

    with torch.no_grad():
        m.b_scale.copy_(torch.randn(m.b_scale.shape, dtype=torch.float64))
    x = torch.randn(2, 5, D, dtype=torch.float64)
    module.metaplastic_attention = spy
    try:
        m(x)
    finally:
        module.metaplastic_attention = real
    h, c = 2, 3
    scale = m.b_scale[h] if importance_scale == "head" else m.b_scale[h * m.dv + c]
    bs = torch.sigmoid(m.bs_proj(x))[..., h]
    expected = torch.sigmoid(m.beta_up(m.beta_down(x))[..., h * m.dv + c]) * F.softplus(scale) * bs
    torch.testing.assert_close(seen["beta"][:, :, h, c], expected)


@pytest.mark.parametrize("name", NAMES)
def test_overfits_one_batch_in_a_model(name):
    text = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was "
            "the age of foolishness, it was the epoch of belief, it was the epoch of incredulity.")
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    batch = torch.stack([ids[i : i + 33] for i in (0, 40, 80, 120)])  # [4, 33]
    idx, targets = batch[:, :-1], batch[:, 1:]
    config = LMConfig(vocab_size=len(chars), n_layer=2, d_model=32, n_head=4, max_seq_len=32,
                      mixer=name, ffn="none")
    model = TransformerLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(30):
        _, loss = model(idx, targets)
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert losses[-1] < 0.25 * losses[0], losses  # ~0.01 in practice; attention gets ~0.14


@pytest.mark.parametrize("name, spec_kw, kw, words", [
    ("palimpsa", {"d_model": 30}, {}, ["d_model=30", "n_head=4"]),
    ("palimpsa", {}, {"mode": "fast"}, ["mode", "fast"]),
    ("palimpsa", {}, {"beta_rank": 0}, ["beta_rank"]),
    ("palimpsa", {}, {"i_prior": 0.0}, ["i_prior"]),
    ("palimpsa", {}, {"expand_v": 1.5}, ["expand_v"]),
    ("palimpsa", {}, {"conv_width": 0}, ["conv_width"]),
    ("gla", {}, {"beta_rank": 8}, ["beta_rank"]),
    ("gla", {}, {"beta_bias": True}, ["beta_bias"]),
    ("palimpsa", {}, {"importance_scale": "value"}, ["importance_scale", "channel"]),
    ("palimpsa", {}, {"a_init_range": (16.0, 1.0)}, ["a_init_range"]),
    ("palimpsa", {}, {"a_init_range": (0.0, 0.0)}, ["a_init_range"]),
    ("palimpsa", {}, {"conv_init_std": 0.0}, ["conv_init_std"]),
    ("gla", {}, {"chunk_size": 0}, ["chunk_size"]),
    ("mamba2", {}, {"i_prior": 2.0}, ["i_prior"]),
    ("mamba2", {}, {"d_state": 0}, ["d_state"]),
    ("mamba2", {"d_model": 30, "n_head": 4}, {"expand": 1}, ["d_inner", "n_head=4"]),
    ("meta_mamba2", {}, {"metaplastic": False}, ["metaplastic"]),
    ("gated_deltanet", {}, {"expand_v": 0}, ["expand_v"]),
    ("gated_deltanet", {}, {"window": 4}, ["window"]),
])
def test_bad_options_are_config_errors(name, spec_kw, kw, words):
    spec = LayerSpec(**{"d_model": D, "n_head": H, "max_seq_len": 16, **spec_kw})
    with pytest.raises(ConfigError) as info:
        build_mixer(name, spec, kw)
    for word in words:
        assert word in str(info.value)
