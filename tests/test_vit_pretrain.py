"""ViT pretraining (routemem/train/vit_pretrain.py) and ``routemem pretrain-vit``: learning on an easy
synthetic set, the train / val split and the epoch sampler, determinism, the checkpoint and its
sidecar, and the CLI's one-line errors that leave no file behind. Tiny models: a few seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from routemem.cli import main
from routemem.data.glyphs import CHARSET
from routemem.data.images import make_imageset
from routemem.errors import ConfigError, DataError, UserError
from routemem.models.vit import ViTConfig
from routemem.models.vit_weights import load_vit
from routemem.train.vit_pretrain import (
    EpochSampler,
    PretrainSettings,
    check_out_path,
    eval_steps,
    load_pretraining_images,
    pretrain_vit,
    split_train_val,
    write_pretrained,
)

TINY = ViTConfig(image_size=8, patch_size=4, d_model=16, n_layer=1, n_head=2, mlp_hidden=32)
TINY_FLAGS = ["--d-model", "16", "--layers", "1", "--heads", "2", "--patch", "4", "--image-size", "8"]


def quadrant_set(n_per_class: int = 30, seed: int = 0):
    """4 classes, each a bright 4x4 quadrant of an 8x8 image under noise: easy, but only if the model
    learns (chance is 0.25)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), n_per_class)
    images = rng.uniform(0, 0.3, size=(len(labels), 1, 8, 8)).astype(np.float32)
    for i, c in enumerate(labels):
        r, k = divmod(int(c), 2)
        images[i, 0, 4 * r:4 * r + 4, 4 * k:4 * k + 4] += 0.6
    return make_imageset("quadrants", np.clip(images, 0, 1), labels, ["tl", "tr", "bl", "br"], "test")


def test_pretraining_learns_an_easy_set_well_above_chance():
    model, record = pretrain_vit(TINY, quadrant_set(), steps=60, batch_size=16, lr=3e-3, bf16=False)
    assert record["chance"] == 0.25 and record["n_val"] == 4 * 3 and record["n_train"] == 4 * 27
    assert record["val_accuracy"] >= 0.9, record["curve"]
    assert record["val_top5"] == 1.0  # 4 classes: the top 5 hold them all
    assert [p["step"] for p in record["curve"]] == [15, 30, 45, 60]
    assert record["curve"][-1]["train_loss"] < record["curve"][0]["train_loss"]
    assert record["config"]["n_classes"] == 4 and model.config.n_classes == 4 and not model.training
    assert record["epochs"] == pytest.approx(60 * 16 / 108)


def test_same_seed_gives_the_same_weights_and_another_seed_does_not():
    images = quadrant_set(10)
    a = pretrain_vit(TINY, images, steps=4, batch_size=8, seed=1, bf16=False)[0].state_dict()
    b = pretrain_vit(TINY, images, steps=4, batch_size=8, seed=1, bf16=False)[0].state_dict()
    c = pretrain_vit(TINY, images, steps=4, batch_size=8, seed=2, bf16=False)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_val_split_is_per_class_disjoint_and_covers_every_sample():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 2)
    train, val = split_train_val(labels, 0.2, seed=0)
    assert not set(train) & set(val) and sorted([*train, *val]) == list(range(15))
    assert [int((labels[val] == c).sum()) for c in range(3)] == [2, 1, 1]  # round(0.2 n), at least 1
    other = split_train_val(labels, 0.2, seed=1)[1]
    assert not np.array_equal(val, other)  # seeded
    with pytest.raises(DataError, match="at least 2"):
        split_train_val(np.array([0, 0, 1]), 0.2, seed=0)


def test_epoch_sampler_visits_every_sample_once_per_epoch_and_is_a_function_of_the_step():
    indices = np.arange(100, 110)
    sampler = EpochSampler(indices, batch_size=4, seed=0)
    drawn = np.concatenate([sampler(step) for step in range(5)])  # 20 = two epochs
    assert sorted(drawn[:10]) == sorted(drawn[10:]) == list(indices)
    assert not np.array_equal(drawn[:10], drawn[10:])  # a new order each epoch
    assert np.array_equal(EpochSampler(indices, 4, seed=0)(3), sampler(3))  # no state carried


def test_eval_steps_are_spread_and_end_at_the_last_step():
    assert eval_steps(10) == [2, 4, 7, 9]
    assert eval_steps(2) == [0, 1] and eval_steps(1) == [0]


def test_settings_refuse_bad_values():
    for bad in ({"steps": 0}, {"batch_size": 0}, {"lr": 0.0}, {"lr": float("nan")}, {"val_share": 1.0},
                {"val_share": 0.0}, {"steps": 1.5}):
        with pytest.raises(ConfigError):
            PretrainSettings(**bad)
    tiny_lr = PretrainSettings(lr=1e-7)  # the floor follows the peak: lr / 100
    assert tiny_lr.train_config().min_lr == pytest.approx(1e-9) and tiny_lr.train_config().warmup_steps == 100


def test_checkpoint_loads_with_the_same_logits_and_the_sidecar_describes_it(tmp_path):
    images = quadrant_set(10)
    model, record = pretrain_vit(TINY, images, steps=3, batch_size=8, bf16=False)
    weights, sidecar = write_pretrained(model, record, tmp_path / "sub" / "vit.safetensors")
    assert weights == tmp_path / "sub" / "vit.safetensors" and sidecar == tmp_path / "sub" / "vit.json"
    loaded = load_vit(weights, strict_head=True)
    # the same model as the file gives: the no-weight-decay marks used while pretraining are gone
    assert not any(hasattr(p, "_no_weight_decay") for p in model.parameters())
    x = torch.from_numpy(images.images[:6])
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    meta = json.loads(sidecar.read_text())
    assert meta["weights"] == "vit.safetensors" and meta["config"] == record["config"]
    assert meta["source_sha256"] == images.sha256 and meta["class_names"] == list(images.class_names)
    assert meta["val_accuracy"] == record["val_accuracy"] and meta["settings"]["steps"] == 3
    assert meta["seconds"] > 0 and {"device", "cpu", "torch", "git_commit"} <= set(meta["env"])
    assert sorted(p.name for p in sidecar.parent.iterdir()) == ["vit.json", "vit.safetensors"]  # no temp files


def test_a_failed_sidecar_write_removes_the_new_weights(tmp_path, monkeypatch):
    import routemem.train.vit_pretrain as vp

    model, record = pretrain_vit(TINY, quadrant_set(5), steps=1, batch_size=4, bf16=False)

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(vp, "write_text_atomic", fail)
    with pytest.raises(OSError):
        write_pretrained(model, record, tmp_path / "vit.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_out_path_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / "taken.json").mkdir()
    for bad, words in ((tmp_path / "vit.pt", ".safetensors"), (tmp_path / ".safetensors", ".safetensors"),
                       (tmp_path / "dir.safetensors", "folder"), (tmp_path / "taken.safetensors", "folder"),
                       (tmp_path / "file" / "x" / "vit.safetensors", "is a file")):
        with pytest.raises(UserError, match=words):
            check_out_path(bad)
    assert check_out_path(tmp_path / "new" / "deeper" / "vit.safetensors").name == "vit.safetensors"


def test_other_sources_pretrain_on_their_fixed_half_or_all_classes(capsys):
    half = load_pretraining_images("digits", size=8)
    assert half.name == "digits:pretrain" and half.n_classes == 5
    everything = load_pretraining_images("digits", size=8, all_classes=True)
    assert everything.n_classes == 10 and "all 10 classes" in capsys.readouterr().err


def one_line_error(capsys, *argv) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("routemem: error: "), err
    return lines[0]


def test_cli_bad_inputs_are_one_line_errors_that_write_nothing(capsys, tmp_path):
    out = str(tmp_path / "o" / "vit.safetensors")
    (tmp_path / "a-file").write_text("x")
    cases = [
        (["--steps", "0"], "steps"), (["--batch-size", "0"], "batch-size"), (["--lr", "0"], "lr"),
        (["--val-share", "1"], "val-share"), (["--source", "nonesuch"], "nonesuch"),
        (["--heads", "5"], "n_head"), (["--image-size", "30"], "patch_size"),
        (["--samples-per-class", "1"], "samples-per-class"), (["--max-classes", "1"], "max-classes"),
        (["--device", "gpu"], "device"), (["--source", "glyphs:stream"], "must not see"),
    ]
    for flags, words in cases:
        assert words in one_line_error(capsys, "pretrain-vit", "--out", out, "--quiet", *flags), flags
    for bad_out in (str(tmp_path / "vit.pt"), str(tmp_path / "a-file" / "vit.safetensors"), str(tmp_path)):
        assert "--out" in one_line_error(capsys, "pretrain-vit", "--out", bad_out, "--quiet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing written, no folder made


def test_cli_pretrains_on_glyph_pretraining_classes_and_writes_both_files(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTEMEM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "vit.safetensors"
    code = main(["pretrain-vit", "--out", str(out), "--quiet", "--steps", "2", "--batch-size", "4",
                 "--max-classes", "3", "--samples-per-class", "4", "--device", "cpu", *TINY_FLAGS])
    printed = capsys.readouterr().out
    assert code == 0 and "val accuracy" in printed and str(out) in printed
    meta = json.loads((tmp_path / "vit.json").read_text())
    assert meta["source"] == "glyphs:pretrain" and meta["n_classes"] == 3 and meta["n_train"] + meta["n_val"] == 12
    # the pretraining half only: characters at even CHARSET positions (streams use the odd ones)
    assert all(CHARSET.index(name.rpartition("/")[2]) % 2 == 0 for name in meta["class_names"])
    model = load_vit(out)
    assert (model.config.d_model, model.config.n_layer, model.config.n_classes) == (16, 1, 3)
    assert model.config.mlp_hidden == 64  # 4 x d_model


def test_cli_help_names_the_real_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain-vit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    d, c = PretrainSettings(), ViTConfig()
    for flag, value in (("--steps", d.steps), ("--batch-size", d.batch_size), ("--lr", d.lr),
                        ("--val-share", d.val_share), ("--d-model", c.d_model), ("--layers", c.n_layer),
                        ("--heads", c.n_head), ("--patch", c.patch_size), ("--image-size", c.image_size)):
        after = text.split(flag, 2)[-1]  # the flag's own help, past the usage line
        assert f"default {value})" in after.split(" --")[0], flag
