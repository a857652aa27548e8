"""Defects of the command line, each as a user met it: issue 10's (`routemem train | sample | eval`),
then a new user's (overrides after --out, tracebacks, output paths checked before the work, values
accepted silently, help texts, the modes of cache files)."""

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
                                         ("--temperature", "-1"), ("--temperature", "nan"), ("--temperature", "inf"),
                                         ("--tokens", "0")])
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


# --- a new user's defects ------------------------------------------------------------------------

@pytest.fixture
def no_studies(monkeypatch):
    """Every study replaced by one that records its call and makes its folder, as a real one starts
    by doing: a check that is missing shows as a call (or a traceback), never as hours of training."""
    from routemem import cli as cli_module
    from routemem.experiments import STUDIES

    calls = []

    def fake(out, **kwargs):
        calls.append(out)
        (out / "palimpsa").mkdir(parents=True, exist_ok=True)
        return {"claims": []}

    monkeypatch.setitem(STUDIES, "palimpsa", fake)
    monkeypatch.setattr(cli_module, "cmd_reproduce_all", lambda args: calls.append(args.out) or 0)
    return calls


# 11. overrides on both sides of --out (and of any other option); other unknown words are refused
def test_overrides_anywhere_on_the_train_line(tmp_path, capsys):
    from routemem.cli import build_parser

    args = build_parser().parse_args(["train", "a.b=1", "--out", "o", "c.d=2", "--json", "a.b=3"])
    assert args.overrides == ["a.b=1", "c.d=2", "a.b=3"] and args.out == "o" and args.json  # order kept
    out = tmp_path / "r"
    code, stdout, err = cli(capsys, "train", "--config", "charlm-tiny", *CHAR[:6], "--out", out, *CHAR[6:],
                            "--json", "train.max_steps=2")
    assert code == 0, err
    assert json.loads(stdout)["step"] == 2  # from after --out
    model = json.loads((out / "ckpt" / "config.json").read_text())["model"]
    assert (model["n_layer"], model["d_model"]) == (1, 16)  # from before it (charlm-tiny has 4 x 128)
    with pytest.raises(SystemExit) as stop:
        main(["train", "--out", str(out), "train.max_steps=2", "--bogus"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "unrecognized arguments: --bogus" in err and "key.sub=value" in err


# 12. values that raised tracebacks are one-line errors naming the key, before anything is written
@pytest.mark.parametrize("overrides, needles", [
    (["train.threads=-3"], ("threads", "-3")),
    (["train.grad_clip=-1"], ("grad_clip", "-1", "0 turns clipping off")),
    (["train.stop_at=4"], ("stop_at", "4", "max_steps=3")),
    (["model.mixer=gated_sparse", "model.mixer_kwargs.k=17"], ("k=17", "max_seq_len=16", "every key")),
])
def test_bad_train_values(tmp_path, capsys, overrides, needles):
    out = tmp_path / "r"
    assert_user_error(cli(capsys, "train", "--out", out, *CHAR, *overrides), *needles)
    assert not out.exists()


def test_gated_sparse_k_may_be_the_whole_context():
    from routemem.layers import LayerSpec, build_mixer

    assert build_mixer("gated_sparse", LayerSpec(d_model=16, n_head=2, max_seq_len=16), {"k": 16}).k == 16


# 13. an output path that cannot be written is refused before the work, not after it
def test_reproduce_out_that_is_a_file_or_under_one(tmp_path, capsys, no_studies):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me\n")
    for study in ("palimpsa", "all"):
        assert_user_error(cli(capsys, "reproduce", study, "--quick", "--out", existing), str(existing), "file")
        assert_user_error(cli(capsys, "reproduce", study, "--quick", "--out", existing / "r"), str(existing),
                          "which is a file")
    assert no_studies == [] and existing.read_text() == "keep me\n"
    assert cli(capsys, "reproduce", "palimpsa", "--quick", "--out", tmp_path / "r")[0] == 0  # the fake ran
    assert no_studies == [tmp_path / "r"]


def test_bench_and_pretrain_vit_check_out_before_the_work(tmp_path, capsys, monkeypatch):
    import routemem.bench
    from routemem.train import vit_pretrain

    def no_work(*args, **kwargs):
        raise AssertionError("the work ran before --out was checked")

    monkeypatch.setattr(routemem.bench, "run_suite", no_work)
    monkeypatch.setattr(vit_pretrain, "load_pretraining_images", no_work)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_user_error(cli(capsys, "bench", "apn", "--out", afile / "b.json"), str(afile), "which is a file")
    assert_user_error(cli(capsys, "pretrain-vit", "--out", afile / "v.safetensors"), str(afile), "which is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in a read-only folder")
def test_read_only_out_folders(tmp_path, capsys, monkeypatch):
    import routemem.bench

    monkeypatch.setattr(routemem.bench, "run_suite", lambda *a, **k: pytest.fail("measured before --out was checked"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert_user_error(cli(capsys, "train", "--out", locked / "r", *CHAR), str(locked), "permission denied")
        assert_user_error(cli(capsys, "bench", "apn", "--out", locked / "b.json"), str(locked), "permission denied")
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


# 14. an empty --out would write into the current folder
@pytest.mark.parametrize("command", [["train", *CHAR], ["bench", "apn"], ["reproduce", "palimpsa", "--quick"],
                                     ["pretrain-vit"]])
def test_empty_out_is_refused(tmp_path, capsys, monkeypatch, no_studies, command):
    import routemem.bench

    monkeypatch.setattr(routemem.bench, "run_suite", lambda *a, **k: pytest.fail("ran with --out ''"))
    monkeypatch.chdir(tmp_path)
    assert_user_error(cli(capsys, *command[:1], "--out", "", *command[1:]), "--out is empty")
    assert list(tmp_path.iterdir()) == [] and no_studies == []


# 15. continuing a checkpoint that is already at (or past) the schedule's end, or past stop_at
@pytest.mark.parametrize("max_steps", [1, 2])
def test_resume_from_with_no_steps_left(stopped, tmp_path, capsys, max_steps):
    out = tmp_path / "next"
    assert_user_error(cli(capsys, "train", "--resume-from", stopped, "--out", out, *CHAR,
                          f"train.max_steps={max_steps}"), "step 2", f"train.max_steps={max_steps}")
    assert not out.exists()


@pytest.mark.parametrize("stop_at", [1, 2])
def test_resume_with_stop_at_not_after_the_checkpoint(stopped, capsys, stop_at):
    before = tree_digest(stopped)
    assert_user_error(cli(capsys, "train", "--out", stopped, "--resume", f"train.stop_at={stop_at}"),
                      f"train.stop_at={stop_at}", "step 2")
    assert tree_digest(stopped) == before


# 16. a config's model.vocab_size is replaced by the tokenizer's: said once, with both numbers
def test_vocab_size_in_the_config_is_replaced_with_a_warning(tmp_path, capsys):
    out = tmp_path / "r"
    code, _, err = cli(capsys, "train", "--out", out, *CHAR, "model.vocab_size=10")
    assert code == 0, err
    vocab = json.loads((out / "ckpt" / "config.json").read_text())["model"]["vocab_size"]
    assert vocab != 10
    warnings = [line for line in err.splitlines() if line.startswith("routemem: warning:")]
    assert len(warnings) == 1 and "model.vocab_size=10" in warnings[0] and str(vocab) in warnings[0], err


# 17. a data folder that does not exist is named, even where the corpus at hand would not read it
def test_missing_data_dir_is_an_error_everywhere(stopped, tmp_path, capsys, no_studies):
    nope = tmp_path / "nope"
    for command in (["train", "--out", tmp_path / "r", *CHAR], ["eval", "--ckpt", stopped], ["corpora"],
                    ["reproduce", "palimpsa", "--quick", "--out", tmp_path / "o"],
                    ["reproduce", "all", "--quick", "--out", tmp_path / "o"]):
        assert_user_error(cli(capsys, *command, "--data-dir", nope), str(nope), "does not exist")
    assert_user_error(cli(capsys, "train", "--out", tmp_path / "r", *CHAR, f"data.data_dir={nope}"),
                      "data.data_dir", "does not exist")
    assert not (tmp_path / "r").exists() and no_studies == []


# 18. --shard with a negative index reaches the check that explains I/N
@pytest.mark.parametrize("shard", ["-1/2", "-3"])
def test_negative_shard_is_our_one_line_error(tmp_path, capsys, no_studies, shard):
    assert_user_error(cli(capsys, "reproduce", "palimpsa", "--quick", "--out", tmp_path / "o", "--shard", shard),
                      "0 <= I < N", f"'{shard}'")
    assert no_studies == []


# 19. help: the registered layers, plain text, and documentation a wheel user has
@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_help_lists_the_registered_mixers_and_ffns(capsys, argv):
    from routemem.layers import FFNS, MIXERS

    with pytest.raises(SystemExit) as stop:
        main(argv)
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "``" not in out
    words = set(out.replace(",", " ").split())
    assert set(MIXERS) <= words and set(FFNS) <= words


def test_bench_help_points_to_what_a_wheel_has(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "pydoc routemem.bench" in out and "docs/benchmarks.md of the source repository" in out


# 20. cache files follow the umask like any other file: a shared cache is readable by all
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_token_cache_follows_the_umask(tmp_path, umask, mode):
    from routemem.data import ByteTokenizer, load_splits, make_corpus

    corpus = make_corpus("t", "some text to cache " * 20, "test")
    old = os.umask(umask)
    try:
        load_splits(corpus, ByteTokenizer(), str(tmp_path))
    finally:
        os.umask(old)
    (cached,) = tmp_path.iterdir()
    assert cached.name.startswith("tokens-") and cached.suffix == ".npy"
    assert stat.S_IMODE(cached.stat().st_mode) == mode


def test_compiled_kernels_follow_the_umask(tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    from routemem.ops import native

    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    source = tmp_path / "k.cpp"
    source.write_text('extern "C" int one() { return 1; }\n')
    monkeypatch.setenv("ROUTEMEM_CACHE", str(tmp_path / "cache"))
    old = os.umask(0o022)
    try:
        library = Path(native.build(source, compiler))
    finally:
        os.umask(old)
    assert stat.S_IMODE(library.stat().st_mode) == 0o755
    assert [p.name for p in library.parent.iterdir()] == [library.name]  # no temp file left
