"""The ocl-baselines study: its claim rules on made-up runs, a tiny end-to-end study (backbone,
every method on the glyph stream, report and plots), and resuming without retraining."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from routemem.cli import main
from routemem.experiments.ocl_baselines import protocol as ocl_baselines
from routemem.experiments.shared.common import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED

TINY = replace(ocl_baselines.QUICK, d_model=32, n_layer=2, n_head=2, patch_size=8, image_size=16, pretrain_steps=4,
               pretrain_batch=16, pretrain_samples=4, pretrain_classes=12, glyph_classes=6, glyph_samples=10,
               n_tasks=3, anytime_points=3, seeds=(0,), streams=("glyphs",))


def fake(method: str, finals: list[float], forgetting: list[float] | None = None) -> list[dict]:
    forgetting = forgetting or [0.1] * len(finals)
    return [{"stream": "glyphs", "method": method, "seed": s,
             "metrics": {"final_average_accuracy": a, "forgetting": f}} for s, (a, f) in enumerate(zip(finals, forgetting))]


def verdicts(runs: list[dict]) -> dict[str, str]:
    return {c["id"]: c["verdict"] for c in ocl_baselines.claims(runs)}


def test_claim_rules_every_verdict():
    expected = (fake("er", [0.6, 0.62, 0.61], [0.1, 0.12, 0.11]) + fake("finetune", [0.2, 0.22, 0.21], [0.7, 0.72, 0.71])
                + fake("linear-probe", [0.3, 0.31, 0.32]) + fake("l2p", [0.5, 0.52, 0.51]) + fake("dualprompt", [0.1, 0.1, 0.1])
                + fake("coda-prompt", [0.2, 0.2, 0.2]))
    assert set(verdicts(expected).values()) == {REPRODUCED}
    claim = ocl_baselines.claims(expected)[2]
    assert "(l2p)" in claim["description"] and claim["measured"]["ours"]["mean"] == pytest.approx(0.51)
    reversed_ = (fake("er", [0.2, 0.21, 0.22], [0.7, 0.71, 0.72]) + fake("finetune", [0.6, 0.61, 0.62], [0.1, 0.11, 0.12])
                 + fake("linear-probe", [0.6, 0.61, 0.62]) + fake("l2p", [0.2, 0.2, 0.21]))
    assert set(verdicts(reversed_).values()) == {NOT_REPRODUCED}
    assert set(verdicts(fake("er", [0.5])).values()) == {INCONCLUSIVE}  # missing arms, one seed


def test_tiny_study_writes_results_report_and_plots(tmp_path):
    results = ocl_baselines.run(out=tmp_path, setting=TINY, device="cpu")
    study = tmp_path / "ocl-baselines"
    on_disk = json.loads((study / "results.json").read_text())
    assert [c["id"] for c in on_disk["claims"]] == ["replay_beats_finetune", "finetune_forgets", "prompts_beat_linear_probe"]
    assert sorted(r["method"] for r in results["runs"]) == sorted(ocl_baselines.METHODS)
    for run in results["runs"]:
        R = run["accuracy_matrix"]
        assert len(R) == TINY.n_tasks and all(0 <= R[i][j] <= 1 for i in range(TINY.n_tasks) for j in range(i + 1))
        assert all(R[i][j] is None for i in range(TINY.n_tasks) for j in range(i + 1, TINY.n_tasks))
        assert run["train_samples"] == TINY.glyph_classes * 8  # 10 per class, 20% held out
    assert results["backbone"]["n_classes"] == TINY.pretrain_classes
    assert (study / "runs" / "backbone-vit.safetensors").stat().st_size > 0
    sidecar = json.loads((study / "runs" / "backbone-vit.json").read_text())  # pretrain-vit's sidecar ...
    cached = json.loads((study / "runs" / "backbone.json").read_text())  # ... and the run cache's record
    assert sidecar["val_accuracy"] == cached["run"]["val_accuracy"] and "setting" in cached
    report = (study / "report.md").read_text()
    assert "## Claims" in report and "## glyphs stream" in report
    for plot in ("accuracy_matrices.png", "anytime.png"):
        assert (study / plot).stat().st_size > 0


def test_cli_reproduce_ocl_baselines_resumes_without_retraining(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ocl_baselines, "QUICK", replace(TINY, methods=("linear-probe", "er")))
    assert main(["reproduce", "ocl-baselines", "--quick", "--out", str(tmp_path)]) == 0
    assert "report:" in capsys.readouterr().out
    monkeypatch.setattr(ocl_baselines, "stream_unit", lambda *a: pytest.fail("a cached run was trained again"))
    monkeypatch.setattr(ocl_baselines, "pretrain_backbone", lambda *a: pytest.fail("the backbone was trained again"))
    again = ocl_baselines.run(out=tmp_path, quick=True)
    assert again["runs_reused"] == 3  # the backbone and two runs
