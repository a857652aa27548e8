"""routemem from transformers: the model class (config, save/load, loss, padding, generate, Trainer),
the export-hf command, and swap_layers on tiny Llama-family and GPT-2 models built here (no downloads)."""

from __future__ import annotations

import dataclasses
import json
import sys
from types import SimpleNamespace

import pytest

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'routemem[hf]')")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import safe_open  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

import routemem.hf  # noqa: E402
from routemem.cli import main  # noqa: E402
from routemem.hf import RoutememCache, RoutememConfig, RoutememForCausalLM, swap_layers  # noqa: E402
from routemem.layers import MIXERS  # noqa: E402
from routemem.models import LMConfig  # noqa: E402
from routemem.train import load_model  # noqa: E402



@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    """transformers' notes on padding and generation length are not under test here."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


APN = {"n_patches": 8, "rank": 4, "top_k": 2}
STEPPING_MIXERS = sorted(name for name, cls in MIXERS.items() if callable(getattr(cls, "step", None)))


def tiny_config(**overrides) -> RoutememConfig:
    fields = dict(vocab_size=32, n_layer=2, d_model=32, n_head=2, max_seq_len=16)
    return RoutememConfig(**{**fields, **overrides})


def tiny_model(**overrides) -> RoutememForCausalLM:
    return RoutememForCausalLM(tiny_config(**overrides)).eval()


def ids(batch: int = 2, length: int = 10, vocab: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length))


# -- the config ------------------------------------------------------------------------------------
def test_config_carries_every_lmconfig_field_under_its_name_and_transformers_names(tmp_path):
    lm = LMConfig(vocab_size=40, n_layer=3, d_model=48, n_head=3, max_seq_len=20, dropout=0.1, norm="rmsnorm",
                  pos="rope", tie_embeddings=False, mixer="palimpsa", mixer_kwargs={"expand_v": 2}, ffn="apn",
                  ffn_kwargs=dict(APN), zero_init_residual=True, init_std=0.01)
    config = RoutememConfig.from_lm_config(lm)
    assert config.to_lm_config() == lm
    assert {f.name for f in dataclasses.fields(LMConfig)} <= set(config.to_dict())
    assert RoutememConfig().to_lm_config() == LMConfig()  # the mirrored field list keeps LMConfig's defaults
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.max_position_embeddings, config.tie_word_embeddings) == (48, 3, 3, 20, False)
    config.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).to_lm_config() == lm


def test_config_refuses_a_bad_architecture_when_made():
    with pytest.raises(ValueError, match="d_model=30 is not divisible by n_head=4"):
        RoutememConfig(d_model=30, n_head=4)


def test_import_registers_the_auto_classes_and_routemem_hf_is_the_integration():
    import routemem.integrations.hf as integration

    assert routemem.hf.RoutememForCausalLM is integration.RoutememForCausalLM
    model = AutoModelForCausalLM.from_config(tiny_config(ffn="apn", ffn_kwargs=APN))
    assert isinstance(model, RoutememForCausalLM) and model.model.config.ffn == "apn"


# -- save / load ------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [
    dict(mixer="palimpsa", ffn="apn", ffn_kwargs=APN),
    dict(mixer="attention", pos="rope", tie_embeddings=False),  # RoPE tables: buffers that are never saved
], ids=["palimpsa-apn-tied", "attention-rope-untied"])
def test_save_and_load_give_bit_equal_logits_and_keep_the_tie(tmp_path, overrides):
    model = tiny_model(**overrides)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    tied = overrides.get("tie_embeddings", True)
    assert (loaded.model.lm_head.weight is loaded.model.tok_emb.weight) == tied
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as saved:
        assert ("model.lm_head.weight" in saved.keys()) == (not tied)  # a tied head is saved once


# -- loss and padding --------------------------------------------------------------------------------
def test_labels_are_shifted_inside_and_minus_100_is_ignored():
    model = tiny_model()
    x = ids()
    labels = x.clone()
    labels[0, 3:6] = -100
    out = model(x, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert torch.allclose(out.loss, expected)
    assert out.loss.requires_grad and out.cache is None


def test_layers_aux_loss_is_added_in_training():
    model = tiny_model(ffn="apn", ffn_kwargs={**APN, "load_balance": 1.0}).train()
    x = ids()
    out = model(x, labels=x)
    plain = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    assert torch.allclose(out.loss, plain + model.model.aux_loss()) and model.model.aux_loss() > 0


def test_right_padding_leaves_the_real_positions_exact():
    model = tiny_model(mixer="palimpsa")
    x = ids(batch=1, length=6)
    padded = torch.cat([x, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        assert torch.allclose(model(padded, attention_mask=mask).logits[:, :6], model(x).logits, atol=1e-6)


def test_left_padding_is_refused_in_one_line():
    model = tiny_model()
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"0 before a 1 in row 1 \(left padding") as err:
        model(ids(length=4), attention_mask=mask)
    assert "\n" not in str(err.value)


# -- generate: our step() state as the cache ------------------------------------------------------------
def test_cached_forward_gives_the_parallel_forward_logits():
    model = tiny_model(mixer="palimpsa", ffn="apn", ffn_kwargs=APN)
    x = ids()
    with torch.no_grad():
        parallel = model(x).logits
        first = model(x[:, :6], use_cache=True)
        rest = model(x[:, 6:], cache=first.cache)
    assert isinstance(first.cache, RoutememCache) and rest.cache.get_seq_length() == 10
    assert torch.allclose(torch.cat([first.logits, rest.logits], dim=1), parallel, atol=1e-5)


@pytest.mark.parametrize("mixer", STEPPING_MIXERS)
def test_greedy_generate_equals_our_generate_past_the_window(mixer):
    model = tiny_model(mixer=mixer)
    prompt = ids(length=4)
    # 4 + 20 tokens overflow max_seq_len=16: both restart from the last half window at the same token
    ours = model.model.generate(prompt, 20, top_k=1)
    theirs = model.generate(prompt, max_new_tokens=20, do_sample=False)
    assert torch.equal(theirs, ours)


@pytest.mark.parametrize("mixer", ["attention", "palimpsa"])
def test_sampling_generate_equals_our_generate_for_the_same_seed(mixer):
    # Both draw with torch.multinomial from softmax(top-k(logits / temperature)) on the global RNG,
    # so with the same seed and the same step() logits they draw the same tokens.
    model = tiny_model(mixer=mixer)
    prompt = ids(length=3)
    torch.manual_seed(7)
    ours = model.model.generate(prompt, 12, temperature=0.7, top_k=5)
    torch.manual_seed(7)
    theirs = model.generate(prompt, max_new_tokens=12, do_sample=True, temperature=0.7, top_k=5, top_p=1.0)
    assert torch.equal(theirs, ours)
    torch.manual_seed(8)
    other = model.generate(prompt, max_new_tokens=12, do_sample=True, temperature=0.7, top_k=5, top_p=1.0)
    assert not torch.equal(other, ours)  # the comparison can fail: another seed draws otherwise


def test_a_prompt_longer_than_the_window_is_refused():
    with pytest.raises(ValueError, match="prompt of 17 tokens exceeds max_seq_len=16"):
        tiny_model().generate(ids(length=17), max_new_tokens=2)


# -- Trainer ----------------------------------------------------------------------------------------------
class Repeats(torch.utils.data.Dataset):
    """Sequences 0 1 2 ... from random starts: next token = this one + 1, easy to learn."""

    def __init__(self, n: int = 64, length: int = 16, vocab: int = 32):
        starts = torch.randint(0, vocab, (n, 1))
        self.rows = (starts + torch.arange(length)) % vocab

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def test_trainer_trains_it(tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (pip install 'routemem[hf]')")
    model = tiny_model(mixer="gla", ffn="apn", ffn_kwargs=APN).train()
    data = Repeats()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=16,
                             learning_rate=1e-2, warmup_steps=0, logging_steps=5, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=data).train()
    model.eval()
    batch = torch.stack([data[i]["input_ids"] for i in range(16)])
    with torch.no_grad():
        loss = model(batch, labels=batch).loss.item()
    assert loss < 0.5 * torch.log(torch.tensor(32.0)).item()  # chance is log(32) = 3.47


# -- export-hf ------------------------------------------------------------------------------------------------
TINY_RUN = ["model.n_layer=1", "model.d_model=16", "model.n_head=2", "model.max_seq_len=16", "model.ffn=apn",
            "model.ffn_kwargs={n_patches: 8, rank: 4, top_k: 2}", "train.batch_size=4", "train.max_steps=2",
            "train.warmup_steps=1", "train.eval_interval=2", "train.eval_tokens=32", "train.log_interval=1",
            "train.progress=false", "train.precision=fp32", "data.corpus=pydocs"]


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(result, needle):
    code, _, err = result
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("routemem: error: ") and needle in err, err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    assert main(["train", "--json", "--out", str(out), *TINY_RUN]) == 0
    return out


def test_export_hf_and_back_keep_the_weights(run, tmp_path, capsys):
    code, out, _ = cli(capsys, "export-hf", "--ckpt", run, "--out", tmp_path / "hf")
    assert code == 0 and out.strip() == str(tmp_path / "hf")
    original, _, _ = load_model(run)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = ids(length=12, vocab=original.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(exported(x).logits, original(x))
    assert json.loads((tmp_path / "hf" / "routemem_run.json").read_text())["step"] == 2

    code, _, _ = cli(capsys, "export-hf", "--to", "routemem", "--ckpt", tmp_path / "hf", "--out", tmp_path / "back")
    assert code == 0
    back, _, _ = load_model(tmp_path / "back")
    assert back.state_dict().keys() == original.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in original.state_dict().items())
    sample = ("sample", "--prompt", "def ", "--tokens", "20", "--seed", "3")
    assert cli(capsys, *sample, "--ckpt", tmp_path / "back")[1] == cli(capsys, *sample, "--ckpt", run)[1]


def test_export_hf_refuses_bad_input_in_one_line_and_writes_nothing(run, tmp_path, capsys, monkeypatch):
    assert_one_line_error(cli(capsys, "export-hf", "--ckpt", tmp_path / "missing", "--out", tmp_path / "a"),
                          "no checkpoint found")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert_one_line_error(cli(capsys, "export-hf", "--ckpt", run, "--out", tmp_path / "full"),
                          "exists and is not an empty folder")
    assert_one_line_error(cli(capsys, "export-hf", "--to", "routemem", "--ckpt", run, "--out", tmp_path / "b"),
                          "is not a transformers model folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # nor a temporary folder left over
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]

    for name in [m for m in sys.modules if m == "transformers" or m.startswith(("transformers.", "routemem.integrations"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    assert_one_line_error(cli(capsys, "export-hf", "--ckpt", run, "--out", tmp_path / "c"),
                          "pip install 'routemem[hf]'")


# -- swap_layers -------------------------------------------------------------------------------------------------
def tiny_llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))


def tiny_gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


SWAPS = {
    "llama-apn": (tiny_llama, dict(ffn="apn", ffn_kwargs=APN), "mlp"),
    "llama-palimpsa": (tiny_llama, dict(mixer="palimpsa", mixer_kwargs={"mode": "chunk"}), "self_attn"),
    "gpt2-apn": (tiny_gpt2, dict(ffn="apn", ffn_kwargs=APN), "mlp"),
}


@pytest.mark.parametrize("name", SWAPS)
def test_swapped_model_is_causal_trains_and_generates(name):
    build, swap, replaced = SWAPS[name]
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    swap_layers(model, **swap)
    after = model.state_dict()
    kept = [k for k in before if f".{replaced}." not in k]
    assert kept and all(torch.equal(after[k], before[k]) for k in kept)  # norms, embeddings, the rest
    decoder_layers = model.model.layers if hasattr(model, "model") else model.transformer.h
    assert all(type(getattr(layer, replaced)).__name__ in ("FFNAsMLP", "MixerAsAttention") for layer in decoder_layers)

    model.eval()
    x = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        logits = model(x).logits
        assert logits.shape == (2, 12, 64)
        for t in range(1, 12):  # a change at position t leaves every logit before t as it was
            changed = x.clone()
            changed[:, t:] = (changed[:, t:] + 1) % 64
            assert torch.equal(model(changed).logits[:, :t], logits[:, :t]), t

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5

    model.eval()
    prompt = x[:1, :3]
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    greedy = prompt
    with torch.no_grad():  # greedy by hand, the whole sequence each step
        for _ in range(6):
            greedy = torch.cat([greedy, model(greedy).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, greedy)


def test_swapped_mixer_refuses_a_kv_cache_and_left_padding():
    model = swap_layers(tiny_llama(), mixer="gla", layers=[1]).eval()
    assert model.config.use_cache is False and model.generation_config.use_cache is False
    assert type(model.model.layers[0].self_attn).__name__ == "LlamaAttention"  # layers=[1] only
    x = torch.randint(0, 64, (2, 5))
    with pytest.raises(ValueError, match="keeps no KV cache"):
        model(x, use_cache=True)
    with pytest.raises(ValueError, match="left padding"):
        model(x, attention_mask=torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]))


def test_swap_layers_refuses_what_it_cannot_do():
    fake = nn.Module()
    fake.config = SimpleNamespace(model_type="bert")
    with pytest.raises(ValueError, match="supports model types gpt2, llama, mistral, qwen2; got 'bert'"):
        swap_layers(fake, ffn="apn")
    with pytest.raises(ValueError, match="give ffn and/or mixer"):
        swap_layers(tiny_gpt2())
    with pytest.raises(ValueError, match=r"layers: 2 is not a decoder layer index \(the model has 2: 0..1\)"):
        swap_layers(tiny_gpt2(), ffn="apn", layers=[2])
    with pytest.raises(ValueError, match="unknown ffn 'nope'"):
        swap_layers(tiny_gpt2(), ffn="nope")
