"""The run cache's per-run keys: a study that grows (a seed, a learning rate, a method) trains only
its new runs, a change to a field a run reads retrains it, and the files written before keys (the
whole setting, no "format") are reused only under an equal whole setting, or retrained with one
line saying so. Each study's keys are checked on its units() without training; palimpsa and
ocl-baselines (with its backbone), and rwf's borrowed backbone, end to end on tiny settings."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch
from worker_probe import where_am_i

from routemem.experiments.absorption import protocol as absorption
from routemem.experiments.apn import protocol as apn
from routemem.experiments.fast_slow import protocol as fast_slow
from routemem.experiments.ocl_baselines import protocol as ocl_baselines
from routemem.experiments.palimpsa import protocol as palimpsa
from routemem.experiments.rwf import protocol as rwf
from routemem.experiments.shared import vit_stream
from routemem.experiments.shared.cache import FORMAT, RunCache, run_key
from routemem.experiments.shared.runner import Execution, Unit, run_units

CPU = torch.device("cpu")
# palimpsa: 2 mixers x 1 lr x 1 seed of a few steps each (seconds on a CPU)
PALIMPSA = replace(
    palimpsa.QUICK, mixers=("attention", "gla"), d_model=16, n_head=2, vocab_size=64,
    train_tasks=((16, 2, 0), (16, 3, 2)), steps=3, batch_size=4, lrs=(1e-3,), seeds=(0,),
    test_grid=((16, 2), (32, 4)), overwrite_test=(16, 3, 2), n_val=4, n_test=6, warmup_steps=1,
)
OCL = replace(ocl_baselines.QUICK, d_model=32, n_layer=2, n_head=2, patch_size=8, image_size=16, pretrain_steps=4,
              pretrain_batch=16, pretrain_samples=4, pretrain_classes=12, glyph_classes=6, glyph_samples=10,
              n_tasks=3, anytime_points=3, seeds=(0,), streams=("glyphs",), methods=("linear-probe",))


def _old_format(path, setting) -> None:
    """Rewrite a run file as the cache wrote it before per-run keys: setting, env, run."""
    stored = json.loads(path.read_text())
    path.write_text(json.dumps({"setting": setting, "env": stored["env"], "run": stored["run"]}))


def _without_timing(runs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads(json.dumps(runs))]


# --- the key and the cache ---------------------------------------------------------------------


def test_run_key_is_the_setting_less_its_grids_plus_the_runs_coordinates():
    key = run_key(PALIMPSA, ("mixers", "lrs", "seeds"), mixer="gla", lr=1e-3, seed=0)
    assert key["unit"] == {"mixer": "gla", "lr": 1e-3, "seed": 0}
    assert "steps" in key["setting"] and not {"mixers", "lrs", "seeds"} & set(key["setting"])
    assert key["setting"]["train_tasks"] == [[16, 2, 0], [16, 3, 2]]  # as JSON stores it
    assert run_key({"a": 1, "b": (2,)}, ("b",)) == {"setting": {"a": 1}, "unit": {}}
    with pytest.raises(ValueError, match="grid fields not in the setting: seedz"):
        run_key(PALIMPSA, ("seedz",))


def test_a_run_is_reused_while_its_key_holds_whatever_else_the_setting_says(tmp_path):
    key = run_key({"steps": 3, "seeds": [0]}, ("seeds",), seed=0)
    RunCache(tmp_path, {"steps": 3, "seeds": [0]}).put("r", {"loss": 1.0}, {"device": "cpu"}, key)
    stored = json.loads((tmp_path / "r.json").read_text())
    assert stored["format"] == FORMAT and stored["key"] == key and stored["env"] == {"device": "cpu"}
    grown = RunCache(tmp_path, {"steps": 3, "seeds": [0, 1]})
    assert grown.get("r", key) == {"loss": 1.0} and grown.envs == {"r": {"device": "cpu"}}
    assert grown.get("r", run_key({"steps": 4, "seeds": [0]}, ("seeds",), seed=0)) is None
    assert grown.get("r") is None  # a unit without a key: the whole setting must be equal
    assert RunCache(tmp_path, {"steps": 3, "seeds": [0]}).get("r") == {"loss": 1.0}
    (tmp_path / "r.json").write_text(json.dumps({**stored, "format": FORMAT + 1}))
    assert grown.get("r", key) is None  # a newer routemem's file: not read as ours


def test_an_old_file_is_reused_under_its_whole_setting_and_then_keeps_its_key(tmp_path):
    setting, key = {"steps": 3, "seeds": [0]}, run_key({"steps": 3, "seeds": [0]}, ("seeds",), seed=0)
    (tmp_path / "r.json").write_text(json.dumps({"setting": setting, "env": {"cpu": "old"}, "run": [1, 2]}))
    cache = RunCache(tmp_path, setting)
    assert cache.get("r", key) == [1, 2] and cache.trained_on()[0]["cpu"] == "old" and not cache.outdated
    stored = json.loads((tmp_path / "r.json").read_text())
    assert stored == {"format": FORMAT, "key": key, "setting": setting, "env": {"cpu": "old"}, "run": [1, 2]}
    assert RunCache(tmp_path, {**setting, "seeds": [0, 1]}).get("r", key) == [1, 2]  # now it grows with the study


def test_an_old_file_of_another_setting_is_retrained_with_one_line(tmp_path, capsys):
    for name in ("u0", "u1"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"setting": {"steps": 2}, "env": {}, "run": {"tag": "old"}}))
    units = [Unit(name, where_am_i, (name,), run_key({"steps": 3})) for name in ("u0", "u1")]
    outcome = run_units(units, RunCache(tmp_path, {"steps": 3}), Execution.make("cpu"))
    assert outcome.trained == 2 and outcome.records["u0"]["tag"] == "u0"
    notes = [line for line in capsys.readouterr().err.splitlines() if "routemem: note:" in line]
    assert notes == [f"routemem: note: 2 run(s) in {tmp_path} were cached by an older routemem for another "
                     "setting and have no per-run key; they will be retrained"]
    assert json.loads((tmp_path / "u0.json").read_text())["format"] == FORMAT
    run_units(units, RunCache(tmp_path, {"steps": 3}), Execution.make("cpu"))  # now cached: no note
    assert "routemem: note:" not in capsys.readouterr().err


# --- each study's rule, read from its units ----------------------------------------------------


def _keys(units: list[Unit]) -> dict[str, dict]:
    assert all(u.key is not None for u in units)
    return {u.name: u.key for u in units}


STUDIES = {  # study -> (its units for a setting, a small setting, grown settings, a field its runs read)
    "palimpsa": (lambda s: palimpsa.units(s, CPU), replace(PALIMPSA, state_sweep=(8,)),
                 [{"seeds": (0, 1)}, {"lrs": (1e-3, 3e-3)}, {"mixers": ("attention", "gla", "mamba2")},
                  {"state_sweep_seeds": (0, 1)}], {"steps": 4}),
    "apn": (lambda s: apn.units(s, "pydocs:pycode", None, CPU), apn.QUICK, [{"seeds": (0, 1, 2)}],
            {"pretrain_steps": 601}),
    "fast-slow": (lambda s: fast_slow.units(s, "pydocs", None, CPU), fast_slow.QUICK,
                  [{"seeds": (0, 1, 2)}, {"budgets": (50_000, 100_000, 400_000)}], {"lr": 1e-3}),
    "absorption": (lambda s: absorption.units(s, "pydocs", "pydocs:pycode", None, CPU), absorption.QUICK,
                   [{"seeds": (0, 1, 2)}], {"tokens": 150_001}),
    "ocl-baselines": (lambda s: ocl_baselines.units(s, "out", ("glyphs", "digits"), CPU), OCL,
                      [{"seeds": (0, 1)}, {"methods": ("linear-probe", "er")}, {"streams": ("glyphs", "digits")}],
                      {"anytime_points": 4}),
    "rwf": (lambda s: rwf.units(s, "out", ("glyphs", "glyphs-fewshot"), CPU), rwf.QUICK,
            [{"seeds": (0, 1, 2)}, {"methods": (*rwf.METHODS, "extra")}, {"ablations": ("static",)}],
            {"shots": 6}),
}


@pytest.mark.parametrize("study", STUDIES)
def test_growing_a_grid_keeps_every_existing_runs_key(study):
    units_of, setting, grown, _ = STUDIES[study]
    before = _keys(units_of(setting))
    for change in grown:
        after = _keys(units_of(replace(setting, **change)))
        kept = set(before) & set(after)
        assert kept and {name: after[name] for name in kept} == {name: before[name] for name in kept}, change
        if len(after) > len(before):
            assert set(before) <= set(after), change  # nothing else retrains


@pytest.mark.parametrize("study", STUDIES)
def test_changing_a_field_the_runs_read_changes_every_key(study):
    units_of, setting, _, changed = STUDIES[study]
    before, after = _keys(units_of(setting)), _keys(units_of(replace(setting, **changed)))
    assert not [name for name in set(before) & set(after) if before[name] == after[name]]


def test_an_apn_unit_runs_every_arm_at_every_rate_so_both_are_in_its_key():
    before = _keys(apn.units(apn.QUICK, "pydocs:pycode", None, CPU))
    for change in ({"adapt_lrs": (1e-3, 3e-3)}, {"arms": ("dense-global", "apn-patches")}):
        after = _keys(apn.units(replace(apn.QUICK, **change), "pydocs:pycode", None, CPU))
        assert set(after) == set(before) and all(after[n] != before[n] for n in before), change


def test_the_backbone_key_is_its_fields_and_rwf_borrows_by_the_same_ones():
    assert rwf.BACKBONE_FIELDS == vit_stream.BACKBONE_FIELDS


# --- end to end --------------------------------------------------------------------------------


def test_palimpsa_trains_only_new_seeds_and_rates_and_retrains_a_changed_field(tmp_path, monkeypatch):
    trained = []
    real_train_one = palimpsa.train_one

    def counting_train_one(setting, mixer, lr, seed, device="cpu", d_model=None):
        trained.append((mixer, lr, seed))
        return real_train_one(setting, mixer, lr, seed, device, d_model)

    monkeypatch.setattr(palimpsa, "train_one", counting_train_one)
    assert palimpsa.run(out=tmp_path, setting=PALIMPSA, device="cpu")["runs_reused"] == 0
    assert len(trained) == 2

    more_seeds = replace(PALIMPSA, seeds=(0, 1))
    assert palimpsa.run(out=tmp_path, setting=more_seeds, device="cpu")["runs_reused"] == 2
    assert trained[2:] == [("attention", 1e-3, 1), ("gla", 1e-3, 1)]

    more_rates = replace(more_seeds, lrs=(1e-3, 3e-3))
    grown = palimpsa.run(out=tmp_path, setting=more_rates, device="cpu")
    assert grown["runs_reused"] == 4 and sorted(trained[4:]) == [(m, 3e-3, s) for m in ("attention", "gla") for s in (0, 1)]
    # reusing runs gives the study that training them all at once gives
    fresh = palimpsa.run(out=tmp_path / "fresh", setting=more_rates, device="cpu")
    assert _without_timing(grown["runs"]) == _without_timing(fresh["runs"])

    del trained[:]
    longer = replace(more_rates, steps=PALIMPSA.steps + 1)  # every run reads steps: all retrained
    assert palimpsa.run(out=tmp_path, setting=longer, device="cpu")["runs_reused"] == 0 and len(trained) == 8


def test_palimpsa_reads_an_old_cache_by_the_old_rule(tmp_path, monkeypatch, capsys):
    palimpsa.run(out=tmp_path, setting=PALIMPSA, device="cpu")
    runs = sorted((tmp_path / "palimpsa" / "runs").glob("*.json"))
    for path in runs:
        _old_format(path, asdict(PALIMPSA))
    trained = []
    real_train_one = palimpsa.train_one
    monkeypatch.setattr(palimpsa, "train_one", lambda *args: trained.append(args) or real_train_one(*args))
    capsys.readouterr()
    # the same whole setting: reused (and keyed), so a seed added next trains only the new seed
    assert palimpsa.run(out=tmp_path, setting=PALIMPSA, device="cpu")["runs_reused"] == 2 and not trained
    assert all(json.loads(p.read_text())["format"] == FORMAT for p in runs)
    assert palimpsa.run(out=tmp_path, setting=replace(PALIMPSA, seeds=(0, 1)), device="cpu")["runs_reused"] == 2
    assert len(trained) == 2
    assert "routemem: note:" not in capsys.readouterr().err
    # another whole setting: an old file cannot say what its run read, so it is retrained, with a note
    for path in runs:
        _old_format(path, asdict(PALIMPSA))
    results = palimpsa.run(out=tmp_path, setting=replace(PALIMPSA, seeds=(0, 1)), device="cpu")
    assert results["runs_reused"] == 2 and len(trained) == 4  # seed 1's runs are keyed; seed 0's were old
    assert capsys.readouterr().err.count("routemem: note: 2 run(s)") == 1


def test_ocl_baselines_keeps_its_backbone_and_runs_as_the_study_grows(tmp_path, monkeypatch):
    streams, backbones = [], []
    real_stream, real_pretrain = ocl_baselines.stream_unit, ocl_baselines.pretrain_backbone
    monkeypatch.setattr(ocl_baselines, "stream_unit", lambda *a: streams.append(a[1:4]) or real_stream(*a))
    monkeypatch.setattr(ocl_baselines, "pretrain_backbone", lambda *a: backbones.append(1) or real_pretrain(*a))
    ocl_baselines.run(out=tmp_path, setting=OCL, device="cpu")
    assert len(backbones) == 1 and streams == [("glyphs", "linear-probe", 0)]

    grown = ocl_baselines.run(out=tmp_path, setting=replace(OCL, seeds=(0, 1)), device="cpu")
    assert len(backbones) == 1 and streams[1:] == [("glyphs", "linear-probe", 1)] and grown["runs_reused"] == 2

    # the runs read anytime_points, the backbone does not
    ocl_baselines.run(out=tmp_path, setting=replace(OCL, seeds=(0, 1), anytime_points=4), device="cpu")
    assert len(backbones) == 1 and len(streams) == 4

    # every run reads the backbone: a backbone field retrains it and them
    ocl_baselines.run(out=tmp_path, setting=replace(OCL, pretrain_steps=OCL.pretrain_steps + 1), device="cpu")
    assert len(backbones) == 2 and len(streams) == 5


def test_rwf_keeps_a_borrowed_backbone_when_its_study_grows(tmp_path, monkeypatch):
    small = replace(rwf.QUICK, **{f: getattr(OCL, f) for f in rwf.BACKBONE_FIELDS}, glyph_classes=6, glyph_samples=10,
                    n_tasks=3, anytime_points=3, seeds=(0,), methods=("linear-probe",), streams=("glyphs",),
                    ablations=())
    theirs = replace(OCL, anytime_points=5)
    source = tmp_path / "ocl-baselines"
    record = ocl_baselines.pretrain_backbone(theirs, str(source))
    RunCache(source / "runs", asdict(theirs)).put("backbone", record, {"device": "cpu"})  # as ocl-baselines wrote it
    monkeypatch.setattr(rwf, "pretrain_backbone", lambda *a: pytest.fail("the backbone was pretrained"))
    assert "copied_from" in rwf.run(out=tmp_path, setting=small, device="cpu")["backbone"]
    grown = rwf.run(out=tmp_path, setting=replace(small, seeds=(0, 1)), device="cpu")
    assert grown["runs_reused"] == 2 and "copied_from" in grown["backbone"]  # the backbone and seed 0's run
