"""The sparse suite (routemem/bench/sparse.py): token and block top-k rows beside dense SDPA, their
targets, the gate's share of the hard path, the block selection's coverage and the crossover, and
that each timed call computes its own gate. Sizes are tiny; no timing assertions."""

from __future__ import annotations

import json

import pytest
import torch
from test_bench import check_shape  # the JSON shape every suite shares

from routemem.bench import run_suite
from routemem.bench import sparse as sparse_bench
from routemem.cli import main


@pytest.fixture
def tiny_sparse(monkeypatch):
    # two lengths and a target length that a quick run does not measure (128)
    monkeypatch.setattr(sparse_bench, "SHAPE", {"B": 1, "H": 2, "D": 8, "rank": 4})
    monkeypatch.setattr(sparse_bench, "LENGTHS", {"quick": (32, 64), "full": ()})
    monkeypatch.setattr(sparse_bench, "TARGET_LENGTHS", (64, 128))
    monkeypatch.setattr(sparse_bench, "BLOCK_SIZE", 8)
    monkeypatch.setattr(sparse_bench, "BLOCK_LENGTHS", {"quick": (64, 96), "full": ()})
    monkeypatch.setattr(sparse_bench, "BLOCK_TARGET_LENGTHS", (96, 160))



def test_sparse_suite_shape_targets_memory_and_gate_share(tmp_path, tiny_sparse):
    out = tmp_path / "b.json"
    result = run_suite("sparse", quick=True, out=str(out), device="cpu")
    rows = check_shape(result, "sparse", out)
    expected = {f"{name}/{d}/{T}" for T in (32, 64) for name, d in (
        ("attention/dense_sdpa", "fwd"), ("attention/dense_sdpa", "fwd+bwd"), ("attention/hard_topk", "fwd"),
        ("attention/hard_topk", "fwd+bwd"), ("gate_scores/bilinear", "fwd"), ("gate_select/scores+topk", "fwd"))}
    expected |= {f"attention/dense_sdpa/{d}/96" for d in ("fwd", "fwd+bwd")}
    expected |= {f"attention/block_topk/{d}/{T}" for T in (64, 96) for d in ("fwd", "fwd+bwd")}
    expected |= {f"attention/block_topk_flex/fwd/{T}" for T in (64, 96)}
    assert set(rows) == expected and len(result["rows"]) == len(expected)
    for r in rows.values():
        assert (r["B"], r["H"], r["D"], r["rank"], r["top_k"]) == (1, 2, 8, 4, r["T"] // 8)
        if "block" in r["mode"]:
            assert (r["block_size"], r["top_k_blocks"]) == (8, sparse_bench.top_k_blocks(r["T"], 8))
    # the block selection covers at most 1/8 of the causal keys (top_k_blocks >= 1 allowing)
    assert all(f <= 1 / 8 or sparse_bench.top_k_blocks(int(T[1:]), 8) == 1
               for T, f in result["info"]["block_kept_fraction"].items())
    crossover = result["info"]["block_crossover_T"]["fwd+bwd"]
    assert set(crossover["block_over_dense"]) == {"T64", "T96"}
    for T in (32, 64):
        # the gather keeps k rows of K and V per query for backward; SDPA keeps O(T) per head
        assert rows[f"attention/hard_topk/fwd+bwd/{T}"]["memory_bytes"] > rows[f"attention/dense_sdpa/fwd+bwd/{T}"]["memory_bytes"] > 0
        assert rows[f"attention/hard_topk/fwd/{T}"]["memory_bytes"] is None  # nothing saved under no_grad
    targets = {t["name"]: t for t in result["targets"]}
    block_targets = {"block_topk_over_dense_sdpa_T96_fwd_bwd", "block_topk_over_dense_sdpa_T160_fwd_bwd"}
    assert set(targets) == {"hard_topk_over_dense_sdpa_T64_fwd", "hard_topk_over_dense_sdpa_T128_fwd"} | block_targets
    assert targets["block_topk_over_dense_sdpa_T96_fwd_bwd"]["met"] is not None
    assert targets["block_topk_over_dense_sdpa_T160_fwd_bwd"]["met"] is None  # not measured
    for name in block_targets:
        assert (targets[name]["threshold"], targets[name]["numerator"]["mode"]) == (0.5, "block_topk")
        assert targets[name]["numerator"]["direction"] == targets[name]["denominator"]["direction"] == "fwd+bwd"
        del targets[name]
    for t in targets.values():
        assert (t["threshold"], t["comparison"]) == (1.0, "<=")
        assert t["numerator"]["mode"] == "hard_topk" and t["denominator"]["mode"] == "dense_sdpa"
        assert t["numerator"]["direction"] == t["denominator"]["direction"] == "fwd"
    assert targets["hard_topk_over_dense_sdpa_T64_fwd"]["met"] is not None
    assert targets["hard_topk_over_dense_sdpa_T128_fwd"]["met"] is None  # T=128 not measured
    # the gate's shares of the hard path's forward time, from the rows themselves
    share = result["info"]["gate_share"]["T64"]
    hard = rows["attention/hard_topk/fwd/64"]["median_s"]
    assert share["gate_select_over_hard_fwd"] == rows["gate_select/scores+topk/fwd/64"]["median_s"] / hard
    assert share["gate_scores_over_hard_fwd"] == rows["gate_scores/bilinear/fwd/64"]["median_s"] / hard
    assert share["hard_over_dense_fwd"] == hard / rows["attention/dense_sdpa/fwd/64"]["median_s"]
    assert set(result["info"]["gate_share"]) == {"T32", "T64"}


def test_sparse_suite_times_the_gate_inside_the_hard_path(tiny_sparse):
    """The timed hard call computes the gate's scores and top-k from gq, gk itself (its cost is in the
    row), and gives what the reference form gives with those scores."""
    from routemem.ops.gated_sparse import gate_scores, gated_attention

    inputs = sparse_bench.make_inputs(32, torch.device("cpu"))
    hard, _ = sparse_bench._variants(32, torch.device("cpu"), "quick")[sparse_bench.HARD]
    out = hard(**inputs)
    reference = gated_attention(inputs["q"], inputs["k"], inputs["v"], gating="hard", top_k=4, mode="reference",
                                gate_scores=gate_scores(inputs["gq"], inputs["gk"]))
    torch.testing.assert_close(out, reference)
    assert not torch.allclose(hard(**{**inputs, "gq": -inputs["gq"]}), out)  # the gate's input matters


def test_sparse_suite_times_the_block_gate_inside_the_block_path(tiny_sparse):
    """The timed block call computes the block scores and the selection from gq, gk itself, and gives
    the reference form's output for those scores; the flex row gives the same."""
    from routemem.ops.gated_sparse.block import block_routed_attention
    from routemem.ops.gated_sparse.block_select import block_scores

    inputs = sparse_bench.make_inputs(64, torch.device("cpu"))
    variants = sparse_bench._variants(64, torch.device("cpu"), "quick")
    with torch.no_grad():
        out = variants[sparse_bench.BLOCK][0](**inputs)
        flex = variants[sparse_bench.BLOCK_FLEX][0](**inputs)
        scores = block_scores(inputs["gq"], inputs["gk"], 8, 0.5)
        reference = block_routed_attention(inputs["q"], inputs["k"], inputs["v"], scores, block_size=8,
                                           top_k_blocks=sparse_bench.top_k_blocks(64, 8), mode="reference")
        assert not torch.allclose(variants[sparse_bench.BLOCK][0](**{**inputs, "gq": -inputs["gq"]}), out)
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(flex, reference)


def test_bench_cli_runs_the_sparse_suite(capsys, tmp_path, tiny_sparse):
    assert main(["bench", "sparse", "--quick", "--device", "cpu", "--out", str(tmp_path / "b.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["suite"] == "sparse" and printed == json.loads((tmp_path / "b.json").read_text())
