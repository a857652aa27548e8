"""The fast-slow study: its claim rules on made-up runs (each verdict can come out every way), a
tiny end-to-end study, the slow-share measurement, and resuming from the run cache."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from routemem.cli import main
from routemem.experiments.fast_slow import protocol as fast_slow
from routemem.experiments.fast_slow import claims as fast_slow_claims
from routemem.experiments.fast_slow import report as fast_slow_report
from routemem.experiments.shared.common import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED
from routemem.experiments.shared.text_lm import text_task

TINY = replace(fast_slow.QUICK, d_model=32, n_head=2, seq_len=64, block=8, batch_size=4, budgets=(2_048, 4_096),
               control_window=8, val_tokens=1_024, curve_points=2, curve_tokens=512, gate_every=4,
               cost_steps=1, cost_rounds=1, bf16=False, topic_tokens=2_048, topic_batch_size=2)


def fake_run(arm: str, tokens: int, seed: int, loss: float, share: float = 0.0, window=None) -> dict:
    """A finished run; its gate rms is small whatever its slow share (as measured in real runs)."""
    return {"arm": arm, "tokens": tokens, "window": window, "seed": seed, "metrics": {"val_loss": loss},
            "gate": {"rms": [] if arm == "dense" else [0.01, 0.03]},
            "slow_share": [] if arm == "dense" else [share / 2, share]}


def three_arms(tokens: int, losses: dict, share: float = 0.0, window=None) -> list[dict]:
    return [fake_run(arm, tokens, seed, value, share, window)
            for arm, values in losses.items() for seed, value in enumerate(values)]


def neutral(runs, tokens=100):
    return fast_slow_claims.neutral_claim("x", "statement", runs, tokens, {"ours": "-"})


def test_neutral_rule_reproduced_when_gaps_are_inside_the_margin_and_the_gate_is_shut():
    runs = three_arms(100, {"dense": [2.000, 2.010, 2.005], "coupled": [2.002, 2.008, 2.004],
                            "frozen": [2.001, 2.011, 2.003]}, share=0.02)
    claim = neutral(runs)
    assert claim["verdict"] == REPRODUCED
    assert claim["measured"]["margin"] == pytest.approx(fast_slow_claims.MIN_MARGIN)  # tiny std: the floor


def test_neutral_rule_not_reproduced_by_a_real_gap_or_an_open_gate():
    gap = three_arms(100, {"dense": [2.00, 2.01, 2.00], "coupled": [1.90, 1.91, 1.90], "frozen": [2.00, 2.00, 2.01]})
    claim = neutral(gap)
    assert claim["verdict"] == NOT_REPRODUCED and "coupled differs from frozen" in claim["why"]
    shut = {"dense": [2.0, 2.0, 2.0], "coupled": [2.0, 2.0, 2.0], "frozen": [2.0, 2.0, 2.0]}
    opened = neutral(three_arms(100, shut, share=0.5))
    assert opened["verdict"] == NOT_REPRODUCED and "the gate opened" in opened["why"]
    assert opened["measured"]["gate_rms"]["mean"] < 0.1  # a small g does not make a closed gate


def test_neutral_margin_grows_with_seed_noise_and_one_seed_is_inconclusive():
    noisy = three_arms(100, {"dense": [2.0, 2.2, 1.8], "coupled": [2.05, 2.25, 1.85], "frozen": [2.0, 2.2, 1.8]})
    claim = neutral(noisy)
    assert claim["measured"]["margin"] == pytest.approx(2 * 0.2)  # pooled std 0.2
    assert claim["verdict"] == REPRODUCED
    one = three_arms(100, {"dense": [2.0], "coupled": [2.0], "frozen": [2.0]})
    assert neutral(one)["verdict"] == INCONCLUSIVE


def control(setting, runs):
    return fast_slow_claims.text_control_claim(setting, runs)


def test_control_rule_needs_an_open_gate_and_a_win():
    setting = replace(TINY, budgets=(100, 1000), control_window=8)
    win = three_arms(1000, {"dense": [2.3, 2.31, 2.32], "coupled": [2.0, 2.01, 2.02],
                            "frozen": [2.2, 2.21, 2.22]}, share=0.5, window=8)
    assert control(setting, win)["verdict"] == REPRODUCED
    shut = three_arms(1000, {"dense": [2.3, 2.31, 2.32], "coupled": [2.0, 2.01, 2.02],
                             "frozen": [2.2, 2.21, 2.22]}, share=0.01, window=8)
    failed = control(setting, shut)
    assert failed["verdict"] == NOT_REPRODUCED and "POSITIVE CONTROL FAILED" in failed["why"]
    tie = three_arms(1000, {"dense": [2.0, 2.1, 2.2], "coupled": [2.0, 2.1, 2.2],
                            "frozen": [2.0, 2.1, 2.2]}, share=0.5, window=8)
    assert control(setting, tie)["verdict"] == INCONCLUSIVE


def test_cost_rule():
    cost = {"ratio_coupled_dense": 1.05, "ratio_frozen_dense": 1.0, "step_seconds": {}}
    assert fast_slow_claims.cost_claim(TINY, cost)["verdict"] == REPRODUCED
    assert fast_slow_claims.cost_claim(TINY, {**cost, "ratio_coupled_dense": 1.2})["verdict"] == NOT_REPRODUCED


def test_cost_rule_reads_the_spread_over_rounds_and_the_machine_load():
    idle = {"ratio_coupled_dense": 1.05, "ratio_frozen_dense": 1.0, "step_seconds": {}, "device": "cpu",
            "round_ratios": [1.03, 1.05, 1.08], "cpu_share": 0.98, "load_average": 1.1, "cpu_count": 2,
            "threads": 1}
    claim = fast_slow_claims.cost_claim(TINY, idle)
    assert claim["verdict"] == REPRODUCED and "rounds 1.030-1.080x over 3" in claim["why"]
    assert fast_slow_claims.cost_claim(TINY, {**idle, "round_ratios": [1.12, 1.2, 1.3]})["verdict"] == NOT_REPRODUCED
    straddling = fast_slow_claims.cost_claim(TINY, {**idle, "round_ratios": [1.05, 1.15]})
    assert straddling["verdict"] == INCONCLUSIVE
    starved = fast_slow_claims.cost_claim(TINY, {**idle, "cpu_share": 0.55})
    assert starved["verdict"] == INCONCLUSIVE and "the CPU was shared while timing (the process got 55%" in starved["why"]
    # its own thread got the CPU, but another process kept the load average up: still shared
    beside = fast_slow_claims.cost_claim(TINY, {**idle, "cpu_share": 0.97, "load_average": 2.96})
    assert beside["verdict"] == INCONCLUSIVE and "load average 3.0 on 2 CPUs" in beside["why"]
    two_threads_idle = {**idle, "threads": 2, "load_average": 2.1}
    assert fast_slow_claims.cost_claim(TINY, two_threads_idle)["verdict"] == REPRODUCED
    # a GPU process's CPU time says nothing about the load
    assert fast_slow_claims.cost_claim(TINY, {**idle, "cpu_share": 0.1, "device": "cuda"})["verdict"] == REPRODUCED


def test_slow_share_is_zero_with_a_shut_gate_and_positive_with_an_open_one():
    torch.manual_seed(0)
    model = fast_slow.TransformerLM(fast_slow.model_config(TINY, "coupled", None))
    inputs = torch.randint(0, 256, (2, TINY.seq_len))
    assert fast_slow.slow_share(model, inputs) == [0.0] * TINY.n_layer
    with torch.no_grad():
        for block in model.blocks:
            block.mixer.gate.fill_(1.0)
    assert all(share > 0 for share in fast_slow.slow_share(model, inputs))
    assert model.training  # put back in training mode


def test_arms_differ_only_in_the_mixer():
    configs = {arm: fast_slow.model_config(TINY, arm, None) for arm in fast_slow.ARMS}
    assert configs["dense"].mixer == "attention" and configs["coupled"].mixer == "fast_slow"
    assert configs["frozen"].mixer_kwargs["freeze_slow"] and not configs["coupled"].mixer_kwargs["freeze_slow"]
    assert fast_slow.model_config(TINY, "dense", 8).mixer_kwargs == {"window": 8}
    assert fast_slow.model_config(TINY, "coupled", 8).mixer_kwargs["window"] == 8


def legends_of_saved_figures(monkeypatch) -> dict[str, list[list[str]]]:
    """Replace Figure.savefig by a recorder: file name -> the texts of each legend (figure legends
    first, then each panel's, an empty list for a panel without one)."""
    from matplotlib.figure import Figure

    saved = {}

    def record(fig, path, **_):
        if not isinstance(path, (str, Path)):
            return  # an in-memory image (the theorem plot writes through a buffer)
        panels = [ax.get_legend() for ax in fig.axes]
        saved[Path(path).name] = [[t.get_text() for t in legend.get_texts()] if legend else []
                                  for legend in [*fig.legends, *panels]]

    monkeypatch.setattr(Figure, "savefig", record)
    return saved


def test_tiny_study_writes_results_report_and_plots(tmp_path, monkeypatch):
    results = fast_slow.run(out=tmp_path, setting=TINY, device="cpu")
    study = tmp_path / "fast-slow"
    on_disk = json.loads((study / "results.json").read_text())
    assert [c["id"] for c in on_disk["claims"]] == [
        "neutral_at_paper_budget", "cost_comparable_to_dense", "positive_control", "positive_control_topics",
        "neutral_at_10x_budget", "theorem_tracking"]
    assert all(c["verdict"] in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE) for c in on_disk["claims"])
    assert len(on_disk["runs"]) == 3 * len(TINY.seeds) * (len(TINY.budgets) + 2)
    topic_runs = [r for r in results["runs"] if r["task"] == "topics"]
    assert len(topic_runs) == 3 * len(TINY.seeds) and all(r["window"] == TINY.topic_window for r in topic_runs)
    assert all(r["batch_tokens"] == TINY.topic_batch_size * TINY.seq_len for r in topic_runs)
    coupled = [r for r in results["runs"] if r["arm"] == "coupled"]
    for run in coupled:
        assert len(run["gate"]["rms"]) == TINY.n_layer and run["gate_trace"]["step"][-1] == run["steps"]
        assert len(run["curve"]["val_loss"]) == TINY.curve_points
    frozen = [r for r in results["runs"] if r["arm"] == "frozen"]
    assert all(max(r["gate"]["rms"]) > 0 for r in frozen)  # the gate trains even with the slow path frozen
    assert results["cost"]["ratio_coupled_dense"] > 0
    assert len(results["cost"]["round_ratios"]) == TINY.cost_rounds and 0 < results["cost"]["cpu_share"]
    report = (study / "report.md").read_text()
    assert "## Claims" in report and "POSITIVE CONTROL" in report or results["claims"][2]["verdict"] != NOT_REPRODUCED
    for plot in ("gate.png", "val_loss.png", "eps_slope.png"):
        assert (study / plot).stat().st_size > 0
    one_token = on_disk["topic_levels"]["one_token"]
    stuck = all(fast_slow_claims.val_loss(fast_slow_claims.finished(topic_runs, arm, TINY.topic_tokens,
                                                                     TINY.topic_window, "topics"))["mean"] > one_token
                for arm in fast_slow.ARMS)
    assert ("no arm reached even the one-token level" in report) == stuck
    saved = legends_of_saved_figures(monkeypatch)
    fast_slow_report.plots(study, TINY, results["runs"], results["theorem"])
    gate = saved["gate.png"]  # one figure legend for every panel, the 0.1 line named
    assert gate[0][:2] == ["coupled", "frozen"]
    assert f"gate open: slow share >= {fast_slow_claims.OPEN_SHARE}" in gate[0][-1]
    assert all(panel == [] for panel in gate[1:])
    val = saved["val_loss.png"]  # a legend on every panel; the topic panel's names the two levels
    levels = on_disk["topic_levels"]
    assert all(panel for panel in val) and len(val) == len(TINY.budgets) + 2
    assert {f"best seeing one token ({levels['one_token']:.3f})",
            f"best knowing the topic ({levels['topic_known']:.3f})"} <= set(val[-1])


def test_frozen_arm_keeps_its_slow_path_at_init():
    torch.manual_seed(3)
    model = fast_slow.TransformerLM(fast_slow.model_config(TINY, "frozen", None))
    before = [p.detach().clone() for b in model.blocks for p in b.mixer.slow_parameters()]
    task = text_task(TINY, "pydocs", None, seed=0)
    cfg = fast_slow.TrainConfig(batch_size=TINY.batch_size, max_steps=3, lr=1e-2, warmup_steps=1)
    fast_slow.fit_steps(model, task.batch_at, cfg)
    after = [p for b in model.blocks for p in b.mixer.slow_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert any(b.mixer.gate.abs().max() > 0 for b in model.blocks)


def test_cli_reproduce_fast_slow_quick_and_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fast_slow, "QUICK", replace(TINY, seeds=(0,)))
    assert main(["reproduce", "fast-slow", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "report:" in out and "positive control" in out.lower()
    trained = []
    monkeypatch.setattr(fast_slow, "train_one", lambda *args: trained.append(args) or {})
    again = fast_slow.run(out=tmp_path, quick=True)
    assert trained == [] and again["runs_reused"] == 3 * (len(TINY.budgets) + 2) + 1  # runs + the cost


def test_topic_control_reads_only_topic_runs():
    levels = {"topic_known": 3.47, "one_token": 4.09}
    text = three_arms(TINY.topic_tokens, {"dense": [4.1, 4.1, 4.1], "coupled": [4.1, 4.1, 4.1],
                                          "frozen": [4.1, 4.1, 4.1]}, share=0.0, window=TINY.topic_window)
    topics = [dict(r, task="topics") for r in three_arms(
        TINY.topic_tokens, {"dense": [4.10, 4.11, 4.12], "coupled": [3.60, 3.62, 3.64],
                            "frozen": [4.10, 4.11, 4.12]}, share=0.9, window=TINY.topic_window)]
    claim = fast_slow_claims.topic_control_claim(TINY, text + topics, levels)
    assert claim["verdict"] == REPRODUCED and claim["measured"]["coupled"]["mean"] == pytest.approx(3.62)
    assert fast_slow_claims.topic_control_claim(TINY, text, levels)["verdict"] == INCONCLUSIVE  # no topic runs


def test_report_says_so_when_no_topic_arm_reached_the_one_token_level():
    levels = {"topic_known": 3.466, "one_token": 4.088}

    def topic_runs(losses):
        return [dict(r, task="topics") for r in three_arms(TINY.topic_tokens, losses, window=TINY.topic_window)]

    stuck = topic_runs({"dense": [4.135, 4.135], "coupled": [4.134, 4.134], "frozen": [4.136, 4.134]})
    text = fast_slow_report.topic_undertrained_text(stuck, TINY.topic_tokens, TINY.topic_window, levels, "quick")
    assert "no arm reached even the one-token level" in text[1] and "above 4.088" in text[1]
    assert "(the lowest arm mean is 4.134)" in text[1] and f"{TINY.topic_tokens:,} tokens" in text[1]
    full = fast_slow_report.topic_undertrained_text(stuck, TINY.topic_tokens, TINY.topic_window, levels, "full")
    assert "quick mode" not in full[1]
    one_below = topic_runs({"dense": [4.134, 4.135], "coupled": [4.0, 4.02], "frozen": [4.136, 4.134]})
    assert fast_slow_report.topic_undertrained_text(one_below, TINY.topic_tokens, TINY.topic_window, levels,
                                                    "quick") == []
    assert fast_slow_report.topic_undertrained_text([], TINY.topic_tokens, TINY.topic_window, levels, "quick") == []
