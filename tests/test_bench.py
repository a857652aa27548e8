"""The benchmark suites: one JSON shape for all (docs/benchmarks.md), targets consistent with their
rows, the device option, and the suite-specific facts each suite reports. No timing assertions here:
budgets are judged by the benchmarks themselves. Sizes are tiny so the whole file stays fast."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from routemem.bench import SUITES, run_suite
from routemem.bench import apn as apn_bench
from routemem.bench import fast_slow as fast_slow_bench
from routemem.bench import palimpsa as palimpsa_bench
from routemem.bench import train as train_bench
from routemem.bench import vit as vit_bench
from routemem.bench.common import all_met, median_seconds, row, target
from routemem.cli import main

TOP_KEYS = {"suite", "env", "quick", "rows", "targets", "all_targets_met", "info"}
MEASUREMENT_KEYS = {"median_s", "runs_s", "memory_bytes", "memory_measure", "skipped"}
TARGET_KEYS = {"name", "what", "numerator", "denominator", "ratio", "threshold", "comparison", "met"}


@pytest.fixture
def tiny_palimpsa(monkeypatch):
    monkeypatch.setattr(palimpsa_bench, "SHAPE", {"B": 1, "H": 2, "Dk": 8, "Dv": 8})
    monkeypatch.setattr(palimpsa_bench, "LENGTHS", {"quick": (16, 64, 256), "full": (), "full_cuda": ()})
    monkeypatch.setattr(palimpsa_bench, "TARGET_T", 64)
    monkeypatch.setattr(palimpsa_bench, "REFERENCE_MAX_T", 64)


@pytest.fixture
def tiny_apn(monkeypatch):
    for name, value in {"TOKENS": 256, "D": 16, "K": 8, "R": 4, "TOP_K": 2}.items():
        monkeypatch.setattr(apn_bench, name, value)


@pytest.fixture
def tiny_fast_slow(monkeypatch):
    # two block sizes and a target length that a quick run does not measure (128)
    monkeypatch.setattr(fast_slow_bench, "SHAPE", {"B": 1, "d_model": 16, "n_head": 2})
    monkeypatch.setattr(fast_slow_bench, "LENGTHS", {"quick": (32, 64), "full": (), "full_cuda": ()})
    monkeypatch.setattr(fast_slow_bench, "BLOCKS", {"quick": (4, 16), "full": ()})
    monkeypatch.setattr(fast_slow_bench, "TARGET_LENGTHS", (64, 128))


@pytest.fixture
def tiny_train(monkeypatch):
    tiny = json.loads(json.dumps(train_bench.BENCH_CONFIG))
    tiny["model"] = {"n_layer": 1, "d_model": 16, "n_head": 2, "max_seq_len": 16}
    tiny["train"]["batch_size"] = 4
    monkeypatch.setattr(train_bench, "BENCH_CONFIG", tiny)
    monkeypatch.setattr(train_bench, "ROUNDS", {"quick": (3, 3), "full": (), "quick_cuda": (), "full_cuda": ()})
    # no compiled-vs-eager pairs here (a compile is seconds): tests/test_compile_config.py times one
    monkeypatch.setattr(train_bench, "COMPILED_MECHANISMS", {})


@pytest.fixture
def tiny_vit(monkeypatch):
    # 8x8 images in 4 patches: 5 tokens, so L2P's 25 prompt tokens make 30 (a factor of 6)
    monkeypatch.setattr(vit_bench, "SHAPE", {"B": 4, "image_size": 8, "patch": 4, "in_chans": 1, "d_model": 16,
                                             "n_layer": 2, "n_head": 2})
    monkeypatch.setattr(vit_bench, "N_CLASSES", 5)
    monkeypatch.setattr(vit_bench, "CODA_TASKS", 2)


def check_shape(result: dict, suite: str, out=None) -> dict:
    """Every field docs/benchmarks.md promises, and targets that follow from their rows.
    Returns the rows by ``row_key``."""
    assert set(result) == TOP_KEYS
    assert result["suite"] == suite and result["quick"] is True
    assert {"device", "cpu", "gpu", "torch", "cuda", "git_commit", "threads"} <= set(result["env"])
    assert result["env"]["device"] == "cpu"
    if out is not None:  # the file holds exactly what was printed
        assert json.loads(out.read_text()) == json.loads(json.dumps(result))

    by_name = {}
    for r in result["rows"]:
        assert r["direction"] in ("fwd", "fwd+bwd")
        assert {"median_s", "runs_s", "memory_bytes", "memory_measure"} <= set(r)
        if "skipped" in r:
            assert isinstance(r["skipped"], str) and r["skipped"]
            assert r["median_s"] is None and r["runs_s"] == [] and r["memory_bytes"] is None
        else:
            assert r["runs_s"] and min(r["runs_s"]) > 0
            assert r["median_s"] == statistics.median(r["runs_s"])
            assert (r["memory_bytes"] is None) == (r["memory_measure"] is None)
            assert r["memory_measure"] in (None, "saved_for_backward")  # on a CPU
        names = tuple(sorted((k, v) for k, v in r.items() if k not in MEASUREMENT_KEYS))
        assert names not in by_name, f"two rows measure the same thing: {names}"  # flat, diffable rows
        by_name[names] = r

    assert result["targets"]
    for t in result["targets"]:
        assert TARGET_KEYS <= set(t) and t["comparison"] in ("<=", ">=") and t["what"]
        if t["met"] is None:
            assert t["ratio"] is None and t["skipped"]
            continue
        num, den = ([r for r in result["rows"] if all(r.get(k) == v for k, v in t[part].items())]
                    for part in ("numerator", "denominator"))
        assert len(num) == len(den) == 1, t["name"]  # a selector names exactly one row
        assert t["ratio"] == num[0]["median_s"] / den[0]["median_s"]
        assert t["met"] == (t["ratio"] <= t["threshold"] if t["comparison"] == "<=" else t["ratio"] >= t["threshold"])
    judged = [t["met"] for t in result["targets"] if t["met"] is not None]
    assert result["all_targets_met"] == (all(judged) if judged else None)
    return {row_key(r): r for r in by_name.values()}


def row_key(r: dict) -> str:
    """op/mode/direction, then T (palimpsa, fast-slow), P (fast-slow) or routing (apn) where the row
    has one: a test's handle."""
    parts = [r["op"], r["mode"], r["direction"]] + [r[f] for f in ("T", "P", "routing") if r.get(f) is not None]
    return "/".join(str(p) for p in parts)


def test_train_suite_shape_and_ratio_against_plain_loop(tmp_path, tiny_train):
    out = tmp_path / "bench.json"
    result = run_suite("train", quick=True, out=str(out), device="cpu")
    rows = check_shape(result, "train", out)
    plain, trainer = rows["train_step/plain/fwd+bwd"], rows["train_step/trainer/fwd+bwd"]
    assert len(plain["runs_s"]) == len(trainer["runs_s"]) == 3
    (overhead,) = result["targets"]
    assert overhead["threshold"] == 0.9 and overhead["comparison"] == ">="  # overhead <= 10%
    assert overhead["ratio"] == plain["median_s"] / trainer["median_s"]
    assert result["info"]["config"]["train"]["device"] == "cpu"


def test_palimpsa_suite_shape_targets_and_memory(tmp_path, tiny_palimpsa):
    out = tmp_path / "b.json"
    result = run_suite("palimpsa", quick=True, out=str(out), device="cpu")
    rows = check_shape(result, "palimpsa", out)
    assert "palimpsa/reference/fwd+bwd/64" in rows and "skipped" not in rows["palimpsa/reference/fwd+bwd/64"]
    assert "T=64" in rows["palimpsa/reference/fwd+bwd/256"]["skipped"]  # past REFERENCE_MAX_T
    assert {"gla/chunk/fwd/256", "sdpa/causal/fwd/256", "gated_delta/chunk/fwd+bwd/16"} <= set(rows)
    targets = {t["name"]: t for t in result["targets"]}
    speedup = targets["palimpsa_chunk_speedup_over_reference"]
    assert (speedup["threshold"], speedup["comparison"]) == (10.0, ">=")
    assert speedup["numerator"] == {"op": "palimpsa", "mode": "reference", "T": 64, "direction": "fwd+bwd"}
    for name in ("palimpsa_chunk_over_gla", "palimpsa_fused_over_gla"):
        assert (targets[name]["threshold"], targets[name]["comparison"]) == (3.0, "<=")
    # plain autograd keeps per-step states, which grow with T; the recomputing backward must not
    # keep more than plain autograd does
    autograd = {T: rows[f"palimpsa/chunk_autograd/fwd+bwd/{T}"]["memory_bytes"] for T in (16, 256)}
    assert autograd[256] > 3 * autograd[16]
    assert rows["palimpsa/chunk/fwd+bwd/256"]["memory_bytes"] < autograd[256]
    if palimpsa_bench.fused.available():  # the compiled kernel is judged against GLA too
        assert targets["palimpsa_fused_over_gla"]["met"] is not None


def test_apn_suite_shape_targets_params_and_routing(tmp_path, tiny_apn):
    out = tmp_path / "b.json"
    result = run_suite("apn", quick=True, out=str(out), device="cpu")
    rows = check_shape(result, "apn", out)
    expected = {"apn_layer/grouped", "apn_layer/reference", "apn_layer/fused", "apn_layer/grouped_mm",
                "dense_ffn/same_params", "dense_ffn/4d_hidden", "patch_mixture/grouped", "patch_mixture/reference",
                "patch_mixture/fused", "patch_mixture/grouped_mm"}
    assert {"/".join(name.split("/")[:2]) for name in rows} == expected
    assert ("skipped" in rows["patch_mixture/fused/fwd/near_uniform"]) != apn_bench.fused.available()
    targets = {t["name"]: t for t in result["targets"]}
    for mode in ("grouped", "fused", "grouped_mm"):
        for tag in ("fwd", "fwd_bwd"):
            speedup = targets[f"patch_mixture_{mode}_speedup_over_reference_{tag}"]
            dense = targets[f"apn_layer_{mode}_over_dense_{tag}"]
            assert (speedup["threshold"], speedup["comparison"]) == (5.0, ">=")
            assert (dense["threshold"], dense["comparison"]) == (1.5, "<=")
            assert dense["denominator"]["mode"] == "same_params"
    info = result["info"]
    assert info["max_abs_diff_grouped_vs_reference"] < 1e-5  # the layer in both modes: one function
    assert info["max_abs_diff_grouped_mm_vs_reference"] < 1e-5
    # grouped_mm's time over grouped's and fused's, for each of its 6 rows; None only where fused is skipped
    ratios = info["grouped_mm_ratios"]
    assert len(ratios) == 12 and info["setup"]["compile"] is False
    for name, ratio in ratios.items():  # "op/routing/direction: grouped_mm/other"
        (op, routing, direction), other = name.split(": ")[0].split("/", 2), name.split("/")[-1]
        mine, base = rows[f"{op}/grouped_mm/{direction}/{routing}"], rows[f"{op}/{other}/{direction}/{routing}"]
        assert (ratio is None) == ("skipped" in base), name
        if ratio is not None:
            assert ratio == mine["median_s"] / base["median_s"], name
    # parameter counts: K d prototypes + d r code + K d r up + 2 K r gate = 768 here; the dense
    # baseline's hidden is sized to match (2 d h weights)
    params = info["params"]
    assert params["apn_total"] == 8 * 16 + 16 * 4 + 8 * 16 * 4 + 2 * 8 * 4
    assert params["dense_same_params_total"] == 2 * 16 * params["dense_same_params_hidden"]
    assert abs(params["dense_same_params_total"] - params["apn_total"]) <= 16
    assert params["dense_4d_total"] == 2 * 16 * 64
    assert params["apn_active_per_token"] < params["apn_total"]
    routing = info["routing"]
    assert routing["assignments"] == 256 * 2 and routing["max_load"] >= 64
    assert routing["buffer_rows"] % routing["tile_rows"] == 0 and routing["buffer_rows"] >= routing["assignments"]
    skewed = torch.bincount(apn_bench.skewed_indices(torch.device("cpu")).flatten(), minlength=8)
    assert skewed.max() / skewed.float().mean() > 1.5 and skewed.sum() == 256 * 2


def test_fast_slow_suite_shape_targets_memory_and_params(tmp_path, tiny_fast_slow):
    out = tmp_path / "b.json"
    result = run_suite("fast-slow", quick=True, out=str(out), device="cpu")
    rows = check_shape(result, "fast-slow", out)
    expected = {f"{name}/{d}/{T}{block}" for d in ("fwd", "fwd+bwd") for T in (32, 64)
                for name, block in (("attention/causal", ""), ("fast_slow/coupled", "/4"), ("fast_slow/coupled", "/16"))}
    assert set(rows) == expected and len(result["rows"]) == 12
    for r in rows.values():
        assert r["B"] == 1 and r["d_model"] == 16 and r["n_head"] == 2
        assert (r["P"] is None) == (r["op"] == "attention")
    # the slow path keeps its own activations for backward, on top of the fast path's
    for T in (32, 64):
        attention = rows[f"attention/causal/fwd+bwd/{T}"]["memory_bytes"]
        assert rows[f"fast_slow/coupled/fwd+bwd/{T}/4"]["memory_bytes"] > attention > 0
        assert rows[f"fast_slow/coupled/fwd/{T}/4"]["memory_bytes"] is None  # nothing saved under no_grad
    targets = {t["name"]: t for t in result["targets"]}
    assert set(targets) == {f"fast_slow_P16_over_attention_T{T}_{tag}" for T in (64, 128) for tag in ("fwd", "fwd_bwd")}
    for t in targets.values():
        assert (t["threshold"], t["comparison"]) == (1.1, "<=")
        assert t["numerator"]["op"] == "fast_slow" and t["numerator"]["P"] == 16
        assert t["denominator"]["op"] == "attention" and t["denominator"]["T"] == t["numerator"]["T"]
    assert targets["fast_slow_P16_over_attention_T64_fwd_bwd"]["met"] is not None
    assert targets["fast_slow_P16_over_attention_T128_fwd"]["met"] is None  # T=128 not measured
    info = result["info"]
    assert info["setup"]["gate_value"] == fast_slow_bench.GATE_OPEN != 0
    # attention: 4 d^2; fast_slow adds the slow qkv and out (4 d^2), phi (8 d^2) and a d-vector gate
    assert info["params"] == {"attention": 4 * 16 * 16, "fast_slow_P4": 16 * 16 * 16 + 16,
                              "fast_slow_P16": 16 * 16 * 16 + 16}


def test_fast_slow_suite_times_the_layer_with_its_gate_open(tiny_fast_slow):
    # same seed, so the fast path equals the attention mixer: the difference is the gated slow
    # path, zero before the first block completes and non-zero after it
    modules = fast_slow_bench._build(32, (4,), torch.device("cpu"))
    layer, attention = modules["fast_slow", 4], modules["attention", None]
    assert torch.all(layer.gate == fast_slow_bench.GATE_OPEN)
    x = fast_slow_bench.make_input(32, torch.device("cpu"))
    with torch.no_grad():
        slow = layer(x) - attention(x)
    assert torch.all(slow[:, :3] == 0) and slow[:, 3:].abs().amax(dim=-1).min() > 0


def test_fused_forms_that_cannot_run_are_skipped_rows_and_unjudged_targets(tmp_path, tiny_apn, monkeypatch):
    # what a GPU (or a machine without a C++ compiler) sees: the fused rows skipped with a reason,
    # their targets reported with met=None, not as failed, and left out of all_targets_met
    monkeypatch.setattr(apn_bench.fused, "available", lambda: False)
    result = run_suite("apn", quick=True, device="cpu")
    check_shape(result, "apn")
    fused_rows = [r for r in result["rows"] if r["mode"] == "fused"]
    assert len(fused_rows) == 6 and all("C++" in r["skipped"] for r in fused_rows)
    fused_targets = [t for t in result["targets"] if "fused" in t["name"]]
    assert len(fused_targets) == 4
    assert all(t["met"] is None and t["ratio"] is None and "C++" in t["skipped"] for t in fused_targets)
    assert result["all_targets_met"] == all(t["met"] for t in result["targets"] if "fused" not in t["name"])


def test_apn_compile_wraps_every_form_and_skips_one_that_does_not_compile(tiny_apn, monkeypatch):
    # torch.compile itself is too slow for this file: a stand-in that "compiles" every form and
    # fails to for the fused op, as a graph break would. That row is skipped with the error; the
    # others are timed through the wrapper.
    wrapped, compiling = [], []

    def fake_compile(fn, enabled):
        if not enabled:
            return fn

        def compiled(x):
            compiling.append(True)
            try:
                return fn(x)
            finally:
                compiling.pop()
        wrapped.append(fn)
        return compiled

    def patch_mixture(*args, mode):
        if compiling and mode == "fused":
            raise RuntimeError("graph break in the fused op\nsecond line")
        return real_patch_mixture(*args, mode=mode)

    real_patch_mixture = apn_bench.patch_mixture
    monkeypatch.setattr(apn_bench, "maybe_compile", fake_compile)
    monkeypatch.setattr(apn_bench, "patch_mixture", patch_mixture)
    result = apn_bench.run(quick=True, device="cpu", compile=True)
    assert result["info"]["setup"]["compile"] is True
    assert len(wrapped) == len(result["rows"]) // 2  # every form, fwd and fwd+bwd rows each
    rows = {row_key(r): r for r in result["rows"]}
    if apn_bench.fused.available():
        for routing in ("near_uniform", "skewed"):
            reason = rows[f"patch_mixture/fused/fwd+bwd/{routing}"]["skipped"]
            assert reason == "torch.compile(fullgraph=True) failed: RuntimeError: graph break in the fused op"
        assert "skipped" not in rows["apn_layer/fused/fwd/near_uniform"]
    assert all("skipped" not in r for r in result["rows"] if r["mode"] != "fused")
    wrapped.clear()
    apn_bench.run(quick=True, device="cpu")
    assert wrapped == []  # compile=False, the default: nothing wrapped


@pytest.mark.parametrize("ratio, comparison, met", [(2.0, "<=", True), (3.0, "<=", True), (3.5, "<=", False),
                                                    (3.0, ">=", True), (2.0, ">=", False)])
def test_target_judges_ratio_against_threshold(ratio, comparison, met):
    rows = [row({"op": "a"}, "fwd", [ratio]), row({"op": "b"}, "fwd", [1.0])]
    judged = target(rows, "t", "a over b", {"op": "a"}, {"op": "b"}, 3.0, comparison)
    assert judged["ratio"] == ratio and judged["met"] is met and "skipped" not in judged
    assert all_met([judged]) is met


def test_all_targets_met_ignores_skipped_and_is_none_when_nothing_was_judged():
    rows = [row({"op": "a"}, "fwd", [1.0]), row({"op": "b"}, "fwd", skipped="not on this device")]
    skipped = target(rows, "s", "b over a", {"op": "b"}, {"op": "a"}, 1.0, "<=")
    missing = target(rows, "m", "c over a", {"op": "c"}, {"op": "a"}, 1.0, "<=")
    assert skipped["met"] is None and "not on this device" in skipped["skipped"]
    assert missing["met"] is None and "no such row" in missing["skipped"]
    assert all_met([skipped, missing]) is None
    met = target(rows, "ok", "a over a", {"op": "a"}, {"op": "a"}, 1.0, "<=")
    assert all_met([skipped, met]) is True


def test_median_seconds_counts_calls_and_reports_the_median():
    calls = []
    result = median_seconds(lambda: calls.append(1), repeats=5, warmup=2, device="cpu")
    assert len(calls) == 7 and len(result["runs_s"]) == 5
    assert sorted(result["runs_s"])[2] == result["median_s"]


def one_line_error(capsys, *argv) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("routemem: error: "), err
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_bench_on_cuda_without_a_gpu_is_a_one_line_error(capsys, tmp_path):
    assert "cuda" in one_line_error(capsys, "bench", "apn", "--device", "cuda", "--out", str(tmp_path / "b.json"))
    assert not (tmp_path / "b.json").exists()


def test_bench_refuses_unknown_suite_device_and_a_folder_as_out(capsys, tmp_path):
    assert "nonesuch" in one_line_error(capsys, "bench", "nonesuch")
    assert "gpu" in one_line_error(capsys, "bench", "apn", "--device", "gpu")
    assert "folder" in one_line_error(capsys, "bench", "apn", "--out", str(tmp_path))


def test_bench_cli_runs_a_suite_whose_name_has_a_dash(capsys, tmp_path, tiny_fast_slow):
    assert main(["bench", "fast-slow", "--quick", "--device", "cpu", "--out", str(tmp_path / "b.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["suite"] == "fast-slow" and printed == json.loads((tmp_path / "b.json").read_text())


def test_bench_help_lists_every_suite_with_what_it_measures(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for name, what in SUITES.items():
        assert any(line.split() == [name, *what.split()] for line in out.splitlines()), name
    assert "--device" in out and "docs/benchmarks.md" in out


def test_interleaved_runs_take_turns_and_keep_every_timed_call():
    from routemem.bench.common import interleaved_runs

    calls = []
    timers = {"a": (lambda: calls.append("a"), 2), "b": (lambda: calls.append("b"), 1)}
    runs = interleaved_runs(timers, rounds=2, warmup=1)
    assert calls == ["a", "a", "a", "b", "b", "a", "a", "a", "b", "b"]  # warm-up, then the repeats, in turn
    assert [len(runs["a"]), len(runs["b"])] == [4, 2] and all(t >= 0 for t in runs["a"] + runs["b"])


def test_vit_suite_shape_targets_sequences_and_images_per_s(tmp_path, tiny_vit):
    from routemem.train.trainer import bf16_supported

    out = tmp_path / "b.json"
    result = run_suite("vit", quick=True, out=str(out), device="cpu")
    rows = check_shape(result, "vit", out)
    assert set(rows) == {f"vit/{mode}/{d}" for mode in vit_bench.MODES for d in ("fwd", "fwd+bwd")}
    precision = "bf16" if bf16_supported(torch.device("cpu")) else "fp32"
    assert all(r["precision"] == precision and r["B"] == 4 and r["d_model"] == 16 for r in rows.values())
    info = result["info"]
    # L2P keeps its 25 tokens through every block; the prefix methods add keys only, at block 0
    # (both DualPrompt's general and expert layers map to block 0 of 2: their prefixes concatenate)
    assert info["sequence"]["plain"] == {"queries": [5, 5], "keys": [5, 5]}
    assert info["sequence"]["l2p"] == {"queries": [30, 30], "keys": [30, 30]}
    assert info["sequence"]["dualprompt"] == {"queries": [5, 5], "keys": [15, 5]}
    assert info["sequence"]["coda"] == {"queries": [5, 5], "keys": [9, 5]}  # length 8: 4 keys, 4 values
    assert info["token_factor"] == {"plain": 1.0, "l2p": 6.0, "dualprompt": 1.0, "coda": 1.0}
    targets = {t["name"]: t for t in result["targets"]}
    assert set(targets) == {"l2p_over_plain_fwd_bwd", "dualprompt_over_plain_fwd_bwd", "coda_over_plain_fwd_bwd"}
    assert targets["l2p_over_plain_fwd_bwd"]["threshold"] == 1.25 * 6
    assert targets["coda_over_plain_fwd_bwd"]["threshold"] == 1.25
    for t in targets.values():
        assert t["comparison"] == "<=" and t["met"] is not None
        assert t["denominator"] == {"op": "vit", "mode": "plain", "direction": "fwd+bwd"}
    for mode in vit_bench.MODES:
        for d in ("fwd", "fwd+bwd"):
            assert info["images_per_s"][mode][d] == 4 / rows[f"vit/{mode}/{d}"]["median_s"]
            if mode != "plain":
                assert info["ratio_vs_plain"][mode][d] == info["images_per_s"][mode][d] / info["images_per_s"]["plain"][d]
    # 25 more tokens in every block: more activations kept for backward; nothing kept under no_grad
    assert rows["vit/l2p/fwd+bwd"]["memory_bytes"] > 2 * rows["vit/plain/fwd+bwd"]["memory_bytes"] > 0
    assert rows["vit/l2p/fwd"]["memory_bytes"] is None
    assert info["prompt_params"]["l2p"] == 10 * 5 * 16 + 10 * 16  # pool x length x D prompts, pool x D keys


def test_vit_suite_times_prompts_that_reach_the_loss(tiny_vit):
    """Each prompted call builds its prompts from the query inside the timed step and they change the
    output: the backward reaches the prompt parameters."""
    vit, modules = vit_bench.build(torch.device("cpu"))
    inputs = vit_bench.make_inputs(torch.device("cpu"))
    plain = vit_bench.step_fn(vit, None, inputs, bf16=False)()
    for mode in ("l2p", "dualprompt", "coda"):
        module = modules[mode]
        loss = vit_bench.step_fn(vit, module, inputs, bf16=False)()
        assert not torch.allclose(loss, plain), mode
        loss.backward()
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), mode
        module.zero_grad(set_to_none=True)


def test_bench_cli_runs_the_vit_suite(capsys, tmp_path, tiny_vit):
    assert main(["bench", "vit", "--quick", "--device", "cpu", "--out", str(tmp_path / "b.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["suite"] == "vit" and printed == json.loads((tmp_path / "b.json").read_text())
