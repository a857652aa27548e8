"""Tests of routemem.models.vit (VisionTransformer, prompt hooks), the attention layer's
bidirectional and prefix options, and routemem.models.vit_weights (the common ViT key layout)."""

import math
import os

import pytest
import torch
from safetensors.torch import save_file

from routemem.errors import CheckpointError, ConfigError, UserError
from routemem.fileio import current_umask
from routemem.layers import LayerSpec, build_mixer
from routemem.layers.attention import CausalSelfAttention, split_qkv
from routemem.models import (
    VisionTransformer,
    ViTConfig,
    load_vit,
    read_vit_config,
    save_vit,
    vit_weights,
)

TINY = {"image_size": 16, "patch_size": 4, "in_chans": 3, "d_model": 32, "n_layer": 3, "n_head": 4, "mlp_hidden": 48,
        "n_classes": 5}
N_PATCHES = 16


def tiny_vit(**kw) -> VisionTransformer:
    """A float64 tiny ViT with O(1)-ish random weights (so that every path is visible in the output)."""
    model = VisionTransformer(ViTConfig(**(TINY | kw))).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def images(batch=2, chans=3, size=16):
    return torch.randn(batch, chans, size, size, dtype=torch.float64)


# --- attention: bidirectional and prefix ---------------------------------------------------


def naive_attention(m: CausalSelfAttention, x, causal, prefix=None, window=None):
    """Explicit per-head softmax(q k^T / sqrt(Dh)) v with prefix keys/values prepended, unprojected."""
    B, T, D = x.shape
    H, Dh = m.n_head, m.head_dim
    qkv = x @ m.qkv.weight.T + (m.qkv.bias if m.qkv.bias is not None else 0)
    q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
    n_prefix = 0
    if prefix is not None:
        n_prefix = prefix[0].shape[1]
        k, v = torch.cat([prefix[0], k], dim=1), torch.cat([prefix[1], v], dim=1)
    out = torch.empty(B, T, D, dtype=x.dtype)
    for h in range(H):
        sl = slice(h * Dh, (h + 1) * Dh)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(Dh)  # [B, T, Lp + T]
        if causal:
            t = torch.arange(T)
            seen = (t[:, None] >= t[None, :]) & ((t[:, None] - t[None, :]) < (window or T))
            allowed = torch.cat([torch.ones(T, n_prefix, dtype=torch.bool), seen], dim=1)
            scores = scores.masked_fill(~allowed, float("-inf"))
        out[..., sl] = scores.softmax(-1) @ v[..., sl]
    return out @ m.out.weight.T + (m.out.bias if m.out.bias is not None else 0)


def make_attn(causal, bias=True, window=None):
    m = build_mixer("attention", LayerSpec(d_model=16, n_head=4, max_seq_len=16, pos="none"),
                    {"causal": causal, "bias": bias, "window": window})
    m = m.double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.5)
    return m


def test_bidirectional_attention_equals_naive():
    m = make_attn(causal=False)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), naive_attention(m, x, causal=False), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(m(x), naive_attention(m, x, causal=True), atol=1e-3)  # it is not causal


@pytest.mark.parametrize("causal", [False, True])
def test_prefix_keys_values_are_used_unprojected(causal):
    m = make_attn(causal=causal)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    pk, pv = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 3, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x, prefix=(pk, pv)), naive_attention(m, x, causal, (pk, pv)), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(m(x, prefix=(pk, pv)), m(x), atol=1e-3)
    # an unbatched prefix [Lp, D] is shared by the batch
    torch.testing.assert_close(m(x, prefix=(pk[0], pv[0])), m(x, prefix=(pk[:1].expand(2, -1, -1), pv[:1].expand(2, -1, -1))))


def test_prefix_with_a_sliding_window_is_always_visible():
    m = make_attn(causal=True, window=2)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    pk, pv = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 3, 16, dtype=torch.float64)
    expected = naive_attention(m, x, True, (pk, pv), window=2)
    torch.testing.assert_close(m(x, prefix=(pk, pv)), expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(expected, naive_attention(m, x, True, (pk, pv)), atol=1e-3)  # the window matters


def test_prefix_gradients_reach_the_prefix():
    m = make_attn(causal=False).float()
    x = torch.randn(1, 5, 16)
    pk, pv = torch.randn(1, 2, 16, requires_grad=True), torch.randn(1, 2, 16, requires_grad=True)
    m(x, prefix=(pk, pv)).sum().backward()
    assert pk.grad.abs().sum() > 0 and pv.grad.abs().sum() > 0


def test_attention_options_checked():
    spec = LayerSpec(d_model=16, n_head=4, max_seq_len=16)
    with pytest.raises(ConfigError, match="causal"):
        build_mixer("attention", spec, {"causal": False, "window": 4})
    with pytest.raises(ConfigError, match="causal"):
        build_mixer("attention", spec, {"causal": "no"})
    with pytest.raises(ValueError, match="causal"):
        build_mixer("attention", spec, {"causal": False}).step(torch.randn(1, 16), None)
    m = build_mixer("attention", spec, {"causal": False})
    with pytest.raises(ValueError, match="prefix"):
        m(torch.randn(2, 5, 16), prefix=(torch.randn(3, 2, 16), torch.randn(3, 2, 16)))


def test_qkv_rows_are_q_k_v_each_split_into_consecutive_heads():
    """The common layout's fused qkv: rows [q; k; v], each D rows = H heads of Dh consecutive rows."""
    B, T, H, Dh = 1, 2, 4, 3
    D = H * Dh
    projected = torch.arange(3 * D, dtype=torch.float64).expand(B, T, 3 * D)  # channel c holds the value c
    q, k, v = split_qkv(projected, H, Dh, None, 0)
    for h in range(H):
        assert q[0, 0, h].tolist() == list(range(h * Dh, (h + 1) * Dh))
        assert k[0, 0, h].tolist() == list(range(D + h * Dh, D + (h + 1) * Dh))
        assert v[0, 0, h].tolist() == list(range(2 * D + h * Dh, 2 * D + (h + 1) * Dh))


# --- the model -----------------------------------------------------------------------------


def test_shapes():
    model = tiny_vit()
    x = images(3)
    assert model(x).shape == (3, 5)
    assert model.features(x).shape == (3, 32)
    for layer in range(4):
        assert model.tokens_at(x, layer).shape == (3, 1 + N_PATCHES, 32)
    torch.testing.assert_close(model.embed(x), model.tokens_at(x, 0))
    with pytest.raises(ValueError, match="images"):
        model(images(2, chans=1))
    with pytest.raises(ValueError, match="layer"):
        model.tokens_at(x, 4)


def test_blocks_use_bidirectional_attention_with_biases():
    model = tiny_vit()
    for block in model.blocks:
        assert not block.attn.causal and block.attn.qkv.bias is not None and block.attn.out.bias is not None
        assert block.mlp.up.bias is not None and block.mlp.up.out_features == 48
    x = images(1)
    x2 = x.clone()
    x2[..., -4:, -4:] += 1.0  # the last patch only
    cls, cls2 = model.tokens_at(x, 1)[:, 0], model.tokens_at(x2, 1)[:, 0]
    assert not torch.allclose(cls, cls2)  # CLS (position 0) sees the last patch after one block


def test_matches_a_plain_vit_forward():
    """An independent ViT forward from the parameters: conv patches, CLS, positions, pre-norm blocks."""
    model = tiny_vit()
    x = images(2)
    F = torch.nn.functional
    t = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=4).flatten(2).transpose(1, 2)
    t = torch.cat([model.cls_token.expand(2, -1, -1), t], dim=1) + model.pos_embed
    for b in model.blocks:
        h = F.layer_norm(t, (32,), b.norm1.weight, b.norm1.bias, eps=1e-6)
        t = t + naive_attention(b.attn, h, causal=False)
        h = F.layer_norm(t, (32,), b.norm2.weight, b.norm2.bias, eps=1e-6)
        t = t + b.mlp.down(F.gelu(b.mlp.up(h)))
    cls = F.layer_norm(t, (32,), model.norm.weight, model.norm.bias, eps=1e-6)[:, 0]
    torch.testing.assert_close(model(x), model.head(cls), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["prompt", "input", "prefix"])
def test_prompt_of_length_zero_changes_nothing_exactly(kind):
    model = tiny_vit()
    x = images(2)
    empty = torch.zeros(2, 0, 32, dtype=torch.float64)
    prompt = (kind, (empty, empty)) if kind == "prefix" else (kind, empty)
    base = model(x)
    assert torch.equal(model(x, prompts={0: prompt, 2: prompt}), base)
    assert torch.equal(model(x, prompts={}), base)
    assert torch.equal(model(x, prompts=lambda layer, tokens: None), base)


def test_prompt_tokens_are_removed_after_their_block():
    model = tiny_vit()
    x = images(2)
    P = torch.randn(2, 3, 32, dtype=torch.float64)
    seen = {}

    def hook(layer, tokens):
        seen[layer] = tokens.shape[1]
        return ("prompt", P) if layer == 1 else None

    out = model(x, prompts=hook)
    assert seen == {0: 1 + N_PATCHES, 1: 1 + N_PATCHES, 2: 1 + N_PATCHES}
    assert model.tokens_at(x, 2, prompts={1: ("prompt", P)}).shape == (2, 1 + N_PATCHES, 32)
    assert not torch.allclose(out, model(x))
    # by hand: block 1 runs on [CLS, P, patches], then P's outputs are dropped
    t = model.blocks[1](torch.cat([model.tokens_at(x, 1)[:, :1], P, model.tokens_at(x, 1)[:, 1:]], dim=1))
    t = model.blocks[2](torch.cat([t[:, :1], t[:, 4:]], dim=1))
    torch.testing.assert_close(out, model.head(model.norm(t)[:, 0]), rtol=1e-10, atol=1e-10)


def test_input_prompts_are_kept_and_pooled():
    model = tiny_vit()
    x = images(2)
    P = torch.randn(3, 32, dtype=torch.float64)  # unbatched: shared by the batch
    seen = []

    def hook(layer, tokens):
        seen.append(tokens.shape[1])
        return ("input", P) if layer == 0 else None

    model(x, prompts=hook)
    assert seen == [1 + N_PATCHES, 4 + N_PATCHES, 4 + N_PATCHES]
    t = model.tokens_at(x, 3, prompts={0: ("input", P)})
    assert t.shape == (2, 4 + N_PATCHES, 32)
    feats = model.features(x, prompts={0: ("input", P)}, pool="prompt")
    torch.testing.assert_close(feats, model.norm(t)[:, 1:4].mean(dim=1))
    with pytest.raises(ValueError, match="input"):
        model.features(x, pool="prompt")


def test_prefix_tuning_changes_output_and_trains_the_prefix():
    model = tiny_vit()
    for p in model.parameters():
        p.requires_grad_(False)
    x = images(2)
    pk = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    pv = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    seen = []

    def hook(layer, tokens):
        seen.append(tokens.shape[1])
        return ("prefix", (pk, pv))

    out = model(x, prompts=hook)
    assert seen == [1 + N_PATCHES] * 3  # prefixes never lengthen the sequence
    assert not torch.allclose(out, model(x))
    out.sum().backward()
    assert pk.grad.abs().sum() > 0 and pv.grad.abs().sum() > 0


def test_hook_sees_the_tokens_tokens_at_returns():
    model = tiny_vit()
    x = images(2)
    seen = {}

    def hook(layer, tokens):
        seen[layer] = tokens.detach().clone()

    model(x, prompts=hook)
    for layer in range(3):
        torch.testing.assert_close(seen[layer], model.tokens_at(x, layer))


def test_bad_prompts_are_named():
    model = tiny_vit()
    x = images(2)
    P = torch.randn(2, 3, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="kind"):
        model(x, prompts={0: ("tokens", P)})
    with pytest.raises(ValueError, match="layers"):
        model(x, prompts={3: ("prompt", P)})
    with pytest.raises(ValueError, match="layer 0"):
        model(x, prompts={0: ("prompt", torch.randn(2, 3, 31, dtype=torch.float64))})


def test_config_errors_are_user_errors():
    with pytest.raises(ConfigError, match="patch_size"):
        ViTConfig(image_size=30, patch_size=4)
    with pytest.raises(ConfigError, match="n_head"):
        ViTConfig(d_model=30, n_head=4)
    with pytest.raises(ConfigError, match="n_layer"):
        ViTConfig(n_layer=0)


def test_reset_head_and_backbone_parameters():
    model = tiny_vit()
    model.reset_head(7)
    assert model(images(2)).shape == (2, 7) and model.config.n_classes == 7
    head = {id(p) for p in model.head.parameters()}
    assert len(model.backbone_parameters()) == len(list(model.parameters())) - 2
    assert not any(id(p) in head for p in model.backbone_parameters())


# --- weights in the common ViT layout ------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    model = tiny_vit().float()
    path = save_vit(model, tmp_path / "vit.safetensors")
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~current_umask()  # not mkstemp's owner-only 0600
    loaded = load_vit(path).eval()
    assert loaded.config == model.config  # read from the metadata (n_head=4 is not inferable: 32 / 64)
    x = images(2).float()
    assert torch.equal(loaded(x), model(x))
    assert set(vit_weights.vit_state_dict(model)) >= {"blocks.2.attn.proj.weight", "blocks.0.mlp.fc2.bias"}
    assert not list(tmp_path.glob(".vit.safetensors.*"))  # no temp file left


def test_failed_save_leaves_the_old_file(tmp_path, monkeypatch):
    model = tiny_vit().float()
    path = save_vit(model, tmp_path / "vit.safetensors")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(vit_weights, "save_file", boom)
    with pytest.raises(OSError):
        save_vit(tiny_vit().float(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["vit.safetensors"]


def layout_tensors(D=32, depth=2, C=3, p=4, grid=4, F_=48, K=6, seed=0) -> dict:
    """A checkpoint in the common ViT layout, written by hand (no routemem involved)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return 0.3 * torch.randn(*shape, generator=g)

    t = {"cls_token": r(1, 1, D), "pos_embed": r(1, 1 + grid * grid, D),
         "patch_embed.proj.weight": r(D, C, p, p), "patch_embed.proj.bias": r(D),
         "norm.weight": 1 + r(D), "norm.bias": r(D), "head.weight": r(K, D), "head.bias": r(K)}
    for i in range(depth):
        t |= {f"blocks.{i}.norm1.weight": 1 + r(D), f"blocks.{i}.norm1.bias": r(D),
              f"blocks.{i}.attn.qkv.weight": r(3 * D, D), f"blocks.{i}.attn.qkv.bias": r(3 * D),
              f"blocks.{i}.attn.proj.weight": r(D, D), f"blocks.{i}.attn.proj.bias": r(D),
              f"blocks.{i}.norm2.weight": 1 + r(D), f"blocks.{i}.norm2.bias": r(D),
              f"blocks.{i}.mlp.fc1.weight": r(F_, D), f"blocks.{i}.mlp.fc1.bias": r(F_),
              f"blocks.{i}.mlp.fc2.weight": r(D, F_), f"blocks.{i}.mlp.fc2.bias": r(D)}
    return t


def reference_vit(t: dict, x: torch.Tensor, n_head: int, depth: int) -> torch.Tensor:
    """The usual ViT forward written against the layout's key names, heads by explicit slicing."""
    F = torch.nn.functional
    t = {k: v.double() for k, v in t.items()}
    D = t["cls_token"].shape[-1]
    Dh = D // n_head
    p = t["patch_embed.proj.weight"].shape[-1]
    h = F.conv2d(x, t["patch_embed.proj.weight"], t["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = torch.cat([t["cls_token"].expand(x.shape[0], -1, -1), h], dim=1) + t["pos_embed"]
    for i in range(depth):
        b = f"blocks.{i}."
        y = F.layer_norm(h, (D,), t[b + "norm1.weight"], t[b + "norm1.bias"], eps=1e-6)
        qkv = y @ t[b + "attn.qkv.weight"].T + t[b + "attn.qkv.bias"]
        heads = []
        for j in range(n_head):
            q = qkv[..., j * Dh:(j + 1) * Dh]
            k = qkv[..., D + j * Dh:D + (j + 1) * Dh]
            v = qkv[..., 2 * D + j * Dh:2 * D + (j + 1) * Dh]
            heads.append((q @ k.transpose(1, 2) / math.sqrt(Dh)).softmax(-1) @ v)
        h = h + torch.cat(heads, dim=-1) @ t[b + "attn.proj.weight"].T + t[b + "attn.proj.bias"]
        y = F.layer_norm(h, (D,), t[b + "norm2.weight"], t[b + "norm2.bias"], eps=1e-6)
        y = F.gelu(y @ t[b + "mlp.fc1.weight"].T + t[b + "mlp.fc1.bias"])
        h = h + y @ t[b + "mlp.fc2.weight"].T + t[b + "mlp.fc2.bias"]
    cls = F.layer_norm(h, (D,), t["norm.weight"], t["norm.bias"], eps=1e-6)[:, 0]
    return cls @ t["head.weight"].T + t["head.bias"]


def test_hand_written_layout_file_loads_and_matches(tmp_path):
    tensors = layout_tensors()
    save_file(tensors, str(tmp_path / "w.safetensors"))  # no routemem metadata: config from shapes
    with pytest.raises(CheckpointError, match="n_head"):  # d_model 32 is no standard ViT width
        load_vit(tmp_path / "w.safetensors")
    model = load_vit(tmp_path / "w.safetensors", n_head=4).double().eval()
    assert (model.config.image_size, model.config.patch_size, model.config.in_chans, model.config.d_model,
            model.config.n_layer, model.config.mlp_hidden, model.config.n_classes) == (16, 4, 3, 32, 2, 48, 6)
    x = images(2)
    torch.testing.assert_close(model(x), reference_vit(tensors, x, 4, 2), rtol=1e-6, atol=1e-6)


def write_layout(tmp_path, tensors, name="w.safetensors"):
    save_file(tensors, str(tmp_path / name))
    return tmp_path / name


def shapes_only_file(tmp_path, D: int):
    """The keys the config is inferred from, at width D (read_vit_config reads shapes only)."""
    shapes = {"patch_embed.proj.weight": (D, 3, 1, 1), "pos_embed": (1, 5, D), "blocks.0.mlp.fc1.weight": (8, D),
              "head.weight": (2, D)}
    return write_layout(tmp_path, {k: torch.zeros(shape) for k, shape in shapes.items()}, f"w{D}.safetensors")


# timm's vit_* sizes: Ti, S, B, L, then H/14, g/14, G/14, whose heads are not 64 wide
TIMM_WIDTH_HEADS = [(192, 3), (384, 6), (768, 12), (1024, 16), (1280, 16), (1408, 16), (1664, 16)]


@pytest.mark.parametrize("d_model, n_head", TIMM_WIDTH_HEADS)
def test_standard_widths_infer_timms_head_count(tmp_path, d_model, n_head):
    assert read_vit_config(shapes_only_file(tmp_path, d_model)).n_head == n_head


def test_a_vit_h_wide_file_in_timms_layout_loads_with_16_heads(tmp_path):
    # ViT-H/14's width (16 heads of 80), everything else tiny: 1 block, 4x4 images of 2x2 patches
    tensors = layout_tensors(D=1280, depth=1, C=1, p=2, grid=2, F_=8, K=3)
    model = load_vit(write_layout(tmp_path, tensors)).double().eval()
    assert model.config.n_head == 16
    x = images(2, chans=1, size=4)
    expected = reference_vit(tensors, x, 16, 1)
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(reference_vit(tensors, x, 20, 1), expected)  # what the old D / 64 guess computed


@pytest.mark.parametrize("d_model", [128, 200, 1536])
def test_other_widths_need_n_head(tmp_path, d_model):
    with pytest.raises(CheckpointError, match=rf"d_model={d_model} is not a standard ViT width.*pass n_head=") as err:
        read_vit_config(shapes_only_file(tmp_path, d_model))
    assert "\n" not in str(err.value) and isinstance(err.value, UserError)


def test_an_unknown_width_loads_with_n_head_given(tmp_path):
    tensors = layout_tensors(D=200, depth=1, F_=8, K=3)
    path = write_layout(tmp_path, tensors)
    with pytest.raises(CheckpointError, match="pass n_head="):
        load_vit(path)
    model = load_vit(path, n_head=8).double().eval()
    assert model.config.n_head == 8
    x = images(2)
    torch.testing.assert_close(model(x), reference_vit(tensors, x, 8, 1), rtol=1e-6, atol=1e-6)


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    t = layout_tensors()
    del t["blocks.1.mlp.fc1.bias"]
    with pytest.raises(CheckpointError, match=r"missing key 'blocks\.1\.mlp\.fc1\.bias'"):
        load_vit(write_layout(tmp_path, t), n_head=4)
    t = layout_tensors() | {"blocks.0.ls1.gamma": torch.ones(32)}
    with pytest.raises(CheckpointError, match=r"unexpected key 'blocks\.0\.ls1\.gamma'"):
        load_vit(write_layout(tmp_path, t), n_head=4)
    t = layout_tensors()
    t["blocks.1.attn.qkv.weight"] = torch.zeros(3 * 32, 31)
    with pytest.raises(CheckpointError, match=r"'blocks\.1\.attn\.qkv\.weight' has shape \(96, 31\)"):
        load_vit(write_layout(tmp_path, t), n_head=4)
    t = layout_tensors()
    t["pos_embed"] = torch.zeros(1, 16, 32)  # 15 patches: not a square
    with pytest.raises(CheckpointError, match="pos_embed"):
        load_vit(write_layout(tmp_path, t), n_head=4)
    # against a given config: every mismatch names its key
    path = write_layout(tmp_path, layout_tensors())
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.mlp\.fc1\.weight' has shape \(48, 32\)"):
        load_vit(path, ViTConfig(**(TINY | {"n_layer": 2, "n_classes": 6, "mlp_hidden": 64})))
    # not a safetensors file / no file
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="junk"):
        load_vit(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_vit(tmp_path / "nope.safetensors")
    assert issubclass(CheckpointError, UserError)


def test_other_head_size_is_reinitialised_unless_strict(tmp_path):
    tensors = layout_tensors()
    path = write_layout(tmp_path, tensors)
    model = load_vit(path, n_head=4, n_classes=200).double().eval()
    assert model.head.weight.shape == (200, 32)
    reference = load_vit(path, n_head=4).double().eval()
    x = images(2)
    torch.testing.assert_close(model.features(x), reference.features(x))  # the backbone was loaded
    with pytest.raises(CheckpointError, match="strict_head"):
        load_vit(path, n_head=4, n_classes=200, strict_head=True)
    headless = {k: v for k, v in tensors.items() if not k.startswith("head.")}
    path = write_layout(tmp_path, headless, "headless.safetensors")
    with pytest.raises(ConfigError, match="n_classes"):
        load_vit(path, n_head=4)
    assert load_vit(path, n_head=4, n_classes=3).head.weight.shape == (3, 32)
    with pytest.raises(CheckpointError, match="head.weight"):
        load_vit(path, n_head=4, n_classes=3, strict_head=True)
    with pytest.raises(CheckpointError, match="head.bias"):
        load_vit(write_layout(tmp_path, tensors | {"head.bias": torch.zeros(5)}, "badhead.safetensors"), n_head=4)
    with pytest.raises(ConfigError, match="unknown ViT config"):
        load_vit(path, n_heads=4)
