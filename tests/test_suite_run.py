"""``routemem reproduce all`` as a user drives it, on fake studies: each called as ``reproduce
<study>`` calls it, a second run reusing what is complete, a changed setting / --force / a lost
results.json running it again, a failing study reported while the others finish (exit 1), missing
studies listed, and mistakes as one-line errors before anything runs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from suite_fakes import FakeStudies

from routemem.cli import main
from routemem.experiments.suite import run as suite


def reproduce_all(out: Path, *flags: str) -> int:
    return main(["reproduce", "all", "--quick", "--out", str(out), *flags])


def manifest(out: Path) -> dict:
    return json.loads((out / "suite.json").read_text())


def test_each_study_is_called_as_reproduce_calls_it_in_the_expected_order(monkeypatch, tmp_path, capsys):
    fakes = FakeStudies(monkeypatch, ["fake-a", "fake-b"])
    order = []
    for name in ("fake-a", "fake-b"):
        study = suite.experiments.STUDIES[name]
        monkeypatch.setitem(suite.experiments.STUDIES, name,
                            lambda _study=study, _name=name, **kw: (order.append(_name), _study(**kw))[1])
    out = tmp_path / "all"
    assert reproduce_all(out, "--device", "cpu", "--jobs", "2", "--data-dir", str(tmp_path)) == 0
    assert order == ["fake-a", "fake-b"]
    assert fakes.kwargs["fake-a"] == [{"out": out, "quick": True, "data_dir": str(tmp_path), "device": "cpu",
                                       "jobs": 2, "shard": None, "threads": 1}]
    entry = manifest(out)["studies"]["fake-a"]
    assert entry["status"] == "complete" and entry["mode"] == "quick" and entry["results"] == "fake-a/results.json"
    assert entry["command"] == (f"routemem reproduce fake-a --quick --out {out} --data-dir {tmp_path} "
                                "--device cpu --jobs 2 --threads 1")
    assert entry["fingerprint"] == suite.setting_fingerprint("fake-a", quick=True) and entry["seconds"] >= 0
    assert entry["started"] <= entry["finished"]
    printed = capsys.readouterr().out
    assert f"report: {out / 'REPORT.md'}" in printed and "fake-b  complete: 1 reproduced" in printed
    assert (out / "REPORT.md").is_file() and (out / "report.html").is_file()


def test_extra_studies_run_after_the_expected_ones(monkeypatch):
    FakeStudies(monkeypatch, ["late", "fake-a"], expected=["fake-a", "absent"])
    assert suite.suite_order() == ["fake-a", "absent", "late"]


def test_a_second_run_reuses_complete_studies_and_rebuilds_the_report(monkeypatch, tmp_path, capsys):
    fakes = FakeStudies(monkeypatch, ["fake-a", "fake-b"])
    out = tmp_path / "all"
    assert reproduce_all(out) == 0
    (out / "REPORT.md").unlink()
    assert reproduce_all(out) == 0
    assert fakes.calls == {"fake-a": 1, "fake-b": 1}
    assert manifest(out)["invocation"]["reused"] == ["fake-a", "fake-b"]
    assert "reused from an earlier run" in (out / "REPORT.md").read_text()


def test_a_changed_setting_runs_the_study_again(monkeypatch, tmp_path):
    fakes = FakeStudies(monkeypatch, ["fake-a", "fake-b"])
    out = tmp_path / "all"
    assert reproduce_all(out) == 0
    fakes.modules["fake-a"].QUICK = replace(fakes.modules["fake-a"].QUICK, steps=11)
    assert reproduce_all(out) == 0
    assert fakes.calls == {"fake-a": 2, "fake-b": 1}
    assert manifest(out)["studies"]["fake-a"]["fingerprint"] == suite.setting_fingerprint("fake-a", True)


def test_another_mode_or_a_lost_results_file_runs_the_study_again(monkeypatch, tmp_path):
    fakes = FakeStudies(monkeypatch, ["fake-a", "fake-b"])
    out = tmp_path / "all"
    assert reproduce_all(out) == 0
    (out / "fake-b" / "results.json").unlink()
    assert reproduce_all(out) == 0
    assert fakes.calls == {"fake-a": 1, "fake-b": 2}
    assert main(["reproduce", "all", "--out", str(out)]) == 0  # full, after quick
    assert fakes.calls == {"fake-a": 2, "fake-b": 3} and manifest(out)["studies"]["fake-a"]["mode"] == "full"


def test_another_data_folder_runs_the_study_again(monkeypatch, tmp_path):
    fakes = FakeStudies(monkeypatch, ["fake-a"])
    (tmp_path / "data").mkdir()
    (tmp_path / "other").mkdir()
    monkeypatch.setenv("ROUTEMEM_DATA", str(tmp_path / "data"))
    out = tmp_path / "all"
    assert reproduce_all(out) == 0 and reproduce_all(out, "--data-dir", str(tmp_path / "data")) == 0
    assert fakes.calls == {"fake-a": 1}  # the same folder, named by the variable, then by the flag
    assert manifest(out)["studies"]["fake-a"]["data_dir"] == str(tmp_path / "data")
    assert reproduce_all(out, "--data-dir", str(tmp_path / "other")) == 0
    assert fakes.calls == {"fake-a": 2}


def test_force_runs_every_study_again_from_an_empty_run_cache(monkeypatch, tmp_path):
    fakes = FakeStudies(monkeypatch, ["fake-a", "fake-b"])
    out = tmp_path / "all"
    assert reproduce_all(out) == 0
    cached = out / "fake-a" / "runs" / "unit-0.json"
    cached.parent.mkdir()
    cached.write_text("{}")
    assert reproduce_all(out, "--force") == 0
    assert fakes.calls == {"fake-a": 2, "fake-b": 2}
    assert not cached.exists() and (out / "fake-a" / "results.json").is_file()
    assert manifest(out)["command"].endswith("--force")


def test_a_study_without_a_setting_is_never_taken_as_unchanged(monkeypatch, tmp_path):
    fakes = FakeStudies(monkeypatch, ["fake-a"], without_setting=("fake-a",))
    out = tmp_path / "all"
    assert reproduce_all(out) == 0 and reproduce_all(out) == 0
    assert fakes.calls == {"fake-a": 2} and manifest(out)["studies"]["fake-a"]["fingerprint"] is None
    assert "no Setting" in (out / "REPORT.md").read_text()


def test_a_failing_study_is_reported_and_the_others_still_run(monkeypatch, tmp_path, capsys):
    fakes = FakeStudies(monkeypatch, ["fake-a", "fake-b", "fake-c"], failing={"fake-b": RuntimeError("boom 42")})
    out = tmp_path / "all"
    assert reproduce_all(out) == 1
    studies = manifest(out)["studies"]
    assert [studies[n]["status"] for n in ("fake-a", "fake-b", "fake-c")] == ["complete", "failed", "complete"]
    error = studies["fake-b"]["error"]
    assert error["type"] == "RuntimeError" and error["message"] == "boom 42"
    assert "RuntimeError: boom 42" in error["traceback"][-1] and len(error["traceback"]) <= suite.TRACEBACK_LINES
    assert "fake-b  failed: RuntimeError: boom 42" in capsys.readouterr().out
    report = (out / "REPORT.md").read_text()
    assert "**Failed**: RuntimeError: boom 42" in report and "fake_c_claim" in report
    # the failed study, and only it, runs again next time
    del fakes.failing["fake-b"]
    assert reproduce_all(out) == 0
    assert fakes.calls == {"fake-a": 1, "fake-b": 2, "fake-c": 1}


def test_a_user_error_inside_a_study_is_that_study_failing(monkeypatch, tmp_path):
    from routemem.errors import DataError

    FakeStudies(monkeypatch, ["fake-a", "fake-b"], failing={"fake-a": DataError("corpus 'x' not found")})
    out = tmp_path / "all"
    assert reproduce_all(out) == 1
    assert manifest(out)["studies"]["fake-a"]["error"]["type"] == "DataError"
    assert manifest(out)["studies"]["fake-b"]["status"] == "complete"


def test_studies_routemem_lacks_are_listed_as_missing(monkeypatch, tmp_path, capsys):
    fakes = FakeStudies(monkeypatch, ["fake-a"], expected=["fake-a", "absent"])
    out = tmp_path / "all"
    assert reproduce_all(out) == 0
    assert manifest(out)["studies"]["absent"] == {"status": "missing", "mode": "quick"}
    assert fakes.calls == {"fake-a": 1}
    assert "absent  missing" in capsys.readouterr().out
    report = (out / "REPORT.md").read_text()
    assert "## Study: absent" in report and "missing (this version of routemem has no such study)" in report


def test_ctrl_c_keeps_the_studies_finished_before_it(monkeypatch, tmp_path):
    fakes = FakeStudies(monkeypatch, ["fake-a", "fake-b"], failing={"fake-b": KeyboardInterrupt()})
    out = tmp_path / "all"
    assert reproduce_all(out) == 130
    assert list(manifest(out)["studies"]) == ["fake-a"]
    del fakes.failing["fake-b"]
    assert reproduce_all(out) == 0 and fakes.calls == {"fake-a": 1, "fake-b": 2}


@pytest.mark.parametrize("flags, message", [
    (["--jobs", "0"], "--jobs must be a whole number >= 1, got '0'"),
    (["--device", "gpu"], "device must be one of auto, cpu, cuda"),
    (["--pair", "a:b"], "--pair applies to the apn study only"),
    (["--shard", "0/2"], "--shard applies to one study"),
])
def test_mistakes_are_one_line_errors_before_anything_runs(monkeypatch, tmp_path, capsys, flags, message):
    fakes = FakeStudies(monkeypatch, ["fake-a"])
    assert reproduce_all(tmp_path / "all", *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("routemem: error: ") and message in err and err.count("\n") == 1
    assert fakes.calls == {"fake-a": 0} and not (tmp_path / "all").exists()


def test_a_foreign_suite_json_is_not_overwritten(monkeypatch, tmp_path, capsys):
    fakes = FakeStudies(monkeypatch, ["fake-a"])
    (tmp_path / "suite.json").write_text("[1, 2]")
    assert reproduce_all(tmp_path) == 2
    assert "is not a routemem suite manifest" in capsys.readouterr().err
    assert fakes.calls == {"fake-a": 0} and (tmp_path / "suite.json").read_text() == "[1, 2]"


def test_force_with_one_study_is_a_user_error(tmp_path, capsys):
    assert main(["reproduce", "palimpsa", "--quick", "--force", "--out", str(tmp_path)]) == 2
    assert "--force applies to 'all' only" in capsys.readouterr().err


def test_help_lists_all_and_force(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    text = capsys.readouterr().out
    assert "all        every study above" in text and "--force" in text and "OUT/<study>/runs/" in text


def test_a_real_study_end_to_end(monkeypatch, tmp_path):
    """palimpsa on a few-step setting (seconds): its real results.json, claims and plots reach both
    reports, and the second run reuses it without touching its files."""
    from routemem import experiments
    from routemem.experiments.palimpsa import protocol as palimpsa

    tiny = replace(palimpsa.QUICK, mixers=("attention", "gla"), d_model=16, n_head=2, vocab_size=64,
                   train_tasks=((16, 2, 0), (16, 3, 2)), steps=3, batch_size=4, lrs=(1e-3,), seeds=(0, 1),
                   test_grid=((16, 2), (32, 4)), overwrite_test=(16, 3, 2), n_val=4, n_test=6, warmup_steps=1)
    monkeypatch.setattr(experiments, "STUDIES", {"palimpsa": experiments.STUDIES["palimpsa"]})
    monkeypatch.setattr(palimpsa, "QUICK", tiny)
    out = tmp_path / "all"
    assert reproduce_all(out, "--device", "cpu") == 0
    results = json.loads((out / "palimpsa" / "results.json").read_text())
    report, page = (out / "REPORT.md").read_text(), (out / "report.html").read_text()
    for claim in results["claims"]:
        assert f"**{claim['id']}**" in report and f"| **{claim['verdict']}** |" in report
        assert f"<b>{claim['id']}</b>" in page
    plots = sorted(p.name for p in (out / "palimpsa").glob("*.png"))
    assert plots and all(f"(palimpsa/{name})" in report for name in plots)
    assert page.count('src="data:image/png;base64,') == len(plots)
    assert "missing (this version of routemem has no such study)" in report  # the five others
    stamp = (out / "palimpsa" / "results.json").stat().st_mtime_ns
    assert reproduce_all(out, "--device", "cpu") == 0
    assert (out / "palimpsa" / "results.json").stat().st_mtime_ns == stamp
    assert manifest(out)["invocation"]["reused"] == ["palimpsa"]
