"""Issue 10's defects of `routemem train | sample | eval`, each as the user met it on the command line."""

from __future__ import annotations

import json
import os
import stat

import pytest
from poison import nan_loss_at_step
from test_cli import TINY, assert_user_error, cli, tree_digest

from routemem.cli import main

CHAR = [*TINY, "data.corpus=pydocs", "data.tokenizer=char"]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A char-level run stopped at step 2 of 3 (train.stop_at), so it can be resumed."""
    out = tmp_path_factory.mktemp("stopped") / "r"
    assert main(["train", "--out", str(out), *CHAR, "train.stop_at=2"]) == 0
    return out


# 1. sample: numbers out of range are one-line errors, not tracebacks or silent greedy decoding
@pytest.mark.parametrize("flag, value", [("--top-k", "0"), ("--top-k", "-3"), ("--temperature", "0"),
                                         ("--temperature", "-1"), ("--temperature", "nan"), ("--tokens", "0")])
def test_sample_rejects_out_of_range_numbers(stopped, capsys, flag, value):
    assert_user_error(cli(capsys, "sample", "--ckpt", stopped, flag, value), flag, value)


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--max-tokens", "0")])
def test_eval_rejects_out_of_range_numbers(stopped, capsys, flag, value):
    assert_user_error(cli(capsys, "eval", "--ckpt", stopped, flag, value), flag, value)


# 2. --out naming a file (or a path under one)
def test_out_that_is_a_file(tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me\n")
    assert_user_error(cli(capsys, "train", "--out", existing, *CHAR), str(existing), "file")
    assert_user_error(cli(capsys, "train", "--out", existing / "run", *CHAR), str(existing), "file")
    assert existing.read_text() == "keep me\n"


# 3. a run that diverges before its first checkpoint is not a dead end, and names the right step
def test_divergence_before_the_first_checkpoint_can_be_rerun(tmp_path, capsys, monkeypatch):
    nan_loss_at_step(monkeypatch, 2)  # the 2nd optimizer step, before the step-2 checkpoint
    out = tmp_path / "r"
    code, _, err = cli(capsys, "train", "--out", out, *CHAR)
    assert code == 1 and "loss is nan at step 2;" in err and "Traceback" not in err
    assert not (out / "ckpt").exists()
    assert_user_error(cli(capsys, "train", "--out", out, "--resume", *CHAR), "no checkpoint", "without --resume")
    monkeypatch.undo()
    code, _, err = cli(capsys, "train", "--json", "--out", out, *CHAR)  # the same command again
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3]  # the failed attempt's step-1 record is gone


# 4. the path named when there is no checkpoint is the one that was looked for
def test_missing_checkpoint_message_names_the_real_path(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    code, _, err = cli(capsys, "train", "--out", out, "--resume", *CHAR)
    assert code == 2 and str(out / "ckpt" / "manifest.json") in err and "ckpt/ckpt" not in err
    (out / "ckpt").mkdir()
    for command in (["train", "--out", out, "--resume", *CHAR], ["eval", "--ckpt", out / "ckpt"]):
        code, _, err = cli(capsys, *command)
        assert code == 2 and str(out / "ckpt" / "manifest.json") in err and "ckpt/ckpt" not in err, err


# 5. --resume refuses what would make it another run, and allows schedule-neutral keys
@pytest.mark.parametrize("override, key", [
    ("data.tokenizer=byte", "data.tokenizer"),
    ("data.seq_len=8", "data.seq_len"),
    ("train.lr=0.01", "train.lr"),
    ("train.seed=1", "train.seed"),
    ("train.max_steps=9", "train.max_steps"),
    ("train.batch_size=8", "train.batch_size"),
])
def test_resume_refuses_overrides_that_change_the_run(stopped, capsys, override, key):
    before = tree_digest(stopped)
    assert_user_error(cli(capsys, "train", "--out", stopped, "--resume", *CHAR, override), key)
    assert tree_digest(stopped) == before


def test_resume_refuses_a_changed_corpus_file(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 300)
    run = [*TINY, f"data.corpus=file:{text}", "data.tokenizer=char"]
    out = tmp_path / "r"
    assert cli(capsys, "train", "--out", out, *run, "train.stop_at=2")[0] == 0
    text.write_text("the quick brown fox jumps over the lazy cat! " * 300)
    assert_user_error(cli(capsys, "train", "--out", out, "--resume", *run), "corpus.txt", "not the text")


def test_resume_keeps_the_run_config_and_allows_logging_changes(stopped, tmp_path, capsys):
    import shutil

    out = tmp_path / "r"
    shutil.copytree(stopped, out)
    # no --config and no overrides: the run's own config (minus its stop_at) is continued
    code, stdout, err = cli(capsys, "train", "--json", "--out", out, "--resume", "train.log_interval=2",
                            "train.eval_tokens=32")
    assert code == 0, err
    assert json.loads(stdout)["step"] == 3


# 6. the final val record is written once
def test_final_val_record_is_written_once(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli(capsys, "train", "--out", out, *CHAR, "train.eval_interval=3")[0] == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records if r["kind"] != "train"] == [("val", 3), ("test", 3)]
    final = json.loads((out / "final.json").read_text())
    assert [r for r in records if r["kind"] == "val"][0]["loss"] == final["val"]["loss"]
    # resuming the finished run redoes the final evals without doubling them
    assert cli(capsys, "train", "--out", out, "--resume")[0] == 0
    again = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in again if r["kind"] != "train"] == [("val", 3), ("test", 3)]


# 7. layer options: the option and the expected type, not Python internals
@pytest.mark.parametrize("override, needles", [
    ("model.mixer_kwargs.window=abc", ("window", "an int or null", "'abc'")),
    ("model.mixer_kwargs.window=2.5", ("window", "an int or null", "2.5")),
    ("model.mixer_kwargs.windw=4", ("unknown option 'windw'", "window")),
    ("model.ffn_kwargs.mult=big", ("ffn 'dense'", "mult", "a number")),
    ("model.ffn_kwargs.bias=3", ("bias", "true or false")),
])
def test_layer_option_errors_name_option_and_type(tmp_path, capsys, override, needles):
    out = tmp_path / "r"
    code, out_text, err = cli(capsys, "train", "--out", out, *CHAR, override)
    assert_user_error((code, out_text, err), *needles)
    assert "not supported between" not in err and not out.exists()


# 8. --resume and --resume-from together
def test_resume_and_resume_from_together(stopped, tmp_path, capsys):
    out = tmp_path / "r"
    assert_user_error(cli(capsys, "train", "--out", out, "--resume", "--resume-from", stopped, *CHAR),
                      "--resume", "--resume-from", "only one")
    assert not out.exists()


# 9. characters the char tokenizer never saw: one warning naming them
def test_unknown_prompt_characters_are_named_once(stopped, capsys):
    prompt = "d\u00e9j\u00e0 \u20ac\u20ac"
    code, out, err = cli(capsys, "sample", "--ckpt", stopped, "--prompt", prompt, "--tokens", "3")
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("routemem: warning:")]
    assert len(warnings) == 1, err
    assert "'\u20ac'" in warnings[0] and "'\u00e9'" in warnings[0] and "'\u00e0'" in warnings[0]
    assert "'d'" not in warnings[0]
    code, _, err = cli(capsys, "sample", "--ckpt", stopped, "--prompt", "def ", "--tokens", "3")
    assert code == 0 and "warning" not in err


# 10. every file of a run has the mode open() gives (0644 under umask 022), folders 0755
def test_run_files_follow_the_umask(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        out = tmp_path / "r"
        assert cli(capsys, "train", "--out", out, *CHAR)[0] == 0
        modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    finally:
        os.umask(old)
    assert {"config.yaml", "metrics.jsonl", "final.json", "loss.png", "ckpt", "ckpt/manifest.json"} <= set(modes)
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o755 if (out / name).is_dir() else 0o644)}
    assert not wrong, wrong
