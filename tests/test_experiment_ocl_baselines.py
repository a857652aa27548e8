"""The ocl-baselines study: its claim rules on made-up runs, a tiny end-to-end study (backbone,
every method on the glyph stream, report and plots), and resuming without retraining."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from routemem.cli import main
from routemem.experiments.ocl_baselines import protocol as ocl_baselines
from routemem.experiments.ocl_baselines import report as ocl_report
from routemem.experiments.shared import vit_stream
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
    masked = next(r for r in results["runs"] if r["method"] == "linear-probe-task")
    assert masked["base_method"] == "linear-probe" and masked["options"]["train_mask"] == "task"
    probe = next(r for r in results["runs"] if r["method"] == "linear-probe")
    assert probe["base_method"] == "linear-probe" and probe["options"]["train_mask"] == "seen"
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
    assert "| linear-probe-task |" in report and "The `linear-probe-task` row is the linear probe" in report
    assert "runs reused from the cache" in report and "units reused" not in report
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


def test_the_task_mask_row_sits_beside_the_shared_baselines_only():
    assert set(ocl_baselines.METHODS) == set(vit_stream.METHODS) | set(ocl_baselines.VARIANTS)
    assert ocl_baselines.QUICK.methods == ocl_baselines.FULL.methods == ocl_baselines.METHODS
    assert "linear-probe-task" not in vit_stream.METHODS  # rwf's arms (vit_stream.METHODS + rwf) unchanged
    assert ocl_baselines.VARIANTS["linear-probe-task"] == ("linear-probe", {"train_mask": "task"})


def test_mask_text_says_what_the_row_is_and_how_far_the_mask_moves_the_probe():
    runs = (fake("linear-probe", [0.26, 0.27]) + fake("linear-probe-task", [0.54, 0.56])
            + fake("coda-prompt", [0.56, 0.56]) + fake("l2p", [0.4, 0.4]))
    assert "current task's classes" in ocl_report.mask_text(ocl_baselines.METHODS)[1]
    numbers = ocl_report.mask_numbers(runs, "glyphs", ocl_baselines.METHODS)[1]
    assert "linear-probe 0.265, linear-probe-task 0.550, coda-prompt (the best prompt method) 0.560" in numbers
    assert "moves the probe by +0.285; coda-prompt is +0.295 from the probe" in numbers
    assert ocl_report.mask_numbers(runs, "digits", ocl_baselines.METHODS) == []  # no runs on that stream
    assert ocl_report.mask_text(("linear-probe", "er")) == []  # no such row: nothing said
    assert ocl_report.mask_numbers(runs, "glyphs", ("linear-probe", "coda-prompt")) == []


def test_anytime_plot_shows_every_method_even_where_curves_coincide(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from matplotlib.figure import Figure

    from routemem.experiments.shared.stream_report import method_styles, plots

    methods = (*ocl_baselines.METHODS, "rwf")
    styles = method_styles(methods)
    assert len({(s["color"], s["marker"], s["linestyle"]) for s in styles.values()}) == len(methods)
    widths = [styles[m]["lw"] for m in methods]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == len(methods)  # wider ones drawn first
    assert [styles[m]["zorder"] for m in methods] == sorted(styles[m]["zorder"] for m in methods)
    same = [0.9, 0.6, 0.4]  # every method the same curve: nothing may hide a method
    runs = [{"stream": "glyphs", "method": m, "seed": 0, "anytime_samples": [10, 20, 30], "anytime_accuracy": same,
             "accuracy_matrix": [[0.5]]} for m in methods]
    drawn = {}

    def record(fig, path, **_):
        if path.name != "anytime.png":
            return
        ax = fig.axes[0]
        drawn[path.name] = ([t.get_text() for t in ax.get_legend().get_texts()],
                            [(line.get_marker(), line.get_linestyle(), line.get_linewidth()) for line in ax.lines],
                            [list(line.get_ydata()) for line in ax.lines])

    monkeypatch.setattr(Figure, "savefig", record)
    plots(tmp_path, SimpleNamespace(methods=methods), runs, ("glyphs",))
    legend, looks, values = drawn["anytime.png"]
    assert legend == list(methods) and len(set(looks)) == len(methods)
    assert all(v == same for v in values)  # the data as measured: no offsets
