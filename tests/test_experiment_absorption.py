"""The absorption study: each claim rule on made-up runs (every verdict it can give), the arms'
shared initial weights, the distillation loss and its gradient path, the concentration measure, a
tiny end-to-end study with its report and plots, and the CLI resuming from the run cache."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from routemem.cli import main
from routemem.experiments.absorption import protocol as absorption
from routemem.experiments.absorption import claims as absorption_claims
from routemem.experiments.absorption import distill as absorption_distill
from routemem.experiments.shared.common import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED
from routemem.experiments.shared.text_lm import text_task
from routemem.ops.gated_sparse import attention_probs, gate_scores

TINY = replace(absorption.QUICK, d_model=32, n_head=2, seq_len=64, k=8, block_size=4, rank=4, batch_size=4, tokens=2_048,
               seeds=(0, 1), val_tokens=1_024, curve_points=2, curve_tokens=512, distill_steps=3, distill_batch=2,
               apn_pretrain_steps=3, apn_adapt_steps=2, bf16=False)


def lm_runs(losses: dict[str, list[float]]) -> list[dict]:
    return [{"arm": arm, "seed": seed, "metrics": {"val_loss": loss}} for arm, values in losses.items()
            for seed, loss in enumerate(values)]


# --- claim 1 ---------------------------------------------------------------------------------


def test_soft_gate_rule_every_verdict():
    same = lm_runs({"dense": [2.00, 2.01, 2.00], "soft-learned": [2.05, 2.06, 2.05], "soft-random": [2.05, 2.05, 2.06]})
    assert absorption_claims.soft_gate_claim(same)["verdict"] == REPRODUCED  # learned = random
    small = lm_runs({"dense": [2.00, 2.00, 2.00], "soft-learned": [2.17, 2.17, 2.17], "soft-random": [2.20, 2.20, 2.20]})
    claim = absorption_claims.soft_gate_claim(small)
    assert claim["verdict"] == REPRODUCED and claim["measured"]["share_closed"] == pytest.approx(0.15)
    closes = lm_runs({"dense": [2.00, 2.00, 2.00], "soft-learned": [2.05, 2.05, 2.05], "soft-random": [2.20, 2.20, 2.20]})
    claim = absorption_claims.soft_gate_claim(closes)
    assert claim["verdict"] == NOT_REPRODUCED and claim["measured"]["share_closed"] == pytest.approx(0.75)
    one_seed = lm_runs({"dense": [2.0], "soft-learned": [2.0], "soft-random": [2.2]})
    assert absorption_claims.soft_gate_claim(one_seed)["verdict"] == INCONCLUSIVE


# --- claim 2 ---------------------------------------------------------------------------------


def grad_runs(hard: list[float], soft: list[float]) -> list[dict]:
    def run(arm, norms):
        return {"arm": arm, "seed": 0, "metrics": {"val_loss": 2.0},
                "gate_grad": {"norm": norms, "with_grad": [0 if n == 0 else 4 for n in norms]}}
    return [run("hard", hard), run("soft-learned", soft)]


def test_zero_gradient_rule_every_verdict():
    assert absorption_claims.zero_gradient_claim(grad_runs([0.0] * 5, [0.3] * 5))["verdict"] == REPRODUCED
    leaked = absorption_claims.zero_gradient_claim(grad_runs([0.0, 1e-12, 0.0], [0.3] * 3))
    assert leaked["verdict"] == NOT_REPRODUCED and leaked["measured"]["hard_max_norm"] == 1e-12
    blind = absorption_claims.zero_gradient_claim(grad_runs([0.0] * 5, [0.0] * 5))
    assert blind["verdict"] == INCONCLUSIVE and "control" in blind["why"]


# --- claim 3 ---------------------------------------------------------------------------------


def distilled(source: str, own: list[float], deployed: list[float], f1: float) -> list[dict]:
    return [{"kind": "distill", "source": source, "seed": s, "own_loss": o, "deployed_loss": d, "oracle_loss": o,
             "f1": [f1, f1]} for s, (o, d) in enumerate(zip(own, deployed))]


def test_distillation_rule_every_verdict():
    dense_ok = distilled("dense", [1.50, 1.51, 1.52], [1.55, 1.56, 1.57], f1=0.8)
    coadapted = distilled("hard", [1.55, 1.56, 1.57], [2.50, 2.60, 2.55], f1=0.75)
    claim = absorption_claims.distillation_claim(dense_ok + coadapted)
    assert claim["verdict"] == REPRODUCED
    assert claim["measured"]["degradation"]["hard"]["mean"] == pytest.approx(0.99)
    worse_gate = distilled("hard", [1.55, 1.56, 1.57], [2.50, 2.60, 2.55], f1=0.3)
    assert absorption_claims.distillation_claim(dense_ok + worse_gate)["verdict"] == INCONCLUSIVE
    fine = distilled("hard", [1.55, 1.56, 1.57], [1.55, 1.56, 1.57], f1=0.8)
    assert absorption_claims.distillation_claim(dense_ok + fine)["verdict"] == NOT_REPRODUCED


# --- claims 4, 5, 6 --------------------------------------------------------------------------


def test_mask_randomisation_rule():
    worse = lm_runs({"dense": [2.00, 2.01, 2.02], "mask-random": [2.30, 2.31, 2.32]})
    assert absorption_claims.mask_randomisation_claim(worse, TINY)["verdict"] == REPRODUCED
    same = lm_runs({"dense": [2.00, 2.01, 2.02], "mask-random": [2.00, 2.02, 2.01]})
    assert absorption_claims.mask_randomisation_claim(same, TINY)["verdict"] == INCONCLUSIVE
    better = lm_runs({"dense": [2.30, 2.31, 2.32], "mask-random": [2.00, 2.01, 2.02]})
    assert absorption_claims.mask_randomisation_claim(better, TINY)["verdict"] == NOT_REPRODUCED


def test_concentration_rule():
    def runs(values):
        return [{"arm": "dense", "seed": s, "metrics": {"val_loss": 2.0}, "concentration": v} for s, v in enumerate(values)]

    high = absorption_claims.concentration_claim(runs([[0.95, 0.85], [0.93, 0.87]]), TINY)
    assert high["verdict"] == REPRODUCED and high["measured"]["overall"]["mean"] == pytest.approx(0.9)
    assert [s["mean"] for s in high["measured"]["per_layer"]] == pytest.approx([0.94, 0.86])
    assert absorption_claims.concentration_claim(runs([[0.9, 0.7]]), TINY)["verdict"] == NOT_REPRODUCED
    assert absorption_claims.concentration_claim([], TINY)["verdict"] == INCONCLUSIVE
    # a query i >= k spreading evenly keeps k / (i + 1): T = 64, k = 8
    expected = sum(8 / (i + 1) for i in range(8, 64)) / 56
    assert high["measured"]["uniform_reference"] == pytest.approx(expected)


def apn_runs(learned: list[float], random: list[float]) -> list[dict]:
    return [{"router": router, "arm": arm, "seed": s, "metrics": {"a_test_ppl": ppl, "b_test_ppl": ppl}}
            for router, values in (("learned", learned), ("random", random)) for s, ppl in enumerate(values)
            for arm in ("pretrain-apn", "apn-patches")]


def test_apn_router_rule_every_verdict():
    assert absorption_claims.apn_router_claim(apn_runs([5.00, 5.01, 5.02], [5.01, 5.02, 5.00]))["verdict"] == REPRODUCED
    learned_wins = absorption_claims.apn_router_claim(apn_runs([5.00, 5.01, 5.02], [6.00, 6.01, 6.02]))
    assert learned_wins["verdict"] == NOT_REPRODUCED
    assert learned_wins["measured"]["gap_random_learned"] == pytest.approx(math.log(6.01 / 5.01), rel=1e-3)
    # seed noise widens the margin: a 10% worse mean passes when the seeds scatter that much
    noisy = absorption_claims.apn_router_claim(apn_runs([5.0, 5.0, 5.0], [5.0, 5.4, 6.2]))
    assert noisy["verdict"] == REPRODUCED and noisy["measured"]["margin"] > noisy["measured"]["gap_random_learned"]
    assert absorption_claims.apn_router_claim(apn_runs([5.0], [5.0]))["verdict"] == INCONCLUSIVE


# --- models, distillation, concentration -----------------------------------------------------


def test_arms_share_the_dense_arms_initial_weights():
    dense = absorption.build_model(TINY, "dense", seed=3).state_dict()
    for arm in absorption.ARMS[1:]:
        model = absorption.build_model(TINY, arm, seed=3).state_dict()
        shared = [name for name in model if ".gate_" not in name]
        assert set(shared) == set(dense)
        assert all(torch.equal(model[name], dense[name]) for name in shared)
    assert absorption.model_config(TINY, "hard").mixer_kwargs["mode"] == "hard"
    assert absorption.model_config(TINY, "soft-random").mixer_kwargs["gate"] == "random"


def test_distill_loss_is_zero_exactly_when_the_gate_reproduces_the_attention_row():
    q, k = torch.randn(2, 6, 3, 4, dtype=torch.float64), torch.randn(2, 6, 3, 4, dtype=torch.float64)
    probs = attention_probs(q, k)
    logits = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) * 0.5  # head dim 4: scale 1/2
    assert absorption_distill.distill_loss(logits + 7.0, probs).item() == pytest.approx(0.0, abs=1e-12)
    assert absorption_distill.distill_loss(torch.zeros_like(logits), probs).item() > 0.01
    other = gate_scores(torch.randn(2, 6, 3, 2, dtype=torch.float64), torch.randn(2, 6, 3, 2, dtype=torch.float64))
    assert absorption_distill.distill_loss(other, probs).item() > 0.01


def test_distillation_trains_only_the_students_gate():
    source = absorption.build_model(TINY, "dense", seed=0)
    student = absorption_distill.student_model(absorption.model_config(TINY, "hard"), source, seed=0)
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(".gate_" in name for name in trainable)
    source_state = {n: v.clone() for n, v in source.state_dict().items()}
    wrapper = absorption_distill.GateDistillation(student, source)
    assert {n for n, _ in wrapper.named_parameters()} == {f"student.{n}" for n, _ in student.named_parameters()}
    _, loss = wrapper(torch.randint(0, 256, (2, TINY.seq_len)))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for n, p in student.named_parameters() if n in trainable)
    assert all(p.grad is None for p in source.parameters())
    assert all(torch.equal(v, source_state[n]) for n, v in source.state_dict().items())


def test_concentration_matches_the_mixers_own_statistic():
    model = absorption.build_model(TINY, "soft-learned", seed=0).eval()
    absorption_distill.set_deploy(model, "dense")
    inputs = torch.randint(0, 256, (2, TINY.seq_len), generator=torch.Generator().manual_seed(0))
    ours = absorption_distill.concentration(model, inputs, TINY.k)
    for block in model.blocks:
        block.mixer.track_stats = True
    with torch.no_grad():
        model(inputs)
    theirs = [block.mixer.metrics()["concentration"] for block in model.blocks]
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert all(TINY.k / TINY.seq_len < c < 1 for c in ours)
    assert absorption_distill.concentration(model, inputs, TINY.seq_len) == pytest.approx([1.0] * TINY.n_layer)


def test_hard_arm_logs_an_exactly_zero_gate_gradient_and_soft_a_positive_one():
    task = text_task(TINY, "pydocs", None, seed=0)
    for arm, positive in (("hard", False), ("soft-learned", True)):
        _, record = absorption.train_lm(replace(TINY, tokens=4 * TINY.batch_size * TINY.seq_len), arm, 0, "pydocs", None)
        norms = record["gate_grad"]["norm"]
        assert len(norms) == 4
        assert all(n > 0 for n in norms) if positive else all(n == 0.0 for n in norms)
    assert task.probe.shape[1] == TINY.seq_len


# --- the whole study -------------------------------------------------------------------------


def test_tiny_study_writes_six_claims_report_and_plots(tmp_path):
    results = absorption.run(out=tmp_path, setting=TINY, data_dir=None, device="cpu")
    study = tmp_path / "absorption"
    on_disk = json.loads((study / "results.json").read_text())
    assert [c["id"] for c in on_disk["claims"]] == [
        "soft_learned_vs_random", "hard_topk_zero_gradient", "distilled_gate_on_coadapted_model",
        "mask_randomisation_still_coadapts", "attention_concentration", "apn_random_router_matches_learned",
        "block_soft_learned_vs_random", "moba_absorbs_routing", "block_posthoc_gate_dense_vs_coadapted",
        "block_concentration"]
    assert all(c["verdict"] in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE) for c in on_disk["claims"])
    assert sorted(r["arm"] for r in results["runs"]) == sorted(absorption.ARMS * len(TINY.seeds))
    assert sorted((r["granularity"], r["source"], r["seed"]) for r in results["distilled"]) == [
        ("block", "block-hard", 0), ("block", "block-hard", 1), ("block", "dense", 0), ("block", "dense", 1),
        ("token", "dense", 0), ("token", "dense", 1), ("token", "hard", 0), ("token", "hard", 1)]
    assert all(len(r["f1"]) == TINY.n_layer and 0 <= min(r["f1"]) <= max(r["f1"]) <= 1 for r in results["distilled"])
    routers = sorted((r["router"], r["arm"]) for r in results["apn_runs"])
    assert routers == sorted([(router, arm) for router in ("learned", "random") for arm in ("pretrain-apn", "apn-patches")] * 2)
    assert on_disk["claims"][1]["verdict"] == REPRODUCED  # the zero gradient holds at any size
    report = (study / "report.md").read_text()
    for heading in ("## Claims", "## Language models", "## Gate distillation", "## Attention concentration",
                    "## Block routing", "## APN"):
        assert heading in report
    for plot in ("ppl_per_arm.png", "f1_vs_deployed_ppl.png", "concentration.png", "gate_grad_norm.png",
                 "block_concentration.png", "block_map.png"):
        assert (study / plot).stat().st_size > 0
    assert "runs reused from the cache" in report


@pytest.mark.parametrize("scale, values", [("log", [15.0, 19.0, 24.0]), ("log", [11.3, 11.45]),
                                           ("symlog", [0.0, 1e-5, 1.0])])
def test_log_axes_label_their_ticks_as_plain_numbers(scale, values):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from routemem.experiments.absorption.report import plain_log_ticks

    fig, ax = plt.subplots()
    ax.plot(range(len(values)), values)
    ax.set_yscale(scale, **({"linthresh": 1e-6} if scale == "symlog" else {}))
    plain_log_ticks(ax.yaxis)
    fig.canvas.draw()
    labels = [t.get_text() for minor in (False, True) for t in ax.get_yticklabels(minor=minor) if t.get_text()]
    plt.close(fig)
    assert labels and all(float(text) == float(f"{float(text):g}") for text in labels)  # each one a plain number
    if scale == "log":  # a narrow range: its minor ticks are labelled, as plain numbers
        assert [t for t in labels if float(t) not in (1.0, 10.0, 100.0)]


def test_cli_reproduce_absorption_quick_and_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(absorption, "QUICK", replace(TINY, seeds=(0,)))
    assert main(["reproduce", "absorption", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "report:" in out and "zero gradient" in out
    monkeypatch.setattr(absorption, "train_lm", lambda *args: pytest.fail("a cached unit was trained again"))
    monkeypatch.setattr(absorption.adaptation, "train_kind", lambda *args: pytest.fail("a cached unit was trained again"))
    again = absorption.run(out=tmp_path, quick=True)
    assert again["runs_reused"] == 10  # dense+hard+block-hard+distill, seven arms, two routers


# --- block granularity -----------------------------------------------------------------------


def test_block_arms_read_at_most_the_token_arms_k_keys_per_query():
    for setting in (absorption.FULL, absorption.QUICK, TINY):
        assert (setting.top_k_blocks + 1) * setting.block_size == setting.k
    assert absorption.model_config(TINY, "block-own").mixer_kwargs["top_k_blocks"] == 0  # the window control
    kwargs = absorption.model_config(TINY, "block-moba").mixer_kwargs
    assert (kwargs["granularity"], kwargs["gate"], kwargs["mode"]) == ("block", "moba", "hard")
    assert absorption.model_config(TINY, "block-soft-random").mixer_kwargs["gate"] == "random"


def test_block_claim_rules_every_verdict():
    def arms(dense, learned, random, moba):
        return lm_runs({"dense": dense, "block-soft-learned": learned, "block-soft-random": random,
                        "block-moba": moba})

    same = arms([2.00, 2.01, 2.02], [2.01, 2.00, 2.02], [2.02, 2.01, 2.00], [2.01, 2.02, 2.00])
    b1 = absorption_claims.soft_gate_claim(same, "block-soft-learned", "block-soft-random", "b1", " block")
    assert b1["verdict"] == REPRODUCED and b1["id"] == "b1"
    learned_wins = arms([2.00, 2.01, 2.02], [2.00, 2.01, 2.02], [2.50, 2.51, 2.52], [2.0] * 3)
    assert absorption_claims.soft_gate_claim(learned_wins, "block-soft-learned", "block-soft-random",
                                             "b1", " block")["verdict"] == NOT_REPRODUCED
    assert absorption_claims.moba_claim(same)["verdict"] == REPRODUCED
    worse = arms([2.00, 2.01, 2.02], [2.0] * 3, [2.0] * 3, [2.30, 2.31, 2.32])
    assert absorption_claims.moba_claim(worse)["verdict"] == NOT_REPRODUCED
    better = arms([2.30, 2.31, 2.32], [2.0] * 3, [2.0] * 3, [2.00, 2.01, 2.02])
    assert absorption_claims.moba_claim(better)["verdict"] == REPRODUCED
    assert absorption_claims.moba_claim(arms([2.0], [2.0], [2.0], [2.0]))["verdict"] == INCONCLUSIVE


def test_block_distillation_rule_reads_only_block_records():
    def block(source, own, deployed, f1):
        return [{**r, "granularity": "block"} for r in distilled(source, own, deployed, f1)]

    token_noise = distilled("dense", [9.0] * 3, [9.9] * 3, f1=0.1)  # must not enter the block claim
    dense_ok = block("dense", [1.50, 1.51, 1.52], [1.55, 1.56, 1.57], f1=0.8)
    coadapted = block("block-hard", [1.55, 1.56, 1.57], [2.50, 2.60, 2.55], f1=0.75)
    claim = absorption_claims.distillation_claim(token_noise + dense_ok + coadapted, "block")
    assert claim["verdict"] == REPRODUCED and claim["id"] == "block_posthoc_gate_dense_vs_coadapted"
    assert claim["measured"]["degradation"]["dense"]["mean"] == pytest.approx(0.05)
    fine = block("block-hard", [1.55, 1.56, 1.57], [1.55, 1.56, 1.57], f1=0.8)
    assert absorption_claims.distillation_claim(dense_ok + fine, "block")["verdict"] == NOT_REPRODUCED
    assert absorption_claims.distillation_claim(token_noise, "block")["verdict"] == INCONCLUSIVE


def test_block_concentration_rule():
    def runs(values):
        return [{"arm": "dense", "seed": s, "metrics": {"val_loss": 2.0}, "concentration": [0.5, 0.5],
                 "block_concentration": v} for s, v in enumerate(values)]

    high = absorption_claims.block_concentration_claim(runs([[0.95, 0.85], [0.93, 0.87]]), TINY)
    assert high["verdict"] == REPRODUCED and high["measured"]["overall"]["mean"] == pytest.approx(0.9)
    assert high["measured"]["token_level"]["mean"] == pytest.approx(0.5)
    assert absorption_claims.block_concentration_claim(runs([[0.6, 0.7]]), TINY)["verdict"] == NOT_REPRODUCED
    assert absorption_claims.block_concentration_claim([], TINY)["verdict"] == INCONCLUSIVE


def test_block_distill_loss_is_zero_exactly_when_the_gate_reproduces_the_block_mass():
    from routemem.ops.gated_sparse.block_select import block_attention_mass, past_block_mask

    q, k = torch.randn(2, 16, 3, 4, dtype=torch.float64), torch.randn(2, 16, 3, 4, dtype=torch.float64)
    mass = block_attention_mass(q, k, 4)
    past = past_block_mask(4)
    matching = mass.clamp_min(1e-300).log().masked_fill(~past, float("-inf")) + 3.0
    assert absorption_distill.block_distill_loss(matching, mass).item() == pytest.approx(0.0, abs=1e-12)
    assert absorption_distill.block_distill_loss(torch.zeros_like(mass), mass).item() > 1e-3


def test_block_distillation_trains_only_the_students_block_gate():
    source = absorption.build_model(TINY, "dense", seed=0)
    student = absorption_distill.student_model(absorption.model_config(TINY, "block-hard"), source, seed=0)
    assert all(b.mixer.block is not None for b in student.blocks)
    _, loss = absorption_distill.GateDistillation(student, source)(torch.randint(0, 256, (2, TINY.seq_len)))
    loss.backward()
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().max() > 0 for p in trainable)


def test_block_hard_arm_logs_zero_gate_gradient_and_a_block_map():
    _, record = absorption.train_lm(replace(TINY, tokens=3 * TINY.batch_size * TINY.seq_len), "block-hard", 0,
                                    "pydocs", None)
    assert record["gate_grad"]["norm"] == [0.0] * 3
    n = TINY.seq_len // TINY.block_size
    chosen = torch.tensor(record["block_map"])
    assert chosen.shape == (n, n) and torch.equal(chosen.diagonal(), torch.ones(n, dtype=chosen.dtype))
    assert torch.count_nonzero(chosen.triu(1)) == 0  # never a future block
    assert all(chosen[i].sum() == min(i, TINY.top_k_blocks) + 1 for i in range(n))
    assert len(record["block_concentration"]) == TINY.n_layer
