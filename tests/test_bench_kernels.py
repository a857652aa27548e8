"""The GPU kernels suite (routemem bench kernels): on a CPU every row is skipped with the reason and
no target is judged; fla's rows say why when fla is missing. Its timings run on a GPU only."""

import pytest

from routemem.bench import kernels, run_suite


def test_on_a_cpu_nothing_is_timed_and_nothing_judged():
    result = run_suite("kernels", quick=True, device="cpu")
    assert result["rows"] and all(r["skipped"] == kernels.ON_CPU for r in result["rows"])
    assert {(r["T"], r["D"]) for r in result["rows"]} == set(kernels.SHAPES["quick"])
    assert all(t["met"] is None and t["skipped"] for t in result["targets"])
    assert result["all_targets_met"] is None


def test_fla_rows_say_why_when_fla_is_missing(monkeypatch):
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: None)
    variants = {(op, mode): skip for op, mode, _, skip in kernels._variants()}
    assert "not installed" in variants[("fla_gla", "chunk")]
    assert "triton is not installed" == variants[("palimpsa", "triton")]


@pytest.mark.parametrize("name", ["triton_speedup_over_chunk_T4096", "triton_over_fla_gla_T4096",
                                  "triton_over_fla_gla_T16384"])
def test_the_targets_compare_the_named_rows(name):
    rows = [{"op": op, "mode": mode, "T": T, "D": 64, "direction": "fwd+bwd", "median_s": s}
            for op, mode, T, s in [("palimpsa", "triton", 4096, 1.0), ("palimpsa", "chunk", 4096, 12.0),
                                   ("fla_gla", "chunk", 4096, 0.5), ("palimpsa", "triton", 16384, 4.0),
                                   ("fla_gla", "chunk", 16384, 0.5)]]
    judged = {t["name"]: t for t in kernels._targets(rows)}[name]
    expected = {"triton_speedup_over_chunk_T4096": (12.0, True), "triton_over_fla_gla_T4096": (2.0, True),
                "triton_over_fla_gla_T16384": (8.0, False)}[name]
    assert (judged["ratio"], judged["met"]) == expected
