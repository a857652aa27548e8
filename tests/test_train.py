"""Trainer: resume equality, divergence handling, optimizer groups, schedule, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from poison import nan_loss_at_step

from routemem.config import from_dict
from routemem.errors import CheckpointError, TrainingDiverged
from routemem.models import LMConfig, TransformerLM
from routemem.train import RunConfig, Trainer, load_model
from routemem.train import checkpoint as ckpt_io
from routemem.train.optim import lr_at, param_groups

TINY = {
    "model": {"n_layer": 2, "d_model": 32, "n_head": 2, "max_seq_len": 32, "dropout": 0.1},
    "data": {"corpus": "pydocs", "tokenizer": "char"},
    "train": {"batch_size": 8, "max_steps": 60, "warmup_steps": 5, "log_interval": 10,
              "eval_interval": 15, "eval_tokens": 512, "precision": "fp32", "progress": False},
}


def tiny_config(**train) -> RunConfig:
    data = json.loads(json.dumps(TINY))
    data["train"].update(train)
    return from_dict(RunConfig, data)


def run(config: RunConfig, out, resume=None) -> Trainer:
    trainer = Trainer(config, out, resume=resume)
    trainer.fit()
    trainer.close()
    return trainer


def weights(out) -> dict[str, torch.Tensor]:
    model, _, _ = load_model(out)
    return model.state_dict()


def test_resume_equals_straight_run(tmp_path):
    # Dropout is on, so this also checks that the torch RNG state is restored.
    run(tiny_config(), tmp_path / "straight")
    run(tiny_config(stop_at=30), tmp_path / "split")
    assert json.loads((tmp_path / "split/ckpt/state.json").read_text())["step"] == 30
    run(tiny_config(), tmp_path / "split", resume=True)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # metrics.jsonl of the split run holds each step once, like the straight run's
    steps = lambda p: [json.loads(line)["step"] for line in (p / "metrics.jsonl").read_text().splitlines()
                       if json.loads(line)["kind"] == "train"]
    assert steps(tmp_path / "split") == steps(tmp_path / "straight")


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(tiny_config(), tmp_path / "nothing", resume=True)


def test_existing_run_is_not_overwritten(tmp_path):
    run(tiny_config(max_steps=2, eval_interval=1), tmp_path / "r")
    with pytest.raises(ValueError, match="already holds a run"):
        Trainer(tiny_config(), tmp_path / "r")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(eval_interval=4, max_steps=20)
    nan_loss_at_step(monkeypatch, 6)  # after the step-4 checkpoint
    trainer = Trainer(config, tmp_path / "r")
    before = None
    with pytest.raises(TrainingDiverged, match="nan at step 6;"):
        before = trainer.fit()
    assert before is None
    state = json.loads((tmp_path / "r/ckpt/state.json").read_text())
    assert state["step"] == 4
    model, _, _ = load_model(tmp_path / "r")  # the kept checkpoint is intact and finite
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_final_metrics_and_checkpoint_contents(tmp_path):
    trainer = run(tiny_config(max_steps=10, eval_interval=5), tmp_path / "r")
    final = json.loads((tmp_path / "r/final.json").read_text())
    assert final["step"] == 10 and final["corpus"] == "pydocs" and len(final["corpus_sha256"]) == 64
    for split in ("val", "test"):
        m = final[split]
        assert math.isclose(m["ppl"], math.exp(m["loss"]), rel_tol=1e-9)
        assert math.isclose(m["bits_per_token"], m["loss"] / math.log(2), rel_tol=1e-9)
        assert m["bits_per_byte"] > 0
    files = {p.name for p in (tmp_path / "r/ckpt").iterdir()}
    assert {"model.safetensors", "state.safetensors", "state.json", "config.json", "tokenizer.json",
            "manifest.json"} <= files
    assert json.loads((tmp_path / "r/ckpt/tokenizer.json").read_text())["kind"] == "char"
    records = [json.loads(line) for line in (tmp_path / "r/metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert {"step", "tokens", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(train_records[0])
    model, tokenizer, _ = load_model(tmp_path / "r")
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_final_json_loss_plot_and_timings(tmp_path):
    from routemem.machine import git_commit

    run(tiny_config(max_steps=10, eval_interval=5), tmp_path / "r")
    final = json.loads((tmp_path / "r/final.json").read_text())
    assert final["wall_time_s"] > 0 and final["tokens_per_s"] > 0
    assert final["git_commit"] == git_commit() and final["machine"]["device"] == "cpu"
    assert {"cpu", "torch", "threads"} <= set(final["machine"])
    assert (tmp_path / "r/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # val records sit at the run's position in tokens, like train records (loss.png's x axis)
    records = [json.loads(line) for line in (tmp_path / "r/metrics.jsonl").read_text().splitlines()]
    tokens_per_step = TINY["train"]["batch_size"] * TINY["model"]["max_seq_len"]
    evals = [r for r in records if r["kind"] in ("val", "test")]
    assert [r["step"] for r in evals] == [5, 10, 10]
    for r in records:
        assert r["tokens"] == r["step"] * tokens_per_step, r
    assert all(r["tokens_scored"] > 0 for r in evals)


def test_wall_time_adds_up_over_a_resume(tmp_path):
    run(tiny_config(max_steps=10, eval_interval=5, stop_at=5), tmp_path / "r")
    first = json.loads((tmp_path / "r/ckpt/state.json").read_text())["wall_time_s"]
    trainer = Trainer(tiny_config(max_steps=10, eval_interval=5), tmp_path / "r", resume=True)
    result = trainer.fit()
    trainer.close()
    assert first > 0 and result["wall_time_s"] > first


def test_progress_bar_shows_the_latest_val_loss(tmp_path, capsys):
    run(tiny_config(max_steps=4, eval_interval=2, log_interval=1, progress=True), tmp_path / "r")
    val = [json.loads(line)["loss"] for line in (tmp_path / "r/metrics.jsonl").read_text().splitlines()
           if json.loads(line)["kind"] == "val"][0]  # the step-2 eval, the last one the bar shows
    assert f"val={val:.3f}" in capsys.readouterr().err


def test_corrupt_checkpoint_is_reported_by_name(tmp_path):
    run(tiny_config(max_steps=2, eval_interval=1), tmp_path / "r")
    target = tmp_path / "r/ckpt/model.safetensors"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path / "r")
    ckpt = tmp_path / "r/ckpt/manifest.json"
    ckpt.write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json"):
        ckpt_io.read_checkpoint(tmp_path / "r")


def test_param_groups_skip_norms_biases_tied_embeddings_and_gates():
    model = TransformerLM(LMConfig(vocab_size=20, n_layer=1, d_model=16, n_head=2, max_seq_len=8))
    model.blocks[0].mixer.register_parameter("gate", torch.nn.Parameter(torch.zeros(4, 4)))
    decay, no_decay = param_groups(model, 0.1)
    decay_ids = {id(p) for p in decay["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert id(model.tok_emb.weight) not in decay_ids  # tied with the output head
    assert id(model.blocks[0].mixer.gate) not in decay_ids
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any("mixer_norm" in names[id(p)] for p in no_decay["params"])
    assert id(model.blocks[0].mixer.qkv.weight) in decay_ids
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    untied = TransformerLM(LMConfig(vocab_size=20, n_layer=1, d_model=16, n_head=2, max_seq_len=8,
                                    tie_embeddings=False))
    assert id(untied.tok_emb.weight) in {id(p) for p in param_groups(untied, 0.1)[0]["params"]}


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = tiny_config(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110).train
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    values = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    for name, accum in (("a", 1), ("b", 4)):
        config = tiny_config(max_steps=4, eval_interval=4, grad_accum=accum)
        config.model.dropout = 0.0
        run(config, tmp_path / name)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, corpus", [("charlm-quick", "shakespeare"), ("charlm-small", "shakespeare"),
                                          ("charlm-tiny", "pydocs")])
def test_shipped_configs_load_and_build(name, corpus):
    from routemem.cli import resolve_config_path
    from routemem.config import load_config

    config = load_config(RunConfig, resolve_config_path(name))
    assert config.data.corpus == corpus
    model = TransformerLM(config.model)
    assert model.num_params() > 100_000


def test_tensorboard_missing_is_a_clear_error(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="tensorboard"):
            Trainer(tiny_config(tensorboard=True), tmp_path / "r")
        assert not (tmp_path / "r").exists()
    else:
        run(tiny_config(tensorboard=True, max_steps=2, eval_interval=1), tmp_path / "r")
        assert any((tmp_path / "r" / "tb").iterdir())


def test_fit_steps_after_backward_sees_this_steps_gradients_before_they_are_cleared():
    """after_backward(step) runs with the step's gradients in .grad (after_step runs once they are
    cleared); frozen parameters have none."""
    from routemem.train.config import TrainConfig
    from routemem.train.supervised import fit_steps

    torch.manual_seed(0)
    model = TransformerLM(LMConfig(vocab_size=11, n_layer=1, d_model=16, n_head=2, max_seq_len=8))
    model.lm_head.weight.requires_grad_(False)  # tied with the embedding: both frozen
    seen = {"backward": [], "step": []}
    batch = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(0))

    def grad_norm():
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        return float(torch.stack([g.norm() for g in grads]).norm()) if grads else 0.0

    fit_steps(model, lambda step: (batch[:, :-1], batch[:, 1:]), TrainConfig(batch_size=2, max_steps=3, lr=1e-3),
              after_backward=lambda step: seen["backward"].append((step, grad_norm(), model.lm_head.weight.grad)),
              after_step=lambda step: seen["step"].append(grad_norm()))
    assert [s for s, _, _ in seen["backward"]] == [0, 1, 2]
    assert all(norm > 0 and frozen is None for _, norm, frozen in seen["backward"])
    assert seen["step"] == [0.0, 0.0, 0.0]
