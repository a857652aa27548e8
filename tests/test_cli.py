"""Command line: the happy path, and every kind of bad input giving one line, exit 2, no debris."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from routemem.cli import main

TINY = ["model.n_layer=1", "model.d_model=16", "model.n_head=2", "model.max_seq_len=16",
        "train.batch_size=4", "train.max_steps=3", "train.warmup_steps=1", "train.eval_interval=2",
        "train.eval_tokens=64", "train.log_interval=1", "train.progress=false", "train.precision=fp32"]


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(result, *needles):
    code, out, err = result
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("routemem: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def trained(tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("run") / "r"
    code, stdout, _ = cli(capsys, "train", "--json", "--out", out, *TINY, "data.corpus=pydocs")
    assert code == 0
    assert json.loads(stdout)["step"] == 3
    return out


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_train_ends_with_a_summary(tmp_path, capsys):
    out = tmp_path / "r"
    code, stdout, _ = cli(capsys, "train", "--out", out, *TINY, "data.corpus=pydocs")
    assert code == 0
    final = json.loads((out / "final.json").read_text())
    assert f"trained 3 steps ({final['tokens']:,} tokens)" in stdout and "tokens/s" in stdout
    for split in ("val", "test"):
        assert f"{split:<4} loss {final[split]['loss']:.4f}  perplexity {final[split]['ppl']:.3f}" in stdout
    assert f"run folder {out}:" in stdout and "loss.png" in stdout and "final.json" in stdout
    assert len(stdout.splitlines()) <= 6
    code, stdout, _ = cli(capsys, "train", "--out", tmp_path / "s", *TINY, "data.corpus=pydocs", "train.stop_at=2")
    assert code == 0 and "stopped at step 2 of 3" in stdout and "--resume" in stdout


def test_train_eval_sample_corpora(trained, capsys):
    code, out, _ = cli(capsys, "eval", "--ckpt", trained, "--split", "val", "--max-tokens", "100")
    assert code == 0
    record = json.loads(out)
    assert record["split"] == "val" and record["tokens"] == 100 and record["loss"] > 0
    code, out, _ = cli(capsys, "sample", "--ckpt", trained / "ckpt", "--prompt", "The ", "--tokens", "40")
    assert code == 0 and out.startswith("The ")
    code, out, _ = cli(capsys, "corpora", "--json")
    names = {row["name"]: row for row in json.loads(out)}
    assert names["pydocs"]["available"] and names["pydocs"]["chars"] > 100_000


@pytest.mark.parametrize("override, needle", [
    ("data.corpus=nonesuch", "nonesuch"),
    ("train.lrr=0.1", "train.lrr"),
    ("train.lr=fast", "train.lr"),
    ("model.n_layer=1.5", "model.n_layer"),
    ("model.mixer=nonesuch", "nonesuch"),
    ("data.seq_len=64", "max_seq_len"),
])
def test_bad_config_or_corpus_name(tmp_path, capsys, override, needle):
    out = tmp_path / "r"
    assert_user_error(cli(capsys, "train", "--out", out, *TINY, "data.corpus=pydocs", override), needle)
    assert not out.exists()


def test_config_file_typo(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  d_modle: 64\n")
    out = tmp_path / "r"
    assert_user_error(cli(capsys, "train", "--config", config, "--out", out), "model.d_modle")
    assert not out.exists()
    assert_user_error(cli(capsys, "train", "--config", tmp_path / "missing.yaml", "--out", out), "missing.yaml")


def test_bad_file_corpora(tmp_path, capsys):
    empty = write(tmp_path / "empty.txt", b"")
    short = write(tmp_path / "short.txt", b"just a few words here\n")
    latin1 = write(tmp_path / "latin1.txt", "caf\u00e9 ".encode("utf-8") * 50 + b"\xe9t\xe9" + b" more" * 50)
    out = tmp_path / "r"
    assert_user_error(cli(capsys, "train", "--out", out, *TINY, f"data.corpus=file:{empty}"), "empty")
    assert_user_error(cli(capsys, "train", "--out", out, *TINY, f"data.corpus=file:{short}"), "short")
    assert_user_error(cli(capsys, "train", "--out", out, *TINY, f"data.corpus=file:{latin1}"), "latin1.txt", "offset 300")
    assert_user_error(cli(capsys, "train", "--out", out, *TINY, f"data.corpus=file:{tmp_path}/nope.txt"), "nope.txt")
    assert not out.exists()


def test_missing_data_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ROUTEMEM_DATA", raising=False)
    out = tmp_path / "r"
    assert_user_error(cli(capsys, "train", "--out", out, *TINY, "data.corpus=shakespeare"),
                      "tinyshakespeare.txt", "ROUTEMEM_DATA")
    assert_user_error(cli(capsys, "train", "--out", out, "--data-dir", tmp_path / "nodir", *TINY,
                          "data.corpus=shakespeare"), "nodir")
    assert not out.exists()


def test_resume_with_another_architecture(trained, capsys):
    before = tree_digest(trained)
    assert_user_error(cli(capsys, "train", "--out", trained, "--resume", *TINY, "data.corpus=pydocs",
                          "model.d_model=32"), "another architecture", "d_model")
    assert tree_digest(trained) == before


def test_truncated_and_corrupt_checkpoints(trained, capsys):
    weights = trained / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert_user_error(cli(capsys, "eval", "--ckpt", trained), "model.safetensors")
    before = tree_digest(trained)
    assert_user_error(cli(capsys, "train", "--out", trained, "--resume", *TINY, "data.corpus=pydocs"),
                      "model.safetensors")
    assert tree_digest(trained) == before
    (trained / "ckpt" / "config.json").write_text("{oops")
    assert_user_error(cli(capsys, "sample", "--ckpt", trained), "config.json")
    assert_user_error(cli(capsys, "eval", "--ckpt", trained.parent / "elsewhere"), "no checkpoint")


def test_prompt_longer_than_max_seq_len(trained, capsys):
    assert_user_error(cli(capsys, "sample", "--ckpt", trained, "--prompt", "x" * 17), "max_seq_len=16")


def test_unknown_study_and_suite(capsys):
    assert_user_error(cli(capsys, "reproduce", "nonesuch"), "nonesuch")
    assert_user_error(cli(capsys, "bench", "nonesuch"), "nonesuch")


def test_exit_code_through_the_real_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "routemem", "train", "--out", str(tmp_path / "r"),
                           "data.corpus=nonesuch"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("routemem: error:") and "Traceback" not in proc.stderr


def test_resume_from_another_run_into_a_new_directory(trained, tmp_path, capsys):
    more = [*TINY, "data.corpus=pydocs", "train.max_steps=5"]
    code, out, _ = cli(capsys, "train", "--json", "--out", tmp_path / "next", "--resume-from", trained, *more)
    assert code == 0 and json.loads(out)["step"] == 5
    before = tree_digest(tmp_path / "next")
    assert_user_error(cli(capsys, "train", "--out", tmp_path / "next", "--resume-from", trained, *more),
                      "already holds a run")
    assert tree_digest(tmp_path / "next") == before
