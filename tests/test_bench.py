"""The benchmark suites run and report what DESIGN.md asks for (no timing assertions here:
budgets are checked by the benchmarks themselves)."""

from __future__ import annotations

import json

import torch

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
    if palimpsa_bench.fused.available():  # the compiled kernel is timed against GLA too
        assert result["ratio_palimpsa_fused_over_gla_fwd_bwd"] == (
            row["palimpsa_fused", 64]["fwd_bwd_s"] / row["gla_chunk", 64]["fwd_bwd_s"])
        assert result["pass"]["gla_ratio_fused"] == (result["ratio_palimpsa_fused_over_gla_fwd_bwd"] <= 3.0)


def test_apn_bench_reports_ratios_params_and_memory(tmp_path, monkeypatch):
    import math

    from routemem.bench import apn as apn_bench

    for name, value in {"TOKENS": 256, "D": 16, "K": 8, "R": 4, "TOP_K": 2}.items():
        monkeypatch.setattr(apn_bench, name, value)
    result = run_suite("apn", quick=True, out=str(tmp_path / "b.json"))
    assert json.loads((tmp_path / "b.json").read_text()) == json.loads(json.dumps(result))
    variants = result["variants"]
    expected = {"apn_grouped", "apn_reference", "dense_same_params", "dense_4d", "op_grouped", "op_reference",
                "op_grouped_skewed", "op_reference_skewed"}
    if apn_bench.fused.available():  # the compiled kernel is timed beside the grouped form
        expected |= {"apn_fused", "op_fused", "op_fused_skewed"}
    assert expected == set(variants)
    for row in variants.values():
        assert row["fwd_s"] > 0 and row["fwd_bwd_s"] > 0 and row["saved_for_backward_bytes"] > 0
        assert len(row["fwd_runs_s"]) == len(row["fwd_bwd_runs_s"]) >= 1
    # the layer in both modes computes the same function
    assert result["max_abs_diff_grouped_vs_reference"] < 1e-5
    targets = result["targets"]
    for phase in ("fwd", "fwd_bwd"):
        speedup = targets["op_speedup_reference_over_grouped"][phase]
        dense = targets["ratio_grouped_over_dense"][phase]
        for entry in (speedup, dense):
            assert math.isfinite(entry["ratio"]) and entry["ratio"] > 0
        key = f"{phase}_s"
        assert speedup["ratio"] == variants["op_reference"][key] / variants["op_grouped"][key]
        layer = result["informational_ratios"]["layer_speedup_reference_over_grouped"][phase]
        assert layer == variants["apn_reference"][key] / variants["apn_grouped"][key]
        assert dense["ratio"] == variants["apn_grouped"][key] / variants["dense_same_params"][key]
        assert speedup["min"] == 5.0 and speedup["met"] == (speedup["ratio"] >= 5.0)
        assert dense["max"] == 1.5 and dense["met"] == (dense["ratio"] <= 1.5)
    assert result["all_targets_met"] == all(
        entry["met"] for target in targets.values() for entry in target.values())
    if apn_bench.fused.available():
        fused_targets = result["fused_targets"]
        for phase in ("fwd", "fwd_bwd"):
            key = f"{phase}_s"
            entry = fused_targets["op_speedup_reference_over_fused"][phase]
            assert entry["ratio"] == variants["op_reference"][key] / variants["op_fused"][key]
            entry = fused_targets["ratio_fused_over_dense"][phase]
            assert entry["ratio"] == variants["apn_fused"][key] / variants["dense_same_params"][key]
        assert result["fused_targets_met"] == all(
            entry["met"] for target in fused_targets.values() for entry in target.values())
    # parameter counts: K d prototypes + d r code + K d r up + 2 K r gate = 768 here; the dense
    # baseline's hidden is sized to match (2 d h weights)
    params = result["params"]
    assert params["apn_total"] == 8 * 16 + 16 * 4 + 8 * 16 * 4 + 2 * 8 * 4
    assert params["dense_same_params_total"] == 2 * 16 * params["dense_same_params_hidden"]
    assert abs(params["dense_same_params_total"] - params["apn_total"]) <= 16
    assert params["dense_4d_total"] == 2 * 16 * 64
    assert params["apn_active_per_token"] < params["apn_total"]
    routing = result["routing"]
    assert routing["assignments"] == 256 * 2 and routing["max_load"] >= 64
    skewed = torch.bincount(apn_bench.skewed_indices(torch.device("cpu")).flatten(), minlength=8)
    assert skewed.max() / skewed.float().mean() > 1.5 and skewed.sum() == 256 * 2
    assert routing["buffer_rows"] % routing["tile_rows"] == 0 and routing["buffer_rows"] >= routing["assignments"]
