"""torch.compile from the outside (issue 24): ``train.compile`` checked as a config value, the
Trainer compiled (same losses as eager, final.json says so, plain checkpoints, resume), ``bench
--compile`` recorded in ``env`` and the train suite's compiled-vs-eager rows, a suite row that does
not compile skipped with its reason, and ``reproduce --compile`` recorded in results.json with a run
cache that keys on it. Real compiles are few and tiny (seconds each on a CPU); everything else is
checked without compiling."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from routemem.bench import fast_slow as fast_slow_bench
from routemem.bench import run_suite
from routemem.bench import train as train_bench
from routemem.cli import main
from routemem.config import apply_overrides, from_dict
from routemem.errors import ConfigError, UserError
from routemem.experiments.palimpsa import protocol as palimpsa
from routemem.experiments.shared.cache import RunCache, run_key
from routemem.experiments.shared.common import compile_fields
from routemem.experiments.shared.runner import Execution, Unit, run_units
from routemem.experiments.suite.run import reusable, study_command
from routemem.train import RunConfig, Trainer, load_model
from routemem.train.config import TrainConfig

TINY = {
    "model": {"n_layer": 1, "d_model": 32, "n_head": 2, "max_seq_len": 32},
    "data": {"corpus": "pydocs", "tokenizer": "byte"},
    "train": {"batch_size": 4, "max_steps": 4, "warmup_steps": 1, "log_interval": 1, "eval_interval": 2,
              "eval_tokens": 128, "precision": "fp32", "progress": False},
}


def tiny_config(**train) -> RunConfig:
    data = json.loads(json.dumps(TINY))
    data["train"].update(train)
    return from_dict(RunConfig, data)


def fit(config: RunConfig, out: Path, resume=None) -> Trainer:
    trainer = Trainer(config, out, resume=resume)
    trainer.fit()
    trainer.close()
    return trainer


def train_losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


# --- train.compile as a config value --------------------------------------------------------------


@pytest.mark.parametrize("text, value", [("true", True), ("false", False), ("reduce-overhead", "reduce-overhead")])
def test_compile_accepts_false_true_and_reduce_overhead(text, value):
    config = from_dict(RunConfig, apply_overrides({}, [f"train.compile={text}"]))
    assert config.train.compile == value and type(config.train.compile) is type(value)
    assert TrainConfig().compile is False  # off unless asked


@pytest.mark.parametrize("text", ["max-autotune", "'true'", "1", "0", "null", "[true]"])
def test_any_other_compile_value_names_the_field_and_the_allowed_values(text):
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, apply_overrides({}, [f"train.compile={text}"]))
    assert "compile must be false, true or reduce-overhead, got" in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_compile_on_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "run"), "train.compile=fast"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == "routemem: error: train: compile must be false, true or reduce-overhead, got 'fast'\n"
    assert not (tmp_path / "run").exists()


# --- the Trainer, compiled --------------------------------------------------------------------------


def test_compiled_training_matches_eager_and_checkpoints_the_plain_model(tmp_path):
    eager = fit(tiny_config(), tmp_path / "eager")
    # compiled, stopped half way, then resumed compiled: 4 steps like the eager run
    fit(tiny_config(compile=True, stop_at=2), tmp_path / "compiled")
    with safe_open(str(tmp_path / "compiled" / "ckpt" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    with safe_open(str(tmp_path / "eager" / "ckpt" / "model.safetensors"), "pt") as f:
        assert keys == set(f.keys())  # the plain module's names: no _orig_mod. prefix
    assert not any("_orig_mod" in key for key in keys)
    resumed = fit(tiny_config(compile=True), tmp_path / "compiled", resume=True)
    assert resumed.step == 4

    torch.testing.assert_close(train_losses(tmp_path / "compiled"), train_losses(tmp_path / "eager"),
                               rtol=1e-4, atol=1e-5)  # float rounding only
    a, b = load_model(tmp_path / "eager")[0].state_dict(), load_model(tmp_path / "compiled")[0].state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    final = {name: json.loads((tmp_path / name / "final.json").read_text()) for name in ("eager", "compiled")}
    assert final["eager"]["compile"] is False and final["compiled"]["compile"] is True
    assert final["compiled"]["val"]["loss"] == pytest.approx(final["eager"]["val"]["loss"], rel=1e-4)
    assert eager.model is eager.eval_model  # eager: nothing wraps the model


def test_resume_may_switch_compile_like_device_or_threads(tmp_path):
    fit(tiny_config(stop_at=2), tmp_path / "run")  # eager checkpoint; the resume only builds the Trainer
    trainer = Trainer(tiny_config(compile=True), tmp_path / "run", resume=True)
    assert trainer.eval_model is not trainer.model and trainer.ddp_model is trainer.eval_model
    trainer.close()


# --- bench --compile ------------------------------------------------------------------------------


def fake_suite(seen: dict):
    def run(quick: bool = False, device="cpu", compile: bool = False) -> dict:
        seen.update(quick=quick, compile=compile)
        return {"rows": [], "targets": [], "all_targets_met": None}

    return run


def test_bench_passes_compile_to_the_suite_and_records_it_in_env(monkeypatch, tmp_path, capsys):
    seen = {}
    monkeypatch.setattr(train_bench, "run", fake_suite(seen))
    assert run_suite("train", quick=True, device="cpu")["env"]["compile"] is False
    assert seen["compile"] is False
    assert main(["bench", "train", "--quick", "--device", "cpu", "--compile", "--out", str(tmp_path / "b.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert seen["compile"] is True and printed["env"]["compile"] is True
    assert json.loads((tmp_path / "b.json").read_text())["env"]["compile"] is True


def test_a_suite_without_the_option_refuses_compile_and_runs_without_it(monkeypatch):
    monkeypatch.setattr(train_bench, "run", lambda quick=False, device="cpu": {
        "rows": [], "targets": [], "all_targets_met": None})
    assert run_suite("train", quick=True, device="cpu")["env"]["compile"] is False
    with pytest.raises(UserError, match="does not take --compile"):
        run_suite("train", quick=True, device="cpu", compile=True)


@pytest.fixture
def tiny_train(monkeypatch):
    # TINY's model, batch and precision: the compiled pair's training graph is the Trainer test's,
    # which torch's on-disk compile cache then holds (a compile costs seconds, a cached one less)
    tiny = json.loads(json.dumps(train_bench.BENCH_CONFIG))
    tiny["model"] = dict(TINY["model"])
    tiny["train"].update(batch_size=4, precision="fp32")
    monkeypatch.setattr(train_bench, "BENCH_CONFIG", tiny)
    monkeypatch.setattr(train_bench, "ROUNDS", {"quick": (2, 2)})
    monkeypatch.setattr(train_bench, "COMPILED_BATCH", {"quick": 4})
    monkeypatch.setattr(train_bench, "COMPILED_ROUNDS", {"quick": (2, 3)})
    monkeypatch.setattr(train_bench, "COMPILED_MECHANISMS", {"attention": {"mixer": "attention"}})


def test_train_suite_times_compiled_against_eager(tiny_train):
    result = run_suite("train", quick=True, device="cpu")
    pair = {r["mode"]: r for r in result["rows"] if r["op"] == "train_step_compiled"}
    assert set(pair) == {"attention-eager", "attention-compiled"}
    for r in pair.values():
        assert len(r["runs_s"]) == 3 and r["median_s"] > 0 and r["mixer"] == "attention" and r["ffn"] == "dense"
        assert r["batch_size"] == 4 and "skipped" not in r
    info = result["info"]["compiled"]["attention"]
    tokens = 4 * 32
    assert info["eager_tokens_per_s"] == pytest.approx(tokens / pair["attention-eager"]["median_s"])
    assert info["compiled_tokens_per_s"] == pytest.approx(tokens / pair["attention-compiled"]["median_s"])
    assert info["compiled_over_eager"] == pytest.approx(info["compiled_tokens_per_s"] / info["eager_tokens_per_s"])
    assert info["first_step_s"] > info["compile_s"] > 0
    assert [t["name"] for t in result["targets"]] == ["trainer_overhead"]  # reported, not judged


class Uncompilable(torch.nn.Module):
    """Stands for a compiled module whose first call fails, as a graph break under fullgraph does."""

    def __init__(self, inner: torch.nn.Module | None = None, message: str = "Unsupported: a graph break"):
        super().__init__()
        self.inner, self.message = inner, message

    def forward(self, *args):
        raise RuntimeError(f"{self.message}\nsecond line")


def test_a_mechanism_that_does_not_compile_is_two_skipped_rows(tiny_train, monkeypatch):
    monkeypatch.setattr(train_bench, "compile_model", lambda model, setting: Uncompilable(model) if setting else model)
    monkeypatch.setattr(train_bench, "COMPILED_MECHANISMS", {"apn": {"ffn": "apn"}})
    result = run_suite("train", quick=True, device="cpu")
    pair = {r["mode"]: r for r in result["rows"] if r["op"] == "train_step_compiled"}
    reason = "torch.compile(fullgraph=True) failed: RuntimeError: Unsupported: a graph break"
    assert pair["apn-compiled"]["skipped"] == reason and pair["apn-compiled"]["median_s"] is None
    assert reason in pair["apn-eager"]["skipped"] and pair["apn-eager"]["runs_s"] == []
    assert result["info"]["compiled"]["apn"] == {"skipped": reason}
    assert result["targets"][0]["met"] is not None  # the Trainer rows still ran


def test_under_compile_a_suite_skips_what_does_not_compile_and_times_the_rest(monkeypatch):
    monkeypatch.setattr(fast_slow_bench, "SHAPE", {"B": 1, "d_model": 16, "n_head": 2})
    monkeypatch.setattr(fast_slow_bench, "LENGTHS", {"quick": (32,), "full": (), "full_cuda": ()})
    monkeypatch.setattr(fast_slow_bench, "BLOCKS", {"quick": (16,), "full": ()})
    monkeypatch.setattr(fast_slow_bench, "TARGET_LENGTHS", (32,))

    def maybe_compile(module, enabled):  # the fast_slow mixer "fails to compile"; attention stays eager
        if enabled and hasattr(module, "gate"):
            return Uncompilable(module, "Unsupported: data-dependent branch")
        return module

    monkeypatch.setattr(fast_slow_bench, "maybe_compile", maybe_compile)
    result = run_suite("fast-slow", quick=True, device="cpu", compile=True)
    assert result["env"]["compile"] is True
    rows = {(r["op"], r["direction"]): r for r in result["rows"]}
    for direction in ("fwd", "fwd+bwd"):
        assert rows["fast_slow", direction]["skipped"].endswith("RuntimeError: Unsupported: data-dependent branch")
        assert rows["attention", direction]["median_s"] > 0
    assert set(result["info"]["compile_s"]) == {"attention/fwd/T32", "attention/fwd+bwd/T32"}
    assert all(t["met"] is None and "numerator not measured" in t["skipped"] for t in result["targets"])


# --- reproduce --compile ----------------------------------------------------------------------------


def count_call(tag: str, compile: bool = False) -> dict:
    return {"tag": tag, "compile": compile, "pid": os.getpid()}


def test_the_run_cache_never_gives_a_compiled_run_for_an_eager_one(tmp_path):
    cache = lambda: RunCache(tmp_path / "runs", {"s": 1})  # noqa: E731
    compiles = Unit("lm", count_call, ("a",), run_key({"s": 1}), compiles=True)
    plain = Unit("vit", count_call, ("b",), run_key({"s": 1}))  # a unit compile does not reach
    eager, compiled = Execution.make("cpu"), Execution.make("cpu", compile=True)

    first = run_units([compiles, plain], cache(), eager)
    assert first.trained == 2 and first.records["lm"]["compile"] is False
    second = run_units([compiles, plain], (c := cache()), compiled)
    assert second.trained == 1 and second.reused == 1  # the eager lm run is not reused; vit is
    assert second.records["lm"]["compile"] is True and second.records["vit"]["compile"] is False
    stored = json.loads((tmp_path / "runs" / "lm.json").read_text())
    assert stored["key"]["compile"] is True and stored["env"]["compile"] is True
    assert {(m["compile"], m["runs"]) for m in c.trained_on()} == {(True, 1), (False, 1)}
    assert run_units([compiles, plain], cache(), compiled).reused == 2  # compiled again: reused
    third = run_units([compiles, plain], cache(), eager)
    assert third.trained == 1 and third.records["lm"]["compile"] is False  # and back: retrained eager


def test_reproduce_compile_trains_compiled_and_records_it(tmp_path, monkeypatch, capsys):
    tiny = replace(palimpsa.QUICK, mixers=("attention",), d_model=16, n_head=2, vocab_size=64,
                   train_tasks=((16, 2, 0),), steps=3, batch_size=4, lrs=(1e-3,), seeds=(0,),
                   test_grid=((16, 2),), overwrite_test=(16, 3, 2), n_val=4, n_test=6, warmup_steps=1)
    monkeypatch.setattr(palimpsa, "QUICK", tiny)
    out = tmp_path / "out"
    assert main(["reproduce", "palimpsa", "--quick", "--device", "cpu", "--out", str(out), "--compile"]) == 0
    results = json.loads((out / "palimpsa" / "results.json").read_text())
    assert results["compile"] is True and "every training run" in results["compile_note"]
    assert results["execution"]["trained_on"][0]["compile"] is True
    eager = palimpsa.run(out=out, setting=tiny, device="cpu")  # the compiled run is not reused for it
    assert eager["compile"] is False and eager["runs_reused"] == 0 and "compile_note" not in eager
    # float rounding apart, the same run
    assert eager["runs"][0]["final_loss"] == pytest.approx(results["runs"][0]["final_loss"], rel=1e-3)
    capsys.readouterr()


def test_studies_compile_does_not_reach_say_so():
    assert compile_fields(False) == {"compile": False}
    assert compile_fields(False, "not applied: x") == {"compile": False}
    assert compile_fields(True, "not applied: x") == {"compile": False, "compile_note": "not applied: x"}
    assert compile_fields(True, "every run") == {"compile": True, "compile_note": "every run"}


def test_reproduce_all_reuses_a_study_only_with_the_same_compile(tmp_path):
    (tmp_path / "apn").mkdir()
    (tmp_path / "apn" / "results.json").write_text("{}")
    entry = {"status": "complete", "mode": "quick", "fingerprint": "f", "data_dir": None,
             "results": "apn/results.json"}
    assert reusable(entry, "quick", "f", None, tmp_path)  # written before --compile: not compiled
    assert not reusable(entry, "quick", "f", None, tmp_path, True)
    compiled = {**entry, "compile": True}
    assert reusable(compiled, "quick", "f", None, tmp_path, True)
    assert not reusable(compiled, "quick", "f", None, tmp_path)
    assert study_command("apn", tmp_path, True, None, "cpu", 1, compile=True).endswith(" --compile")
    assert "--compile" not in study_command("apn", tmp_path, True, None, "cpu", 1)


# --- DDP ------------------------------------------------------------------------------------------

DDP_ARGS = ["data.corpus=pydocs", "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.max_seq_len=32",
            "train.batch_size=8", "train.max_steps=4", "train.warmup_steps=1", "train.eval_interval=2",
            "train.eval_tokens=256", "train.log_interval=1", "train.progress=false", "train.precision=fp32",
            "train.grad_accum=2"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ROUTEMEM_TEST_DDP_COMPILE") != "1",
                    reason="two processes compiling: ~45 s on a 2-core CPU with an empty compile cache (~15 s "
                           "with it); set ROUTEMEM_TEST_DDP_COMPILE=1 to run it")
def test_ddp_trains_the_compiled_model_like_one_eager_process(tmp_path):
    import subprocess
    import sys

    assert main(["train", "--out", str(tmp_path / "single"), *DDP_ARGS]) == 0
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "routemem",
           "train", "--out", str(tmp_path / "ddp"), *DDP_ARGS, "train.compile=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_model(tmp_path / "single")[0].state_dict(), load_model(tmp_path / "ddp")[0].state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    assert json.loads((tmp_path / "ddp" / "final.json").read_text())["compile"] is True
