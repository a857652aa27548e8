"""The rwf study: its claim rules on made-up runs (every verdict each rule gives), the ablation
summary, the prompt-similarity diagnostic, a tiny end-to-end study (every stream but digits, every
arm, report and plots), and resuming from the CLI without retraining."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

import pytest
import torch

from routemem.cli import main
from routemem.experiments.ocl_baselines import protocol as ocl_baselines
from routemem.experiments.rwf import protocol as rwf
from routemem.experiments.rwf import claims as rwf_claims
from routemem.experiments.shared.cache import RunCache
from routemem.experiments.shared.common import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED

TINY = replace(rwf.QUICK, d_model=32, n_layer=2, n_head=2, patch_size=8, image_size=16, pretrain_steps=4,
               pretrain_batch=16, pretrain_samples=4, pretrain_classes=12, glyph_classes=6, glyph_samples=10,
               n_tasks=3, anytime_points=3, seeds=(0,), shots=3, diagnostic_samples=12)
PROMPTS = ("l2p", "dualprompt", "coda-prompt")


def fake(method: str, finals: list[float], aucs: list[float] | None = None, stream: str = "glyphs") -> list[dict]:
    aucs = aucs or finals
    return [{"stream": stream, "method": method, "seed": s, "metrics": {"final_average_accuracy": f, "a_auc": a}}
            for s, (f, a) in enumerate(zip(finals, aucs))]


HIGH, LOW, WIDE = [0.6, 0.62, 0.61], [0.2, 0.22, 0.21], [0.1, 0.9, 0.5]


def head_to_head(stream: str, baseline_finals: list[float], baseline_aucs: list[float] | None = None,
                 odd_one: str = "coda-prompt") -> list[dict]:
    """rwf HIGH against l2p and dualprompt LOW; ``odd_one`` gets the given numbers."""
    runs = fake("rwf", HIGH, stream=stream)
    for baseline in PROMPTS:
        runs += fake(baseline, baseline_finals, baseline_aucs, stream) if baseline == odd_one else \
            fake(baseline, LOW, stream=stream)
    return runs


def verdict(runs: list[dict], claim_id: str, ablations=()) -> dict:
    return next(c for c in rwf_claims.claims(runs, list(ablations)) if c["id"] == claim_id)


@pytest.mark.parametrize("stream, claim_id", [("glyphs", "rwf_beats_prompts_glyphs"),
                                              ("glyphs-fewshot", "rwf_beats_prompts_fewshot")])
def test_rwf_beats_prompt_baselines_rule_every_verdict(stream, claim_id):
    win = verdict(head_to_head(stream, LOW), claim_id)
    assert win["verdict"] == REPRODUCED and len(win["pairs"]) == 6
    assert {(p["baseline"], p["metric"]) for p in win["pairs"]} == {(b, m) for b in PROMPTS
                                                                    for m in ("final_average_accuracy", "a_auc")}
    # one baseline better on A_auc only: one pair against refutes the claim
    against = verdict(head_to_head(stream, LOW, baseline_aucs=[0.9, 0.91, 0.92]), claim_id)
    assert against["verdict"] == NOT_REPRODUCED and "coda-prompt (a_auc)" in against["why"]
    assert verdict(head_to_head(stream, WIDE), claim_id)["verdict"] == INCONCLUSIVE  # overlapping intervals
    missing = verdict([r for r in head_to_head(stream, LOW) if r["method"] != "l2p"], claim_id)
    assert missing["verdict"] == INCONCLUSIVE and "missing runs" in {p["why"] for p in missing["pairs"]}
    other = "glyphs" if stream != "glyphs" else "glyphs-fewshot"
    assert verdict(head_to_head(other, LOW), claim_id)["verdict"] == INCONCLUSIVE  # the other stream's runs


def test_ablation_rule_every_verdict_and_the_summary():
    arms = ["rwf:blocks-0", "rwf:static", "rwf:steps-3", "rwf:train-output"]
    runs = (fake("rwf", HIGH) + fake("rwf:blocks-0", LOW) + fake("rwf:static", [0.5, 0.51, 0.52])
            + fake("rwf:steps-3", WIDE) + fake("rwf:train-output", [0.8, 0.81, 0.82]))
    got = {c["id"]: c["verdict"] for c in rwf_claims.claims(runs, arms)[2:]}
    assert got == {"ablation_blocks_0": REPRODUCED, "ablation_static": REPRODUCED,
                   "ablation_steps_3": INCONCLUSIVE, "ablation_train_output": NOT_REPRODUCED}
    summary = rwf_claims.ablation_summary(runs, arms)
    assert summary.startswith("The largest loss comes from blocks-0")  # 0.61 - 0.21, the largest drop
    assert "beyond the seeds' spread: blocks-0, static" in summary
    assert "within the seeds' spread of the default: steps-3" in summary
    assert "better than the default: train-output" in summary
    assert rwf_claims.ablation_summary(runs, ["rwf:train-output"]).startswith("No ablation scores below")
    assert verdict(fake("rwf", HIGH), "ablation_static", ["rwf:static"])["why"] == "missing runs"
    assert rwf_claims.ablation_summary(fake("rwf:static", LOW), ["rwf:static"]).startswith("No ablation can")


def test_only_the_train_output_ablation_cites_the_output_projection():
    arms = [rwf.arm_name(name) for name in rwf.ABLATIONS]
    papers = {c["id"]: c["paper"]["ours"] for c in rwf_claims.claims(fake("rwf", HIGH), arms)[2:]}
    assert set(papers) == {f"ablation_{name.replace('-', '_')}" for name in rwf.ABLATIONS}
    assert [i for i, text in papers.items() if "output projection" in text] == ["ablation_train_output"]
    assert all(text.startswith("not in the abstract") for text in papers.values())
    assert set(rwf_claims.ABLATION_PAPER) == set(rwf.ABLATIONS)  # every ablation says its own


def test_rwf_arms_are_the_six_shared_baselines_and_rwf():
    assert rwf.METHODS == ("linear-probe", "finetune", "er", "l2p", "dualprompt", "coda-prompt", "rwf")
    assert rwf.QUICK.methods == rwf.FULL.methods == rwf.METHODS  # ocl-baselines' linear-probe-task is not here


def test_prompt_similarity_separates_classes_and_ignores_the_shared_part():
    torch.manual_seed(0)
    direction = torch.randn(2, 3, 8)
    shared = 100 * torch.randn(3, 8)  # a large common part: centring removes it
    labels = [0, 0, 0, 1, 1, 1]
    prompts = shared + torch.stack([direction[c] for c in labels]) + 1e-3 * torch.randn(6, 3, 8)
    s = rwf_claims.prompt_similarity(prompts, labels)
    assert s["within_class_cosine"] == pytest.approx(1.0, abs=1e-3)
    assert s["between_class_cosine"] == pytest.approx(-1.0, abs=1e-3)  # two centred clusters point apart
    assert s["class_separation"] == pytest.approx(2.0, abs=2e-3)
    unrelated = rwf_claims.prompt_similarity(torch.randn(40, 3, 8), [i % 4 for i in range(40)])
    assert abs(unrelated["class_separation"]) < 0.1
    alone = rwf_claims.prompt_similarity(torch.randn(3, 2, 4), [0, 1, 2])  # no two images share a class
    assert math.isnan(alone["within_class_cosine"])


def test_tiny_study_writes_every_stream_arm_claim_and_diagnostic(tmp_path, monkeypatch):
    monkeypatch.setattr(rwf, "digits_available", lambda: False)  # the skip path, and the largest stream spared
    results = rwf.run(out=tmp_path, setting=TINY, device="cpu")
    study = tmp_path / "rwf"
    on_disk = json.loads((study / "results.json").read_text())
    arms = ["rwf:blocks-0", "rwf:blocks-all", "rwf:steps-3", "rwf:static", "rwf:train-queries", "rwf:train-output"]
    assert [c["id"] for c in on_disk["claims"]] == [
        "rwf_beats_prompts_glyphs", "rwf_beats_prompts_fewshot",
        *(f"ablation_{a.split(':')[1].replace('-', '_')}" for a in arms)]
    assert on_disk["data"]["streams"] == ["glyphs", "glyphs-fewshot", "glyphs-blurry"]
    assert on_disk["data"]["skipped"] == ["digits"]
    # on 2 blocks the default prompts block 0 only: "1 block" is the default, "all" is [0, 1]
    assert on_disk["ablations"]["skipped"] == {"blocks-1": "the default already prompts blocks [0]"}
    assert on_disk["ablations"]["arms"]["rwf:blocks-all"] == {"layers": [0, 1]}
    ran = {(r["stream"], r["method"]) for r in results["runs"]}
    assert ran == {(s, m) for s in on_disk["data"]["streams"] for m in rwf.METHODS} | {("glyphs", a) for a in arms}
    by = {(r["stream"], r["method"]): r for r in results["runs"]}
    assert by["glyphs-fewshot", "er"]["train_samples"] == TINY.glyph_classes * TINY.shots
    assert by["glyphs-blurry", "l2p"]["stream_settings"]["blurry_share"] == TINY.blurry_share
    assert by["glyphs", "rwf:steps-3"]["options"]["steps"] == 3 and by["glyphs", "rwf:steps-3"]["base_method"] == "rwf"
    for key in [("glyphs", "rwf"), ("glyphs-fewshot", "rwf"), ("glyphs", "rwf:blocks-all")]:
        blocks = by[key]["retrieval"]["blocks"]
        assert sorted(blocks) == (["0", "1"] if key[1] == "rwf:blocks-all" else ["0"])
        assert all(0 < b["normalized_entropy"] <= 1 and -1 <= b["between_class_cosine"] <= 1 for b in blocks.values())
    assert by["glyphs", "rwf:static"]["retrieval"] is None and by["glyphs", "rwf:blocks-0"]["retrieval"] is None
    assert "retrieval" not in by["glyphs", "l2p"]
    report = (study / "report.md").read_text()
    for section in ("## Claims", "## glyphs-fewshot stream", "## Ablations of RwF", "## Retrieval diagnostics",
                    "Where the gain comes from:", "Skipped: digits", "runs reused from the cache"):
        assert section in report
    assert "+-" not in report and "units reused" not in report  # one wording across the reports
    for plot in ("accuracy_matrices.png", "anytime.png", "ablations/accuracy_matrices.png", "ablations/anytime.png"):
        assert (study / plot).stat().st_size > 0


def test_cli_reproduce_rwf_resumes_without_retraining(tmp_path, monkeypatch, capsys):
    small = replace(TINY, methods=("l2p", "rwf"), streams=("glyphs",), ablations=("static",))
    monkeypatch.setattr(rwf, "QUICK", small)
    assert main(["reproduce", "rwf", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "report:" in out and "Default RwF beats a learned static prompt" in out
    monkeypatch.setattr(rwf, "stream_unit", lambda *a: pytest.fail("a cached run was trained again"))
    monkeypatch.setattr(rwf, "pretrain_backbone", lambda *a: pytest.fail("the backbone was trained again"))
    again = rwf.run(out=tmp_path, quick=True)
    assert again["runs_reused"] == 4  # the backbone, l2p, rwf and rwf:static


def test_the_backbone_is_copied_from_ocl_baselines_only_when_its_fields_match(tmp_path, monkeypatch):
    theirs = replace(ocl_baselines.QUICK, **{f: getattr(TINY, f) for f in rwf.BACKBONE_FIELDS}, anytime_points=5)
    source = tmp_path / "ocl-baselines"
    record = ocl_baselines.pretrain_backbone(theirs, str(source))
    RunCache(source / "runs", asdict(theirs)).put("backbone", record, {"device": "cpu", "cpu": "elsewhere"})
    trained = []

    def pretrain(*args):
        trained.append(args)
        return ocl_baselines.pretrain_backbone(*args)

    monkeypatch.setattr(rwf, "pretrain_backbone", pretrain)
    small = replace(TINY, methods=("linear-probe",), streams=("glyphs",), ablations=())
    results = rwf.run(out=tmp_path, setting=small, device="cpu")
    assert not trained and results["backbone"]["copied_from"] == str(source / "runs" / "backbone-vit.safetensors")
    assert (tmp_path / "rwf" / "runs" / "backbone-vit.safetensors").read_bytes() == \
        (source / "runs" / "backbone-vit.safetensors").read_bytes()
    assert results["runs_reused"] == 1 and {"cpu": "elsewhere"}.items() <= results["execution"]["trained_on"][0].items()
    # one backbone field differs: pretrained here, nothing copied
    (tmp_path / "rwf" / "runs" / "backbone-vit.safetensors").unlink()
    results = rwf.run(out=tmp_path, setting=replace(small, pretrain_steps=TINY.pretrain_steps + 1), device="cpu")
    assert len(trained) == 1 and "copied_from" not in results["backbone"]
