"""`routemem reproduce` as a user drives it: --device, --jobs (worker processes), --shard (a job
array's share, then one plain run assembles), bad values, --help, and the verdicts it prints."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch
from devices import HAS_CUDA, NO_CUDA
from worker_probe import where_am_i

from routemem.cli import main
from routemem.experiments.palimpsa import protocol as palimpsa
from routemem.experiments.shared.cache import RunCache
from routemem.experiments.shared.runner import (
    Execution,
    Shard,
    Unit,
    run_units,
    share_of,
    threads_per_job,
)

# 4 runs of a few steps each: seconds on a CPU
TINY = replace(
    palimpsa.QUICK, mixers=("attention", "gla"), d_model=16, n_head=2, vocab_size=64,
    train_tasks=((16, 2, 0), (16, 3, 2)), steps=3, batch_size=4, lrs=(1e-3,), seeds=(0, 1),
    test_grid=((16, 2), (32, 4)), overwrite_test=(16, 3, 2), n_val=4, n_test=6, warmup_steps=1,
)


def _without_timing(runs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads(json.dumps(runs))]


@pytest.mark.parametrize("flags, message", [
    (["--jobs", "0"], "--jobs must be a whole number >= 1, got '0'"),
    (["--jobs", "two"], "--jobs must be a whole number >= 1"),
    (["--shard", "3/2"], "--shard must be I/N with 0 <= I < N"),
    (["--shard", "x"], "--shard must be I/N"),
    (["--shard=-1/2"], "--shard must be I/N"),
    (["--jobs", "-1"], "--jobs must be a whole number >= 1"),
    (["--device", "gpu"], "device must be one of auto, cpu, cuda"),
])
def test_bad_values_are_one_line_errors(flags, message, tmp_path, capsys):
    assert main(["reproduce", "palimpsa", "--quick", "--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("routemem: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu_is_a_user_error(tmp_path, capsys):
    assert main(["reproduce", "palimpsa", "--quick", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_help_lists_the_studies(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["reproduce", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "apn " in out and "palimpsa " in out and "--jobs" in out and "--shard" in out


def test_threads_are_split_fairly():
    assert threads_per_job(1, total=8) == 8
    assert threads_per_job(2, total=8) == 4
    assert threads_per_job(3, total=8) == 2
    assert threads_per_job(4, total=2) == 1  # never zero


def test_shards_partition_the_full_run_list_whatever_is_cached(tmp_path):
    units = [Unit(f"u{i}", where_am_i, (f"u{i}",)) for i in range(7)]
    shares = [[u.name for u in share_of(units, Shard(i, 3))] for i in range(3)]
    assert shares == [["u0", "u3", "u6"], ["u1", "u4"], ["u2", "u5"]]
    # a machine that finds u0 and u1 cached (another shard, an earlier try) takes the same share
    cache = RunCache(tmp_path, {"s": 1})
    cache.put("u0", where_am_i("u0"))
    cache.put("u1", where_am_i("u1"))
    outcome = run_units(units, RunCache(tmp_path, {"s": 1}), Execution.make("cpu", 1, "0/3"))
    assert sorted(outcome.records) == ["u0", "u3", "u6"] and outcome.trained == 2 and outcome.reused == 1


@pytest.mark.slow  # spawns worker processes (each imports torch)
def test_workers_get_their_share_of_threads_and_no_step_bars(tmp_path):
    units = [Unit(f"u{i}", where_am_i, (f"u{i}",)) for i in range(4)]
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # only the count matters: 2 workers get 2 threads each
    try:
        outcome = run_units(units, RunCache(tmp_path, {}), Execution.make("cpu", 2))
    finally:
        torch.set_num_threads(threads)
    records = outcome.records
    assert [records[f"u{i}"]["tag"] for i in range(4)] == ["u0", "u1", "u2", "u3"]
    assert {r["pid"] for r in records.values()}.isdisjoint({os.getpid()})
    assert len({r["pid"] for r in records.values()}) <= 2
    assert {r["threads"] for r in records.values()} == {2}
    assert {r["step_bars"] for r in records.values()} == {"0"}


@pytest.mark.slow  # spawns worker processes (each imports torch)
def test_jobs_give_the_same_runs_as_one_process(tmp_path):
    """Bit-identical, not just close: each run seeds everything it draws, and here both invocations
    give each run one CPU thread (tests/conftest.py sets 1; 1 // 2 -> 1). With different thread
    counts float sums may be split differently and the last bits can differ."""
    serial = palimpsa.run(out=tmp_path / "serial", setting=TINY, device="cpu", jobs=1)
    parallel = palimpsa.run(out=tmp_path / "parallel", setting=TINY, device="cpu", jobs=2)
    assert _without_timing(parallel["runs"]) == _without_timing(serial["runs"])
    assert [c["verdict"] for c in parallel["claims"]] == [c["verdict"] for c in serial["claims"]]
    assert parallel["execution"]["jobs"] == 2
    assert parallel["execution"]["trained_on"][0]["runs"] == len(serial["runs"])


def test_shards_then_a_plain_run_assemble_the_study(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(palimpsa, "QUICK", TINY)
    out = str(tmp_path)
    for shard in ("0/2", "1/2"):
        assert main(["reproduce", "palimpsa", "--quick", "--device", "cpu", "--out", out, "--shard", shard]) == 0
        printed = capsys.readouterr().out
        assert f"shard {shard}: trained 2 run(s), 0 already cached" in printed and "no report written" in printed
        assert not (tmp_path / "palimpsa" / "results.json").exists()
    assert len(list((tmp_path / "palimpsa" / "runs").glob("*.json"))) == 4

    alone = palimpsa.run(out=tmp_path / "alone", setting=TINY, device="cpu")  # the same study, unsharded
    trained = []
    monkeypatch.setattr(palimpsa, "train_one", lambda *args: trained.append(args))
    assert main(["reproduce", "palimpsa", "--quick", "--out", out]) == 0
    assert trained == []  # everything came from the shards' runs
    printed = capsys.readouterr().out.splitlines()
    results = json.loads((tmp_path / "palimpsa" / "results.json").read_text())
    assert results["runs_reused"] == 4
    assert printed[-1] == f"report: {tmp_path / 'palimpsa' / 'report.md'}"
    assert len(printed) == len(results["claims"]) + 1
    for line, claim in zip(printed, results["claims"]):
        assert line.startswith(claim["verdict"]) and claim["statement"] in line
    assert _without_timing(results["runs"]) == _without_timing(alone["runs"])


def test_results_record_the_machine(tmp_path):
    results = palimpsa.run(out=tmp_path, setting=replace(TINY, seeds=(0,), mixers=("gla",)), device="cpu")
    env = json.loads((tmp_path / "palimpsa" / "results.json").read_text())["env"]
    assert {"device", "cpu", "gpu", "torch", "cuda", "git_commit"} <= set(env)
    assert env["device"] == "cpu" and env["gpu"] is None
    stored = json.loads(next((tmp_path / "palimpsa" / "runs").glob("*.json")).read_text())
    assert stored["env"]["device"] == "cpu" and stored["env"]["jobs"] == 1
    assert results["execution"]["trained_on"] == [{**results["execution"]["trained_on"][0], "runs": 1}]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_a_study_trains_on_cuda(tmp_path):
    results = palimpsa.run(out=tmp_path, setting=replace(TINY, seeds=(0,)), device="cuda", jobs=2)
    assert results["env"]["device"] == "cuda" and results["env"]["gpu"]
    assert all(0.0 <= r["metrics"]["grid_mean"] <= 1.0 for r in results["runs"])
    cpu = palimpsa.run(out=tmp_path / "cpu", setting=replace(TINY, seeds=(0,)), device="cpu")
    for on_gpu, on_cpu in zip(results["runs"], cpu["runs"]):  # same data and initial weights
        assert on_gpu["final_loss"] == pytest.approx(on_cpu["final_loss"], rel=1e-3)


def test_where_trained_names_the_machines_that_trained_the_runs_when_not_this_one():
    from routemem.experiments.shared.common import where_trained

    here = {"device": "cpu", "cpu": "AMD EPYC", "gpu": None, "threads": 2}
    local = {"env": here, "execution": {"jobs": 1, "trained_on": [{"device": "cpu", "cpu": "AMD EPYC", "runs": 3}]}}
    assert where_trained(local) == "AMD EPYC (cpu, 2 threads)"
    gpu = {"device": "cuda", "cpu": "Xeon", "gpu": "NVIDIA H100 80GB HBM3", "runs": 18}
    assembled = {"env": here, "execution": {"jobs": 1, "trained_on": [gpu]}}
    assert where_trained(assembled).endswith("runs trained on NVIDIA H100 80GB HBM3 (cuda): 18 runs")
    before, after = ({"device": "cpu", "cpu": "AMD EPYC", "git_commit": c * 40, "runs": n} for c, n in (("a", 1), ("b", 19)))
    resumed = {"env": here, "execution": {"jobs": 2, "trained_on": [before, after]}}
    assert where_trained(resumed).endswith(
        "runs trained on AMD EPYC (cpu, commit aaaaaaa): 1 run; AMD EPYC (cpu, commit bbbbbbb): 19 runs")
