"""The benchmark suites run and report what DESIGN.md asks for (no timing assertions here:
budgets are checked by the benchmarks themselves)."""

from __future__ import annotations

import json

from routemem.bench import run_suite
from routemem.bench import train as train_bench


def test_train_bench_reports_ratio_against_plain_loop(tmp_path, monkeypatch):
    tiny = json.loads(json.dumps(train_bench.BENCH_CONFIG))
    tiny["model"] = {"n_layer": 1, "d_model": 16, "n_head": 2, "max_seq_len": 16}
    tiny["train"]["batch_size"] = 4
    monkeypatch.setattr(train_bench, "BENCH_CONFIG", tiny)
    out = tmp_path / "bench.json"
    result = run_suite("train", quick=True, out=str(out))
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert {"torch", "threads", "cpu", "routemem"} <= set(result["env"])
    plain, trainer = result["plain_tokens_per_s"], result["trainer_tokens_per_s"]
    assert len(plain["runs"]) == len(trainer["runs"]) == result["rounds"]
    assert min(plain["runs"]) > 0 and min(trainer["runs"]) > 0
    assert abs(result["ratio_trainer_over_plain"] - trainer["median"] / plain["median"]) < 1e-12
    assert result["pass"] == (result["overhead"] <= result["target_overhead"])


def test_median_seconds_counts_calls_and_reports_the_median():
    from routemem.bench.common import median_seconds

    calls = []
    result = median_seconds(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7 and len(result["runs_s"]) == 5
    assert sorted(result["runs_s"])[2] == result["median_s"]
