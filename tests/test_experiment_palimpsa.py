"""The Palimpsa study end to end on a tiny setting (seconds), its verdict rules, and the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from routemem.cli import main
from routemem.experiments import palimpsa
from routemem.experiments.common import (
    INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, combine_verdicts, directional_verdict, summarize,
)
from routemem.experiments.palimpsa_checks import special_case_claim

TINY = replace(
    palimpsa.QUICK, d_model=16, n_head=2, vocab_size=64, train_tasks=((16, 2, 0), (16, 3, 2)),
    steps=3, batch_size=4, lrs=(1e-3, 3e-3), seeds=(0, 1), test_grid=((16, 2), (32, 4)),
    overwrite_test=(16, 3, 2), n_val=4, n_test=6, warmup_steps=1,
)


def test_directional_verdict_rule():
    high = summarize([0.9, 0.92, 0.91])
    low = summarize([0.5, 0.52, 0.51])
    assert directional_verdict(high, low)[0] == REPRODUCED
    assert directional_verdict(low, high)[0] == NOT_REPRODUCED
    assert directional_verdict(low, high, higher_is_better=False)[0] == REPRODUCED
    wide = summarize([0.3, 0.9])
    assert directional_verdict(wide, low)[0] == INCONCLUSIVE
    assert directional_verdict(summarize([0.9]), summarize([0.1]))[0] == INCONCLUSIVE  # one seed


def test_combine_verdicts():
    assert combine_verdicts([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert combine_verdicts([REPRODUCED, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine_verdicts([REPRODUCED, NOT_REPRODUCED]) == NOT_REPRODUCED


def test_special_cases_reduce_on_the_ops():
    claim = special_case_claim()
    assert claim["verdict"] == REPRODUCED, claim["why"]
    gaps = claim["measured"]["relative_gap_by_prior"]
    assert gaps[0] > 1e-2  # beta > 0 really makes a difference at I_prior = 1


def test_tiny_study_writes_results_report_and_plots(tmp_path):
    results = palimpsa.run(out=tmp_path, quick=True, setting=TINY)
    study = tmp_path / "palimpsa"
    on_disk = json.loads((study / "results.json").read_text())
    assert on_disk["study"] == "palimpsa" and on_disk["mode"] == "quick"
    assert {"torch", "threads", "device"} <= set(on_disk["env"])
    assert len(on_disk["runs"]) == len(TINY.mixers) * len(TINY.lrs) * len(TINY.seeds)
    ids = [c["id"] for c in on_disk["claims"]]
    assert ids == ["mqar_metaplastic_beats_non_metaplastic", "special_cases_reduce", "overwrite_stability_plasticity"]
    for claim in on_disk["claims"]:
        assert claim["verdict"] in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE) and claim["why"]
    mqar = on_disk["claims"][0]
    assert mqar["measured"]["palimpsa"]["n"] == len(TINY.seeds)
    # the verdict is recomputed from the measured numbers, not stored separately
    expected = combine_verdicts([directional_verdict(mqar["measured"][a], mqar["measured"][b])[0]
                                 for a, b in palimpsa.PAIRS])
    assert mqar["verdict"] == expected
    for run in on_disk["runs"]:
        assert 0.0 <= run["metrics"]["grid_mean"] <= 1.0 and run["state_size"] > 0
    report = (study / "report.md").read_text()
    assert "| palimpsa |" in report and "## Claims" in report
    # chance beside every accuracy: a uniform guess among the values, the upper half of the vocabulary
    chance = 1 / (TINY.vocab_size - TINY.vocab_size // 2)
    assert on_disk["chance_accuracy"] == pytest.approx(chance)
    assert on_disk["claims"][0]["chance"] == pytest.approx(chance)
    assert f"| chance (uniform over values) | {chance:.4f} |" in report
    # the paper's column (no number at our settings: said so, with its qualitative claim)
    assert "| claim | paper | ours (mean ± std over seeds) | chance | verdict | why |" in report
    assert report.count("not reported") >= 3
    assert all(c["statement"] in report for c in on_disk["claims"])
    assert (study / "accuracy_vs_kv_pairs.png").stat().st_size > 1000
    assert (study / "accuracy_vs_state_size.png").stat().st_size > 1000
    assert results["claims"][1]["verdict"] == REPRODUCED


def test_state_size_orders_attention_above_recurrent_at_long_lengths():
    sizes = {}
    for mixer in ("attention", "gla", "palimpsa"):
        model = palimpsa.TransformerLM(palimpsa.model_config(TINY, mixer))
        sizes[mixer] = {L: sum(b.mixer.state_size(L) for b in model.blocks) for L in (16, 64)}
    assert sizes["attention"][64] == 4 * sizes["attention"][16]  # KV cache grows with length
    assert sizes["gla"][16] == sizes["gla"][64] and sizes["palimpsa"][16] == sizes["palimpsa"][64]
    assert sizes["palimpsa"][16] > sizes["gla"][16]  # mu and importance


def test_cli_reproduce_palimpsa_quick(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(palimpsa, "QUICK", replace(TINY, mixers=("attention", "gla"), lrs=(1e-3,), seeds=(0,)))
    assert main(["reproduce", "palimpsa", "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "palimpsa" / "results.json").exists()


def test_an_interrupted_study_resumes_from_its_finished_runs(tmp_path, monkeypatch):
    setting = replace(TINY, mixers=("attention", "gla"), lrs=(1e-3,), seeds=(0,))
    trained = []
    real_train_one = palimpsa.train_one

    def counting_train_one(setting, mixer, lr, seed, device="cpu"):
        trained.append(mixer)
        if mixer == "gla" and len(trained) == 2:
            raise KeyboardInterrupt  # the first invocation dies in its second run
        return real_train_one(setting, mixer, lr, seed, device)

    monkeypatch.setattr(palimpsa, "train_one", counting_train_one)
    with pytest.raises(KeyboardInterrupt):
        palimpsa.run(out=tmp_path, quick=True, setting=setting)
    assert sorted(p.name for p in (tmp_path / "palimpsa" / "runs").iterdir()) == ["attention-lr0.001-seed0.json"]

    first = palimpsa.run(out=tmp_path, quick=True, setting=setting)  # resumes: trains gla only
    assert trained == ["attention", "gla", "gla"] and first["runs_reused"] == 1

    again = palimpsa.run(out=tmp_path, quick=True, setting=setting)  # everything cached
    assert trained == ["attention", "gla", "gla"] and again["runs_reused"] == 2
    assert again["runs"] == json.loads(json.dumps(first["runs"]))

    longer = replace(setting, steps=setting.steps + 1)  # another setting: nothing is reused
    assert palimpsa.run(out=tmp_path, quick=True, setting=longer)["runs_reused"] == 0
    assert trained[3:] == ["attention", "gla"]
