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


def test_palimpsa_bench_reports_speedup_ratio_and_memory(tmp_path, monkeypatch):
    from routemem.bench import palimpsa as palimpsa_bench

    monkeypatch.setattr(palimpsa_bench, "SHAPE", {"B": 1, "H": 2, "Dk": 8, "Dv": 8})
    monkeypatch.setattr(palimpsa_bench, "LENGTHS", {"quick": (16, 64, 256), "full": ()})
    monkeypatch.setattr(palimpsa_bench, "TARGET_T", 64)
    monkeypatch.setattr(palimpsa_bench, "REFERENCE_MAX_T", 64)
    result = run_suite("palimpsa", quick=True, out=str(tmp_path / "b.json"))
    ops = {(r["op"], r["T"]) for r in result["rows"]}
    assert ("palimpsa_reference", 64) in ops and ("palimpsa_reference", 256) not in ops
    assert {"palimpsa_chunk", "gla_chunk", "sdpa_causal", "gated_delta_chunk"} <= {op for op, _ in ops}
    row = {(r["op"], r["T"]): r for r in result["rows"]}
    assert result["speedup_chunk_over_reference_fwd_bwd"] == (
        row["palimpsa_reference", 64]["fwd_bwd_s"] / row["palimpsa_chunk", 64]["fwd_bwd_s"])
    memory = result["saved_for_backward_bytes_palimpsa_chunk"]
    # plain autograd keeps per-step states, which grow with T; the recomputing backward must not
    # keep more than plain autograd does
    assert memory[256]["autograd"] > 3 * memory[16]["autograd"]
    assert memory[256]["recompute"] < memory[256]["autograd"]
    assert result["pass"]["speedup"] == (result["speedup_chunk_over_reference_fwd_bwd"] >= 10.0)
