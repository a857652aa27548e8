"""Tests of routemem.models: TransformerLM shapes, loss, causality and step decoding for every
registered mixer, generation, accounting, initialisation and the aux-loss/metrics hooks. Tests that
take ``device`` run on the CPU and on CUDA (conftest.py)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import routemem.layers
from routemem.errors import ConfigError
from routemem.layers import FFNS, register_ffn
from routemem.models import LMConfig, TransformerLM

V, D, H, S = 17, 16, 2, 16

# Read at collection time: a newly registered mixer is tested without touching this file.
MIXER_NAMES = sorted(routemem.layers.MIXERS)
POSITIONS = ["learned", "rope", "none"]


def cfg(**kw) -> LMConfig:
    base = dict(vocab_size=V, n_layer=2, d_model=D, n_head=H, max_seq_len=S)
    base.update(kw)
    return LMConfig(**base)


def tiny(dtype=torch.float64, device="cpu", **kw) -> TransformerLM:
    return TransformerLM(cfg(**kw)).to(device, dtype).eval()  # initialised on the CPU: same weights


def tokens(B=2, T=S, generator=None, device="cpu"):
    return torch.randint(0, V, (B, T), generator=generator).to(device)


# --- forward and loss ----------------------------------------------------------------------


def test_forward_shapes():
    model = tiny(torch.float32)
    idx = tokens(3, 10)
    logits = model(idx)
    assert isinstance(logits, torch.Tensor) and logits.shape == (3, 10, V)
    assert model(tokens(1, 1)).shape == (1, 1, V)
    assert model(tokens(2, S)).shape == (2, S, V)


def test_loss_is_cross_entropy():
    model = tiny(torch.float32)
    idx, targets = tokens(2, 12), tokens(2, 12)
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 12, V) and loss.dim() == 0
    torch.testing.assert_close(logits, model(idx))
    expected = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
    torch.testing.assert_close(loss, expected)
    assert abs(loss.item() - torch.log(torch.tensor(float(V))).item()) < 0.5  # near uniform at init


def test_loss_ignores_minus_100():
    model = tiny(torch.float32)
    idx, targets = tokens(2, 12), tokens(2, 12)
    masked = targets.clone()
    masked[0, :5] = -100
    masked[1, 7:] = -100
    logits, loss = model(idx, masked)
    keep = masked != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)
    # what the ignored positions held does not matter
    other = masked.clone()
    other[~keep] = -100
    assert torch.equal(model(idx, other)[1], loss)
    assert not torch.allclose(loss, model(idx, targets)[1])  # masking did change the loss


def test_idx_must_be_2d():
    with pytest.raises(ValueError, match="batch"):
        tiny()(torch.zeros(5, dtype=torch.long))


def test_too_long_sequence_raises():
    model = tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, S + 1))
    cache = None
    for t in range(S):
        _, cache = model.step(torch.tensor([t % V]), cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.step(torch.tensor([0]), cache)


# --- causality and step decoding: every registered mixer -----------------------------------


def assert_causal(model: TransformerLM, label: str) -> None:
    """Changing token t changes outputs at t and never before it, nor in another batch row."""
    T = 12
    idx = tokens(2, T, device=model.lm_head.weight.device)
    with torch.no_grad():
        base = model(idx)
        for t in (0, 5, T - 1):
            changed = idx.clone()
            changed[0, t] = (changed[0, t] + 1) % V
            out = model(changed)
            torch.testing.assert_close(out[0, :t], base[0, :t], rtol=0, atol=1e-12,
                                       msg=lambda m, t=t: f"{label}: position < {t} saw token {t}\n{m}")
            assert not torch.allclose(out[0, t], base[0, t], rtol=0, atol=1e-9)
            torch.testing.assert_close(out[1], base[1], rtol=0, atol=1e-12)  # batch rows independent


def assert_steps_match(model: TransformerLM, idx: torch.Tensor, parallel: torch.Tensor) -> None:
    """Decoding ``idx`` token by token with ``step`` gives the parallel forward's logits."""
    cache, steps = None, []
    for t in range(idx.shape[1]):
        logits, cache = model.step(idx[:, t], cache)
        assert logits.shape == (idx.shape[0], V) and cache["pos"] == t + 1
        steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, dim=1), parallel, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("mixer", MIXER_NAMES)
def test_causality(mixer, pos, device):
    assert_causal(tiny(mixer=mixer, pos=pos, device=device), f"{mixer}/{pos}")


MIXER_CASES = [(m, {}) for m in MIXER_NAMES] + [("attention", {"window": 4})]


@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("mixer, mixer_kwargs", MIXER_CASES,
                         ids=[f"{m}{'-' + '-'.join(f'{k}{v}' for k, v in kw.items()) if kw else ''}"
                              for m, kw in MIXER_CASES])
def test_step_equals_parallel(mixer, mixer_kwargs, pos, device):
    model = tiny(mixer=mixer, mixer_kwargs=mixer_kwargs, pos=pos, device=device)
    idx = tokens(2, S, device=device)  # the full context, > any window
    with torch.no_grad():
        parallel = model(idx)
    assert_steps_match(model, idx, parallel)


# --- causality and step decoding: every registered FFN ---------------------------------------

# Read at collection time, like MIXER_NAMES; plus non-default forms of the routed FFN.
FFN_NAMES = sorted(FFNS)
FFN_CASES = [(f, {}) for f in FFN_NAMES] + [
    ("apn", {"mode": "reference", "n_patches": 6, "rank": 3, "top_k": 2}),
    ("apn", {"n_patches": 4, "top_k": 4, "trunk_hidden": 8, "prototype_update": "ema", "learn_tau": True}),
]
FFN_IDS = [f + "".join(f"-{k}{v}" for k, v in kw.items()) for f, kw in FFN_CASES]


@pytest.mark.parametrize("ffn, ffn_kwargs", FFN_CASES, ids=FFN_IDS)
def test_causality_every_ffn(ffn, ffn_kwargs, device):
    assert_causal(tiny(ffn=ffn, ffn_kwargs=ffn_kwargs, device=device), ffn)  # eval mode: no ema pull, no aux loss


@pytest.mark.parametrize("ffn, ffn_kwargs", FFN_CASES, ids=FFN_IDS)
def test_step_equals_parallel_every_ffn(ffn, ffn_kwargs, device):
    model = tiny(ffn=ffn, ffn_kwargs=ffn_kwargs, device=device)
    idx = tokens(2, S, device=device)
    with torch.no_grad():
        parallel = model(idx)
        if ffn != "none":  # the FFN branch contributes, so a step that skipped it would show
            x = torch.randn(2, 5, D, dtype=torch.float64, device=device)
            assert model.blocks[0].ffn(x).abs().max() > 0
    assert_steps_match(model, idx, parallel)


@pytest.mark.parametrize("mixer", MIXER_NAMES)
def test_zero_init_residual_blocks_are_identities(mixer):
    model = tiny(mixer=mixer, zero_init_residual=True)
    idx = tokens(2, 10)
    seen = []
    hooks = [b.register_forward_hook(lambda mod, inp, out: seen.append((inp[0], out))) for b in model.blocks]
    try:
        with torch.no_grad():
            logits = model(idx)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(model.blocks)
    for inp, out in seen:
        torch.testing.assert_close(out, inp, rtol=0, atol=0)
    with torch.no_grad():
        emb = model.tok_emb(idx) + model.pos_emb(torch.arange(10))
        torch.testing.assert_close(logits, model.lm_head(model.final_norm(emb)))
    # and without zero init the blocks are not identities (so the test above can fail)
    plain = tiny(mixer=mixer)
    with torch.no_grad():
        x = plain.tok_emb(idx) + plain.pos_emb(torch.arange(10))
        assert not torch.allclose(plain.blocks[0](x), x)


# --- generation ----------------------------------------------------------------------------


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_generate_shape_and_determinism(pos, device):
    """A seeded CPU generator decides the samples wherever the model runs (the CLI seeds one)."""
    model = tiny(torch.float32, pos=pos, device=device)
    prompt = tokens(2, 4, device=device)
    out = model.generate(prompt, 40, generator=torch.Generator().manual_seed(1))  # 44 > max_seq_len
    assert out.shape == (2, 44) and out.dtype == torch.long
    assert torch.equal(out[:, :4], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < V
    again = model.generate(prompt, 40, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    other = model.generate(prompt, 40, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(out, other)
    assert out.device == prompt.device


def test_generate_top_k_1_is_greedy():
    model = tiny(torch.float64)
    with torch.no_grad():  # sharpen the distribution so greedy choices are not near-ties
        model.lm_head.weight.mul_(20.0)
    prompt = tokens(2, 3)
    out = model.generate(prompt, 8, top_k=1)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_generate_rejects_bad_prompt():
    model = tiny()
    with pytest.raises(ValueError):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(tokens(1, S + 1), 3)


def test_generate_past_context_with_max_seq_len_1():
    model = tiny(torch.float32, max_seq_len=1)
    assert model.generate(tokens(1, 1), 3).shape == (1, 4)


# --- training ------------------------------------------------------------------------------


def test_overfits_one_batch():
    model = TransformerLM(cfg(d_model=32, n_head=4, max_seq_len=16))
    model.train()
    idx = tokens(4, 16)
    targets = torch.roll(idx, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(150):
        _, loss = model(idx, targets)
        first = loss.item() if first is None else first
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    final = model(idx, targets)[1].item()
    assert final < 0.1 * first, (first, final)


# --- accounting ----------------------------------------------------------------------------


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_num_params(pos):
    tied = TransformerLM(cfg(pos=pos, tie_embeddings=True))
    untied = TransformerLM(cfg(pos=pos, tie_embeddings=False))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    body = sum(p.numel() for p in tied.blocks.parameters()) + sum(p.numel() for p in tied.final_norm.parameters())
    pos_numel = S * D if pos == "learned" else 0
    assert tied.num_params() == body + V * D + pos_numel  # lm_head not counted twice
    assert tied.num_params(include_embeddings=False) == tied.num_params() - V * D - pos_numel == body
    assert untied.num_params() == tied.num_params() + V * D
    assert untied.num_params(include_embeddings=False) == body


def test_flops_per_token():
    small = TransformerLM(cfg(n_layer=2))
    big = TransformerLM(cfg(n_layer=4))
    f2, f4 = small.flops_per_token(), big.flops_per_token()
    assert 0 < f2 < f4
    assert small.flops_per_token(training=True) == pytest.approx(3 * small.flops_per_token(training=False))
    # at least 2 FLOPs per weight of every block matmul and the head
    linear = sum(m.weight.numel() for m in small.modules() if isinstance(m, nn.Linear))
    assert small.flops_per_token(training=False) >= 2 * linear
    assert small.flops_per_token(seq_len=16) > small.flops_per_token(seq_len=2)  # attention context


# --- hooks ---------------------------------------------------------------------------------


def test_aux_loss_and_metrics_hooks():
    name = "test_aux_ffn"
    assert name not in FFNS

    try:
        @register_ffn(name)
        class AuxFFN(nn.Module):
            def __init__(self, spec, weight: float = 1.0):
                super().__init__()
                self.proj = nn.Linear(spec.d_model, spec.d_model, bias=False)
                self.weight, self.calls = weight, 0

            def forward(self, x):
                y = self.proj(x)
                self.aux_loss = self.weight * (1.0 + x.pow(2).mean())
                self.calls += 1
                return y

            def metrics(self):
                return {"calls": self.calls, "aux": self.aux_loss.detach()}

        model = TransformerLM(cfg(ffn=name, ffn_kwargs={"weight": 0.5}))
        idx, targets = tokens(2, 8), tokens(2, 8)
        logits, loss = model(idx, targets)
        ce = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
        aux = sum(block.ffn.aux_loss for block in model.blocks)
        assert aux.item() > 1.0  # two layers of 0.5 * (1 + ...): not negligible
        torch.testing.assert_close(loss, ce + aux)
        torch.testing.assert_close(model.aux_loss(), aux)
        loss.backward()  # the aux term is part of the graph
        assert model.blocks[0].ffn_norm.weight.grad is not None

        metrics = model.layer_metrics()
        for i in range(2):
            assert metrics[f"blocks.{i}.ffn.calls"] == 1.0
            assert metrics[f"blocks.{i}.ffn.aux"] == pytest.approx(model.blocks[i].ffn.aux_loss.item())
        assert all(isinstance(v, float) for v in metrics.values())
    finally:
        FFNS.pop(name, None)
    assert name not in FFNS


def test_no_aux_loss_and_no_metrics_by_default():
    model = tiny(torch.float32)
    idx, targets = tokens(2, 8), tokens(2, 8)
    logits, loss = model(idx, targets)
    assert model.aux_loss() is None
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1)))
    assert model.layer_metrics() == {}


# --- config validation ---------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, words", [
    (dict(d_model=30, n_head=4), ["d_model", "n_head"]),
    (dict(norm="batchnorm"), ["norm", "batchnorm"]),
    (dict(pos="alibi"), ["pos", "alibi"]),
    (dict(d_model=12, n_head=4, pos="rope"), ["rope"]),  # odd head dim
    (dict(n_layer=0), ["n_layer"]),
    (dict(vocab_size=0), ["vocab_size"]),
    (dict(dropout=1.0), ["dropout"]),
])
def test_lmconfig_validation(kwargs, words):
    with pytest.raises(ValueError) as info:
        cfg(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_unknown_mixer_or_ffn_is_config_error():
    with pytest.raises(ConfigError, match="no_such_mixer"):
        TransformerLM(cfg(mixer="no_such_mixer"))
    with pytest.raises(ConfigError, match="no_such_ffn"):
        TransformerLM(cfg(ffn="no_such_ffn"))
    with pytest.raises(ConfigError, match="windw"):
        TransformerLM(cfg(mixer_kwargs={"windw": 3}))
