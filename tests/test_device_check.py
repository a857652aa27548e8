"""Tests of scripts/device_check_summary.py, the JSON summary of scripts/device-check.sh: fed a fake
pytest JUnit report, fake bench JSON and the steps file the shell script writes."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
spec = importlib.util.spec_from_file_location("device_check_summary", SCRIPTS / "device_check_summary.py")
summary_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summary_module)

ENV = {"torch": "2.11.0+cu130", "cuda": "13.0", "cuda_available": True, "gpu": "NVIDIA H100 80GB HBM3",
       "git_commit": "abc123"}

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5">
  <testcase classname="tests.test_ops_gla" name="test_chunk_matches_reference[-0.1-True-16-1-cuda]" time="0.1"/>
  <testcase classname="tests.test_ops_gla" name="test_gradcheck_float64[cuda-chunk]" time="0.2"/>
  <testcase classname="tests.test_models" name="test_causality[cuda-none-gla]" time="0.1">
    <failure message="AssertionError: position &lt; 5 saw token 5">trace</failure></testcase>
  <testcase classname="tests.test_layers.TestAttention" name="test_step[cuda]" time="0.0">
    <error message="fixture failed">trace</error></testcase>
  <testcase classname="tests.test_ops_apn" name="test_on_cuda_auto_is_grouped_and_fused_refuses[cuda]" time="0">
    <skipped type="pytest.skip" message="no CUDA GPU">skip</skipped></testcase>
</testsuite></testsuites>
"""

CLEAN_JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="2">
  <testcase classname="tests.test_ops_gla" name="test_a[cuda]" time="0.1"/>
  <testcase classname="tests.test_ops_gla" name="test_b[cuda]" time="0.1"/>
</testsuite></testsuites>
"""

TARGETS = [{"name": "speedup", "ratio": 9.1, "threshold": 8.0, "met": True},
           {"name": "gla_ratio", "ratio": 2.5, "threshold": 3.0, "met": True}]


def write_folder(folder: Path, junit: str | None, steps: list[tuple], benches: dict) -> Path:
    """A device-check output folder: steps.tsv, pytest-cuda.xml, bench-<suite>.json or .log."""
    folder.mkdir(exist_ok=True)
    (folder / "steps.tsv").write_text("".join("\t".join(map(str, s)) + "\n" for s in steps))
    if junit is not None:
        (folder / "pytest-cuda.xml").write_text(junit)
    (folder / "nvidia-smi.txt").write_text("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\n")
    for suite, (kind, content) in benches.items():
        if kind == "json":
            (folder / f"bench-{suite}.json").write_text(json.dumps(content))
        (folder / f"bench-{suite}.log").write_text(content if kind == "log" else "{...}\n")
    return folder


STEPS = [("environment", 0, 1.5, 60), ("pytest", 1, 42.25, 240), ("bench-train", 0, 30.0, 70),
         ("bench-palimpsa", 2, 0.4, 70), ("bench-apn", 124, 70.0, 70)]
BENCHES = {
    "train": ("json", {"suite": "train", "env": {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3"},
                       "targets": TARGETS, "all_targets_met": True}),
    "palimpsa": ("log", "loading...\nroutemem: error: unrecognized arguments: --device cuda\n"),
    "apn": ("log", "timing op_grouped\n"),
}


def test_junit_counts_and_failing_ids(tmp_path):
    path = tmp_path / "r.xml"
    path.write_text(JUNIT)
    result = summary_module.parse_junit(path)
    assert (result["passed"], result["failed"], result["errors"], result["skipped"], result["total"]) == (2, 1, 1, 1, 5)
    assert result["failed_ids"] == ["tests/test_models.py::test_causality[cuda-none-gla]"]
    assert result["error_ids"] == ["tests/test_layers.py::TestAttention::test_step[cuda]"]


def test_junit_missing_or_truncated_is_none(tmp_path):
    assert summary_module.parse_junit(tmp_path / "absent.xml") is None
    (tmp_path / "cut.xml").write_text(JUNIT[:200])  # pytest killed while writing it
    assert summary_module.parse_junit(tmp_path / "cut.xml") is None


def test_summary_records_tests_benches_and_steps(tmp_path):
    folder = write_folder(tmp_path / "dc", JUNIT, STEPS, BENCHES)
    summary = summary_module.summarize(folder, env=ENV)
    assert summary["gpu"] == "NVIDIA H100 80GB HBM3" and summary["torch"] == "2.11.0+cu130"
    assert summary["git_commit"] == "abc123" and summary["cuda"] == "13.0"
    assert summary["nvidia_smi"] == ["GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)"]
    tests = summary["pytest"]
    assert (tests["passed"], tests["failed"], tests["errors"], tests["skipped"]) == (2, 1, 1, 1)
    assert tests["failed_ids"] == ["tests/test_models.py::test_causality[cuda-none-gla]"]
    assert tests["rc"] == 1 and tests["seconds"] == 42.25

    train, palimpsa, apn = (summary["benches"][s] for s in ("train", "palimpsa", "apn"))
    assert train["targets"] == TARGETS and train["all_targets_met"] is True and "error" not in train
    assert train["device"] == "cuda" and train["seconds"] == 30.0
    assert palimpsa["all_targets_met"] is None and palimpsa["rc"] == 2
    assert palimpsa["error"] == "routemem: error: unrecognized arguments: --device cuda"  # the log's last line
    assert apn["timed_out"] and apn["error"].startswith("timed out after 70 s")

    assert [s["name"] for s in summary["steps"]] == [s[0] for s in STEPS]
    assert [s["seconds"] for s in summary["steps"]] == [s[2] for s in STEPS]
    assert summary["total_seconds"] == pytest.approx(sum(s[2] for s in STEPS))
    assert summary["tests_failed"] and not summary["ok"]


def test_main_writes_the_json_and_exits_nonzero_on_a_failed_test(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(summary_module, "environment", lambda: dict(ENV))
    folder = write_folder(tmp_path / "dc", JUNIT, STEPS, BENCHES)
    assert summary_module.main([str(folder)]) == 1
    written = json.loads((folder / "device-check.json").read_text())
    assert written["pytest"]["failed"] == 1 and written["benches"]["train"]["all_targets_met"] is True
    assert "NOT ok" in capsys.readouterr().out


def test_clean_run_exits_zero_even_when_a_target_is_missed(tmp_path, monkeypatch):
    """A missed target is a measurement, not a failure: the verdict is in the JSON."""
    monkeypatch.setattr(summary_module, "environment", lambda: dict(ENV))
    missed = [dict(TARGETS[0], met=False)]
    benches = {s: ("json", {"targets": missed, "all_targets_met": False}) for s in summary_module.SUITES}
    steps = [("environment", 0, 1.0, 60), ("pytest", 0, 20.0, 240)] + [
        (f"bench-{s}", 0, 10.0, 70) for s in summary_module.SUITES]
    folder = write_folder(tmp_path / "dc", CLEAN_JUNIT, steps, benches)
    assert summary_module.main([str(folder)]) == 0
    written = json.loads((folder / "device-check.json").read_text())
    assert written["ok"] and not written["tests_failed"]
    assert all(b["all_targets_met"] is False for b in written["benches"].values())


def test_no_test_report_counts_as_failed(tmp_path):
    steps = [("pytest", 124, 240.0, 240)]
    folder = write_folder(tmp_path / "dc", None, steps, {})
    (folder / "pytest-cuda.log").write_text("....\nsome test output\n")
    summary = summary_module.summarize(folder, suites=(), env=ENV)
    assert summary["tests_failed"] and not summary["ok"]
    assert summary["pytest"]["timed_out"]
    assert summary["pytest"]["error"] == "no test report (pytest-cuda.xml): some test output"


def test_summary_knows_every_bench_suite():
    """The summary's default list is the suites routemem ships (the shell script asks routemem)."""
    from routemem.bench import SUITES

    assert tuple(summary_module.SUITES) == tuple(SUITES)
