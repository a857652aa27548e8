"""The Palimpsa study end to end on a tiny setting (seconds), its verdict rules, and the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from routemem.cli import main
from routemem.errors import UserError
from routemem.experiments.palimpsa import protocol as palimpsa
from routemem.experiments.palimpsa import claims as palimpsa_claims
from routemem.experiments.shared.common import (
    INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, combine_verdicts, directional_verdict, summarize,
)
from routemem.experiments.palimpsa.checks import special_case_claim

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
    assert directional_verdict(high, low)[1].startswith("0.910 ± 0.010 vs 0.510 ± 0.010")  # the reports' "±"


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
    # the verdict is recomputed from the per-seed numbers, not stored separately
    chosen = {m: [r for r in on_disk["runs"] if r["arm"] == m] for m in TINY.mixers}
    per_seed = {m: {} for m in TINY.mixers}
    for m, runs in chosen.items():
        for seed in TINY.seeds:
            best = max((r for r in runs if r["seed"] == seed), key=lambda r: r["val"]["grid_mean"])
            per_seed[m][seed] = palimpsa_claims.decisive_accuracy(best, TINY)
    expected = combine_verdicts([palimpsa_claims.paired_verdict(per_seed[a], per_seed[b])[0]
                                 for a, b in palimpsa.PAIRS])
    assert mqar["verdict"] == expected
    assert [c["sign_test"]["seeds"] for c in mqar["comparisons"]] == [list(TINY.seeds)] * 2
    assert on_disk["data"]["filler"] == "zeros" and "zeros (the authors' MQAR data" in (study / "report.md").read_text()
    assert on_disk["regime"]["decisive_cells"] == [list(TINY.hardest)]
    assert sum(row["runs"] for row in on_disk["plateau"]["counts"].values()) == len(on_disk["runs"])
    for run in on_disk["runs"]:
        assert run["left_plateau"] == (run["val"]["acc_L16_kv2"] >= TINY.plateau_threshold)
    for run in on_disk["runs"]:
        assert 0.0 <= run["metrics"]["grid_mean"] <= 1.0 and run["state_size"] > 0
    report = (study / "report.md").read_text()
    assert "| palimpsa |" in report and "## Claims" in report
    assert f"below {palimpsa_claims.STALLED_BELOW} on that cell *stalled*" in report
    off_plateau = {"off": "yes", "stalled": "stalled", "on": "no"}
    for run in on_disk["runs"]:  # every run's row says which of the three it is
        assert (f"| {run['seed']} | {run['final_loss']:.3f} | "
                f"{off_plateau[palimpsa_claims.plateau_state(run, TINY)]} |") in report
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
    conv = 2 * 3 * TINY.d_model * (TINY.attention_conv - 1)  # the short conv's buffer, per layer: constant
    assert sizes["attention"][64] - conv == 4 * (sizes["attention"][16] - conv)  # KV cache grows with length
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


# --- the rules of claim 1 and 3: disjoint intervals, or a paired sign test ---------------------


def test_sign_test_counts_paired_seeds_and_drops_ties():
    signs = palimpsa_claims.sign_test({0: 0.5, 1: 0.6, 2: 0.7, 3: 0.2, 9: 1.0}, {0: 0.4, 1: 0.6, 2: 0.1, 3: 0.3})
    assert (signs["seeds"], signs["wins"], signs["losses"], signs["ties"]) == ([0, 1, 2, 3], 2, 1, 1)
    assert signs["p_ours"] == pytest.approx(4 / 8) and signs["p_baseline"] == pytest.approx(7 / 8)


def test_paired_verdict_rule():
    seeds = range(5)
    base = {s: 0.30 + 0.1 * s for s in seeds}  # a wide spread: intervals always overlap below
    slightly_better = {s: base[s] + 0.01 for s in seeds}
    verdict, why, signs = palimpsa_claims.paired_verdict(slightly_better, base)
    assert verdict == REPRODUCED and signs["wins"] == 5 and "p = 0.031" in why  # 5 of 5: p = 1/32
    assert palimpsa_claims.paired_verdict(base, slightly_better)[0] == NOT_REPRODUCED
    four_of_five = {**slightly_better, 4: base[4] - 0.01}
    assert palimpsa_claims.paired_verdict(four_of_five, base)[0] == INCONCLUSIVE  # p = 6/32
    far = {s: 0.95 for s in seeds}  # disjoint intervals alone decide
    assert palimpsa_claims.paired_verdict(far, {s: 0.1 + 0.01 * s for s in seeds})[0] == REPRODUCED


def test_plateau_is_the_easiest_cell_against_the_threshold():
    setting = replace(TINY, plateau_threshold=0.5)
    assert setting.easiest == (16, 2)
    assert palimpsa_claims.left_plateau({"val": {"acc_L16_kv2": 0.5}}, setting)
    assert not palimpsa_claims.left_plateau({"val": {"acc_L16_kv2": 0.49}}, setting)
    assert not palimpsa_claims.left_plateau({"diverged": "nan"}, setting)


def test_a_run_off_the_plateau_but_short_of_the_easiest_cell_has_stalled():
    setting = replace(TINY, plateau_threshold=0.5)
    below = palimpsa_claims.STALLED_BELOW
    assert setting.plateau_threshold < below < 1.0

    def run(arm, accuracy):
        return {"arm": arm, "val": {"acc_L16_kv2": accuracy}}

    assert palimpsa_claims.plateau_state(run("gla", 0.49), setting) == "on"
    assert palimpsa_claims.plateau_state(run("gla", 0.5), setting) == "stalled"
    assert palimpsa_claims.plateau_state(run("gla", below - 0.01), setting) == "stalled"
    assert palimpsa_claims.plateau_state(run("gla", below), setting) == "off"
    assert palimpsa_claims.plateau_state({"arm": "gla", "diverged": "nan"}, setting) == "on"
    runs = [run("gla", 1.0), run("gla", 0.7), run("gla", 0.2), run("palimpsa", 0.95)]
    table = palimpsa_claims.plateau_table(runs, setting)
    assert table["stalled_below"] == below
    assert table["counts"][f"gla d{TINY.d_model}"] == {"left": 2, "stalled": 1, "runs": 3}
    assert table["counts"][f"palimpsa d{TINY.d_model}"] == {"left": 1, "stalled": 0, "runs": 1}


# --- settings: the authors' data and layer, the paper's scale -------------------------------------


def test_the_study_uses_zero_filler_and_expand_v_2_by_default():
    assert palimpsa.FULL.random_filler is False and palimpsa.FULL.expand_v == 2
    inputs, labels, _ = palimpsa.task_batch(TINY, (32, 4, 0), 8, seed=0)
    context = 2 * 4
    filler = (labels == -100).clone()
    filler[:, :context] = False
    assert (inputs[filler] == 0).all()
    noisy, _, _ = palimpsa.task_batch(replace(TINY, random_filler=True), (32, 4, 0), 8, seed=0)
    assert (noisy[filler] != 0).any()
    for mixer in ("palimpsa", "gla", "gated_deltanet"):
        assert palimpsa.model_config(TINY, mixer).mixer_kwargs == {"expand_v": 2}
    assert palimpsa.model_config(TINY, "mamba2").mixer_kwargs == {}
    assert palimpsa.model_config(TINY, "attention").mixer_kwargs == {"conv_width": 4}
    assert palimpsa.model_config(replace(TINY, attention_conv=None), "attention").mixer_kwargs == {}


def test_paper_setting_is_the_papers_mqar():
    paper = palimpsa.PAPER
    assert (paper.vocab_size, paper.d_model, paper.n_layer, paper.n_head) == (8192, 128, 2, 8)
    assert [t[:2] for t in paper.train_tasks if t[2] == 0] == [(64, 4), (128, 8), (256, 16), (256, 32), (256, 64)]
    assert max(paper.test_grid) == (1024, 256) and (512, 128) in paper.test_grid
    assert paper.lrs == pytest.approx((1e-3, 10**-2.5, 1e-2, 10**-1.5))
    assert paper.random_filler is False and paper.decisive_cells == ((512, 128), (1024, 256))


def test_setting_by_name_and_its_errors(tmp_path):
    assert palimpsa.pick_setting(False, "paper") == (palimpsa.PAPER, "paper")
    assert palimpsa.pick_setting(True, None) == (palimpsa.QUICK, "quick")
    with pytest.raises(UserError, match="unknown palimpsa setting 'huge'"):
        palimpsa.pick_setting(False, "huge")
    with pytest.raises(UserError, match="contradict"):
        palimpsa.pick_setting(True, "paper")
    assert main(["reproduce", "apn", "--setting", "paper", "--out", str(tmp_path)]) == 2
    assert main(["reproduce", "all", "--setting", "paper", "--out", str(tmp_path)]) == 2
    assert main(["reproduce", "palimpsa", "--setting", "huge", "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "palimpsa").exists()


def test_state_sweep_trains_other_widths_and_plots_one_line_per_mixer(tmp_path):
    setting = replace(TINY, mixers=("attention", "gla"), lrs=(1e-3,), seeds=(0,), state_sweep=(8, 16),
                      state_sweep_seeds=(0,))
    results = palimpsa.run(out=tmp_path, quick=True, setting=setting)
    widths = sorted({(r["arm"], r["d_model"]) for r in results["runs"]})
    assert widths == [("attention", 8), ("attention", 16), ("gla", 8), ("gla", 16)]
    sweep = palimpsa_claims.state_sweep(results["runs"], setting)
    assert [p["d_model"] for p in sweep["gla"]] == [8, 16] and sweep["gla"][0]["state_size"] < sweep["gla"][1]["state_size"]
    assert "## Accuracy vs state size" in (tmp_path / "palimpsa" / "report.md").read_text()
    assert results["claims"][0]["measured"]["gla"]["n"] == 1  # claims use the main width only
