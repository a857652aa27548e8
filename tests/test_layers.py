"""Tests of routemem.layers: registries, causal softmax attention (+RoPE, sliding window, step),
norms and the baseline FFNs. Tests that take ``device`` run on the CPU and on CUDA (conftest.py)."""

import math

import pytest
import torch
from torch import nn

import routemem.layers
from routemem.errors import ConfigError
from routemem.layers import (
    FFNS,
    MIXERS,
    CausalSelfAttention,
    DenseFFN,
    LayerSpec,
    NoFFN,
    RMSNorm,
    build_ffn,
    build_mixer,
    make_norm,
    register_ffn,
    register_mixer,
)
from routemem.layers.rope import apply_rope, rope_tables
from routemem.models import LMConfig, TransformerLM

D, H = 16, 4
SPEC = LayerSpec(d_model=D, n_head=H, max_seq_len=32)


def spec(**kw) -> LayerSpec:
    base = dict(d_model=D, n_head=H, max_seq_len=32)
    base.update(kw)
    return LayerSpec(**base)


@pytest.fixture
def clean_registries():
    """Registrations made by a test never leak into MIXERS/FFNS (other tests parametrize over them)."""
    mixers, ffns = dict(MIXERS), dict(FFNS)
    yield
    MIXERS.clear(), MIXERS.update(mixers)
    FFNS.clear(), FFNS.update(ffns)


# --- registry ------------------------------------------------------------------------------


class _Echo(nn.Module):
    def __init__(self, spec: LayerSpec, scale: float = 1.0):
        super().__init__()
        self.spec, self.scale = spec, scale

    def forward(self, x):
        return self.scale * x


def test_builtin_layers_registered():
    assert MIXERS["attention"] is CausalSelfAttention
    assert FFNS["dense"] is DenseFFN and FFNS["none"] is NoFFN


def test_register_and_build_mixer(clean_registries):
    assert register_mixer("test_echo_mixer")(_Echo) is _Echo
    assert MIXERS["test_echo_mixer"] is _Echo
    m = build_mixer("test_echo_mixer", SPEC, {"scale": 2.0})
    assert isinstance(m, _Echo) and m.spec is SPEC and m.scale == 2.0
    assert build_mixer("test_echo_mixer", SPEC).scale == 1.0  # kwargs default to {}
    register_mixer("test_echo_mixer")(_Echo)  # the same class again is fine (re-import)


def test_register_and_build_ffn(clean_registries):
    register_ffn("test_echo_ffn")(_Echo)
    f = build_ffn("test_echo_ffn", SPEC, {"scale": 3.0})
    assert isinstance(f, _Echo) and f.scale == 3.0
    assert "test_echo_ffn" not in MIXERS  # the two tables are separate


def test_register_other_class_under_taken_name_raises(clean_registries):
    class Other(_Echo):
        pass

    with pytest.raises(ValueError, match="attention"):
        register_mixer("attention")(Other)
    assert MIXERS["attention"] is CausalSelfAttention
    with pytest.raises(ValueError, match="dense"):
        register_ffn("dense")(Other)
    assert FFNS["dense"] is DenseFFN


@pytest.mark.parametrize("build, table", [(build_mixer, MIXERS), (build_ffn, FFNS)])
def test_build_unknown_name(build, table):
    with pytest.raises(ConfigError) as info:
        build("no_such_layer", SPEC)
    msg = str(info.value)
    assert "no_such_layer" in msg
    for name in table:
        assert name in msg


def test_build_bad_kwargs_is_config_error():
    with pytest.raises(ConfigError, match="windw"):
        build_mixer("attention", SPEC, {"windw": 4})
    with pytest.raises(ConfigError, match="attention"):
        build_mixer("attention", SPEC, {"windw": 4})
    with pytest.raises(ConfigError, match="nope"):
        build_ffn("dense", SPEC, {"nope": 1})
    with pytest.raises(ConfigError, match="window"):
        build_mixer("attention", SPEC, {"window": 0})
    with pytest.raises(ConfigError, match="divisible"):
        build_mixer("attention", spec(d_model=10, n_head=4))


# --- attention -----------------------------------------------------------------------------


def naive_rope(x: torch.Tensor, start: int = 0, base: float = 10000.0) -> torch.Tensor:
    """Independent RoPE: rotate pair (x[i], x[i + Dh/2]) at position p by p * base^(-2i/Dh)."""
    B, T, Hh, Dh = x.shape
    half = Dh // 2
    out = torch.empty_like(x)
    for p in range(T):
        for i in range(half):
            theta = (start + p) * base ** (-2.0 * i / Dh)
            c, s = math.cos(theta), math.sin(theta)
            a, b = x[:, p, :, i], x[:, p, :, i + half]
            out[:, p, :, i] = a * c - b * s
            out[:, p, :, i + half] = a * s + b * c
    return out


def naive_attention(m: CausalSelfAttention, x: torch.Tensor, window=None, rope=False) -> torch.Tensor:
    """Explicit QK^T / sqrt(Dh), causal (and window) mask, softmax, weighted sum, out projection."""
    B, T, Dm = x.shape
    Hh, Dh = m.n_head, m.head_dim
    qkv = x @ m.qkv.weight.T
    if m.qkv.bias is not None:
        qkv = qkv + m.qkv.bias
    q, k, v = qkv.view(B, T, 3, Hh, Dh).unbind(dim=2)
    if rope:
        q, k = naive_rope(q), naive_rope(k)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(Dh)
    t = torch.arange(T, device=x.device)
    allowed = t[:, None] >= t[None, :]
    if window is not None:
        allowed &= (t[:, None] - t[None, :]) < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", scores.softmax(dim=-1), v).reshape(B, T, Dm)
    y = y @ m.out.weight.T
    if m.out.bias is not None:
        y = y + m.out.bias
    return y


def make_attn(pos="none", window=None, bias=False, device="cpu", **kw) -> CausalSelfAttention:
    m = CausalSelfAttention(spec(pos=pos, **kw), window=window, bias=bias).double().eval()
    with torch.no_grad():  # O(1) weights so that every mask/rotation error is visible
        for p in m.parameters():
            p.normal_(0.0, 0.5)
    return m.to(device)  # drawn on the CPU: the same weights on every device


def test_attention_output_shape():
    m = CausalSelfAttention(SPEC)
    x = torch.randn(3, 7, D)
    assert m(x).shape == (3, 7, D)
    y, state = m.step(x[:, 0], None)
    assert y.shape == (3, D)


@pytest.mark.parametrize("bias", [False, True])
def test_full_attention_equals_naive(bias, device):
    m = make_attn(bias=bias, device=device)
    x = torch.randn(2, 9, D, dtype=torch.float64).to(device)
    torch.testing.assert_close(m(x), naive_attention(m, x), rtol=1e-10, atol=1e-10)


def test_rope_attention_equals_naive(device):
    m = make_attn(pos="rope", device=device)
    x = torch.randn(2, 9, D, dtype=torch.float64).to(device)
    # RoPE runs in float32 inside the package, so compare at float32 precision.
    torch.testing.assert_close(m(x), naive_attention(m, x, rope=True), rtol=1e-5, atol=1e-5)
    # and it is really rotating: without RoPE in the reference the outputs differ
    assert not torch.allclose(m(x), naive_attention(m, x, rope=False), atol=1e-3)


def test_apply_rope_matches_independent_rotation():
    x = torch.randn(2, 6, 3, 8, dtype=torch.float64)
    cos, sin = rope_tables(6, 8)
    torch.testing.assert_close(apply_rope(x, cos, sin), naive_rope(x), rtol=1e-5, atol=1e-5)
    # position 0 is the identity; rotation preserves norms
    torch.testing.assert_close(apply_rope(x, cos, sin)[:, 0], x[:, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_rope_dot_product_depends_only_on_relative_position():
    Dh, L = 8, 20
    cos, sin = rope_tables(L, Dh)
    q = torch.randn(Dh).expand(L, 1, 1, Dh)  # the same q (and k) placed at every position
    k = torch.randn(Dh).expand(L, 1, 1, Dh)
    rq = apply_rope(q.transpose(0, 1), cos, sin)[0, :, 0]  # [L, Dh]: q rotated to position i
    rk = apply_rope(k.transpose(0, 1), cos, sin)[0, :, 0]
    dots = rq @ rk.T  # dots[m, n] = <R_m q, R_n k>
    for offset in (0, 1, 3, 7):
        diag = torch.diagonal(dots, offset=-offset)  # m - n = offset
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=1e-4, atol=1e-4)
    # ... and it does depend on the offset
    assert not torch.allclose(torch.diagonal(dots)[0], torch.diagonal(dots, offset=-1)[0], atol=1e-3)


@pytest.mark.parametrize("pos", ["none", "rope"])
@pytest.mark.parametrize("window", [1, 3])
def test_sliding_window_equals_naive(pos, window, device):
    m = make_attn(pos=pos, window=window, device=device)
    x = torch.randn(2, 10, D, dtype=torch.float64).to(device)
    tol = 1e-10 if pos == "none" else 1e-5
    torch.testing.assert_close(m(x), naive_attention(m, x, window=window, rope=pos == "rope"), rtol=tol, atol=tol)
    # a window is not full attention
    assert not torch.allclose(m(x), naive_attention(m, x, rope=pos == "rope"), atol=1e-3)


def test_sliding_window_ignores_tokens_outside_it(device):
    window, T, t = 3, 10, 6
    m = make_attn(window=window, device=device)
    x = torch.randn(1, T, D, dtype=torch.float64).to(device)
    before = t - window + 1  # first token that t may see
    x2 = x.clone()
    x2[:, :before] += torch.randn_like(x2[:, :before])
    y, y2 = m(x), m(x2)
    torch.testing.assert_close(y2[:, t:], y[:, t:], rtol=0, atol=1e-12)  # t and later never see them
    assert not torch.allclose(y2[:, before:t], y[:, before:t])  # earlier positions do
    x3 = x.clone()
    x3[:, before] += 1.0  # the oldest token inside t's window does matter
    assert not torch.allclose(m(x3)[:, t], y[:, t])


def test_window_at_least_seq_len_is_full_attention(device):
    m = make_attn(window=12, device=device)
    x = torch.randn(2, 8, D, dtype=torch.float64).to(device)
    torch.testing.assert_close(m(x), naive_attention(m, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pos", ["none", "rope"])
@pytest.mark.parametrize("window", [None, 1, 4])
def test_step_equals_parallel(pos, window, device):
    T = 11  # > window
    m = make_attn(pos=pos, window=window, device=device)
    x = torch.randn(2, T, D, dtype=torch.float64).to(device)
    state, ys = None, []
    for t in range(T):
        y, state = m.step(x[:, t], state)
        ys.append(y)
        cached = t + 1 if window is None else min(t + 1, window)
        assert state["k"].shape == (2, H, cached, D // H) and state["v"].shape == state["k"].shape
        assert state["pos"] == t + 1
    torch.testing.assert_close(torch.stack(ys, dim=1), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 2])
def test_attention_gradcheck_float64(window, device):
    m = CausalSelfAttention(LayerSpec(d_model=8, n_head=2, max_seq_len=8, pos="none"), window=window)
    m = m.to(device, torch.float64)
    x = torch.randn(1, 5, 8, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-6)


def test_rope_attention_gradcheck_float64(device):
    m = CausalSelfAttention(LayerSpec(d_model=8, n_head=2, max_seq_len=8, pos="rope")).to(device, torch.float64)
    x = torch.randn(1, 5, 8, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-6)


def test_state_size():
    m = CausalSelfAttention(SPEC)
    sizes = [m.state_size(n) for n in (1, 2, 8, 16)]
    assert sizes == [2 * D * n for n in (1, 2, 8, 16)]
    w = CausalSelfAttention(SPEC, window=4)
    assert [w.state_size(n) for n in (1, 3, 4, 5, 100)] == [2 * D * n for n in (1, 3, 4, 4, 4)]
    # it is the number of floats actually cached per sequence after decoding seq_len tokens
    for mod, n in ((m, 6), (w, 6)):
        state = None
        for _ in range(n):
            _, state = mod.step(torch.randn(1, D), state)
        assert state["k"].numel() + state["v"].numel() == mod.state_size(n)


# --- attention with a short convolution on q|k|v (zoology's MQAR baseline) -------------------


def make_conv_attn(width: int, pos: str = "rope", window=None, device="cpu") -> CausalSelfAttention:
    m = CausalSelfAttention(spec(pos=pos), window=window, conv_width=width).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.5)
    return m.to(device)


def naive_conv_attention(m: CausalSelfAttention, x: torch.Tensor, rope: bool) -> torch.Tensor:
    """The projection, then tap j of the conv multiplies the projection j - (width - 1) steps back
    (zero before the start), then the naive attention of the convolved q|k|v."""
    B, T, Dm = x.shape
    qkv = x @ m.qkv.weight.T
    w = m.conv.weight[:, 0]  # [3 D, width]
    width = w.shape[1]
    mixed = torch.zeros_like(qkv)
    for t in range(T):
        for j in range(width):
            src = t - (width - 1) + j
            if src >= 0:
                mixed[:, t] += qkv[:, src] * w[:, j]
    q, k, v = mixed.view(B, T, 3, m.n_head, m.head_dim).unbind(dim=2)
    if rope:
        q, k = naive_rope(q), naive_rope(k)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(m.head_dim)
    allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    y = torch.einsum("bhts,bshd->bthd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)
    return y.reshape(B, T, Dm) @ m.out.weight.T


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("pos", ["none", "rope"])
def test_conv_attention_equals_naive_and_steps(width, pos, device):
    m = make_conv_attn(width, pos, device=device)
    x = torch.randn(2, 9, D, dtype=torch.float64).to(device)
    y = m(x)
    tol = 1e-6 if pos == "rope" else 1e-10  # the RoPE tables are float32
    torch.testing.assert_close(y, naive_conv_attention(m, x, rope=pos == "rope"), rtol=tol, atol=tol)
    state, ys = None, []
    for t in range(9):
        out, state = m.step(x[:, t], state)
        ys.append(out)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=1e-8, atol=1e-8)
    assert (state["k"].numel() + state["v"].numel() + state["conv"].numel()) // 2 == m.state_size(9)  # per sequence


def test_conv_attention_is_causal_at_every_position():
    m = make_conv_attn(4)
    x = torch.randn(1, 16, D, dtype=torch.float64)
    y = m(x)
    for t in range(16):  # change everything from t on: outputs before t must not move
        x2 = x.clone()
        x2[:, t:] += torch.randn_like(x2[:, t:])
        y2 = m(x2)
        torch.testing.assert_close(y2[:, :t], y[:, :t], rtol=0, atol=0)
        assert not torch.allclose(y2[:, t], y[:, t])


def test_conv_attention_gradcheck_float64():
    m = CausalSelfAttention(LayerSpec(d_model=8, n_head=2, max_seq_len=8, pos="rope"), conv_width=3).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-6)


def test_conv_attention_options():
    with pytest.raises(ConfigError, match="conv_width"):
        build_mixer("attention", SPEC, {"conv_width": 0})
    with pytest.raises(ConfigError, match="causal"):
        build_mixer("attention", SPEC, {"conv_width": 4, "causal": False})
    assert build_mixer("attention", SPEC, {}).conv is None  # off by default: the LM baseline is unchanged


# --- norms and FFNs ------------------------------------------------------------------------


def test_rmsnorm_formula():
    norm = RMSNorm(D, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, D) * 3.0
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)
    # eps matters for tiny inputs
    tiny = torch.full((1, D), 1e-4)
    big_eps = RMSNorm(D, eps=1.0)
    torch.testing.assert_close(big_eps(tiny), tiny / math.sqrt(1e-8 + 1.0), rtol=1e-4, atol=1e-9)


def test_make_norm():
    assert isinstance(make_norm("layernorm", D), nn.LayerNorm)
    assert isinstance(make_norm("rmsnorm", D), RMSNorm)
    assert make_norm("rmsnorm", D).weight.shape == (D,)
    with pytest.raises(ConfigError, match="batchnorm"):
        make_norm("batchnorm", D)


def test_dense_ffn_width_and_shape():
    f = DenseFFN(SPEC)
    assert f.up.in_features == D and f.up.out_features == 4 * D
    assert f.down.in_features == 4 * D and f.down.out_features == D
    assert DenseFFN(SPEC, mult=2).up.out_features == 2 * D
    assert DenseFFN(SPEC, hidden=10).down.in_features == 10
    x = torch.randn(2, 3, D)
    assert f(x).shape == x.shape
    # per-token: changing one token changes only that token's output
    x2 = x.clone()
    x2[:, 1] += 1.0
    torch.testing.assert_close(f(x2)[:, [0, 2]], f(x)[:, [0, 2]])
    assert not torch.allclose(f(x2)[:, 1], f(x)[:, 1])


def test_no_ffn():
    f = NoFFN(SPEC)
    assert list(f.parameters()) == []
    x = torch.randn(2, 3, D)
    assert torch.equal(f(x), torch.zeros_like(x))
    model = TransformerLM(LMConfig(vocab_size=11, n_layer=2, d_model=D, n_head=H, max_seq_len=8, ffn="none"))
    names = [n for n, _ in model.named_parameters()]
    assert names and not any("ffn" in n for n in names)
    dense = TransformerLM(LMConfig(vocab_size=11, n_layer=2, d_model=D, n_head=H, max_seq_len=8))
    assert any("ffn" in n for n, _ in dense.named_parameters())  # the check above can fail
    for block in model.blocks:
        assert block.ffn_norm is None and not block.has_ffn


def test_layers_package_exports():
    for name in routemem.layers.__all__:
        assert hasattr(routemem.layers, name)
