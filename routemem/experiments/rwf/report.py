"""The rwf study's report.md and plots, made from results already measured (the per-stream tables
and plots are ocl-baselines' own, with rwf among the methods)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from routemem.experiments.shared.common import invocation_text, markdown_table, summarize
from routemem.experiments.shared.stream_report import accuracy_table, plots as stream_plots
from routemem.experiments.rwf.claims import ABLATION_MEANING

STREAM_TEXT = {
    "glyphs": "tasks of disjoint glyph classes",
    "digits": "scikit-learn's handwritten digits, tasks of disjoint classes",
    "glyphs-fewshot": "the glyph stream with {shots} training samples per class (the test set unchanged)",
    "glyphs-blurry": "Si-Blurry-style: {disjoint:.0%} of the classes disjoint, {blurry:.0%} of each blurry class's "
                     "samples in other tasks",
}
DIAGNOSTICS = (("normalized_entropy", "entropy / log T"), ("max_weight", "max weight"),
               ("within_class_cosine", "cos within class"), ("between_class_cosine", "cos between classes"),
               ("class_separation", "separation"))


def _stats(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    s = summarize(values)
    return f"{s['mean']:.3f}" + (f" ± {s['std']:.3f}" if s["n"] > 1 else "")


def _claims_section(results: dict) -> list[str]:
    lines = ["## Claims", "",
             ("Rules fixed in `routemem/experiments/rwf/protocol.py` and `rwf/claims.py` before the runs: the shared "
             "directional rule (means apart in the claimed direction with mean ± std intervals disjoint; fewer "
             "than two seeds: inconclusive); claims (1) and (2) combine one verdict per (prompt baseline, metric) "
             "pair: all reproduced -> reproduced, any against -> not reproduced, else inconclusive."), "",
             markdown_table(["claim", "verdict", "why"],
                            [[f"{c['statement']} (`{c['id']}`)", c["verdict"], c["why"]] for c in results["claims"]])]
    for claim in results["claims"]:
        if "pairs" in claim:
            lines += ["", f"`{claim['id']}`, pair by pair:", "",
                      markdown_table(["baseline", "metric", "verdict", "rwf vs baseline"],
                                     [[p["baseline"], p["metric"], p["verdict"], p["why"]] for p in claim["pairs"]])]
    return lines


def _ablation_section(results: dict, setting) -> list[str]:
    ablations = results["ablations"]
    arms = list(ablations["arms"])
    if not arms:
        return []
    runs, stream = results["runs"], ablations["stream"]
    changes = "; ".join(f"`{arm}`: {ABLATION_MEANING.get(arm.split(':', 1)[1], arm)} "
                        f"({', '.join(f'{k}={v}' for k, v in options.items())})"
                        for arm, options in ablations["arms"].items())
    lines = ["", f"## Ablations of RwF ({stream} stream)", "", f"Each arm changes one option of `rwf`: {changes}.",
             "", accuracy_table(runs, stream, ["rwf", *arms]), "",
             f"Where the gain comes from: {results['ablation_summary']}"]
    if ablations["skipped"]:
        lines += ["", "Not run (the same as the default here): "
                  + "; ".join(f"{name} ({why})" for name, why in ablations["skipped"].items()) + "."]
    return lines


def _diagnostics_section(results: dict) -> list[str]:
    runs = [r for r in results["runs"] if r.get("retrieval")]
    if not runs:
        return []
    rows = []
    keys = sorted({(r["stream"], r["method"], block) for r in runs for block in r["retrieval"]["blocks"]},
                  key=lambda k: (results["data"]["streams"].index(k[0]), k[1], int(k[2])))
    for stream, arm, block in keys:
        done = [r["retrieval"] for r in runs
                if r["stream"] == stream and r["method"] == arm and block in r["retrieval"]["blocks"]]
        rows.append([stream, arm, block, done[0]["samples"],
                     *(_stats([d["blocks"][block][key] for d in done]) for key, _ in DIAGNOSTICS)])
    return ["", "## Retrieval diagnostics", "",
            ("At the end of each rwf run with retrieval, one forward pass over the test images in column "
            "`images` (the same number from each class, at least 2, a seeded draw): per prompted block, the entropy of the retrieval weights over the block's "
            "T tokens divided by log T (1 = uniform, 0 = one token), the mean largest weight, and how the "
            "prompts differ across classes: each image's prompts flattened and centred on the mean over the "
            "images, the mean cosine between images of the same class and of different classes, and their "
            "difference (> 0: prompts carry class information). Mean ± std over seeds."), "",
            markdown_table(["stream", "arm", "block", "images", *(label for _, label in DIAGNOSTICS)], rows)]


def report(results: dict, setting) -> str:
    runs, backbone = results["runs"], results["backbone"]
    streams = results["data"]["streams"]
    lines = [
        f"# Routing without Forgetting against the online baselines ({results['mode']})",
        "",
        (f"A ViT (d_model {setting.d_model}, {setting.n_layer} layers, {setting.n_head} heads, patch "
        f"{setting.patch_size}, {setting.image_size}x{setting.image_size} grayscale) pretrained for "
        f"{setting.pretrain_steps} steps of {setting.pretrain_batch} images on {backbone['n_classes']} glyph "
        f"pretraining classes (ocl-baselines' protocol): validation accuracy {backbone['val_accuracy']:.3f} "
        f"(chance {backbone['chance']:.4f}). RwF and the six baselines then learn each stream online from that "
        f"backbone: {setting.n_tasks} tasks, batches of {setting.batch_size}, one pass, no task ids at test time; "
        f"seeds {list(setting.seeds)}. This invocation took {invocation_text(results)}."),
        "",
        *([("Quick mode is a smoke test of the whole pipeline (a small backbone, few classes, two seeds); its "
           "verdicts say nothing about the paper."), ""] if results["mode"] == "quick" else []),
        *([f"Skipped: {', '.join(results['data']['skipped'])} (scikit-learn is not installed).", ""]
          if results["data"]["skipped"] else []),
        *_claims_section(results),
    ]
    for stream in streams:
        first = next(r for r in runs if r["stream"] == stream)
        about = STREAM_TEXT.get(stream, stream).format(shots=setting.shots, disjoint=setting.disjoint_share,
                                                       blurry=setting.blurry_share)
        lines += ["", f"## {stream} stream", "",
                  (f"{about}; {first['n_classes']} classes, {first['train_samples']} training samples. Accuracies "
                  "are fractions, mean ± std over seeds; forgetting and BWT from the accuracy matrix; A_auc: the "
                  f"anytime-accuracy curve ({setting.anytime_points} evaluations on the classes seen so far) "
                  "averaged over the stream."), "", accuracy_table(runs, stream, setting.methods)]
    lines += _ablation_section(results, setting)
    lines += _diagnostics_section(results)
    lines += ["", ("Plots: `accuracy_matrices.png` (R[i, j], mean over seeds, per stream and method), `anytime.png` "
              "(accuracy on the classes seen so far along each stream); the same for the ablations in "
              "`ablations/`.")]
    return "\n".join(lines) + "\n"


def plots(study_dir: Path, setting, runs: list[dict], streams, ablations: list[str]) -> None:
    stream_plots(study_dir, setting, runs, streams)
    if ablations:
        folder = Path(study_dir) / "ablations"
        folder.mkdir(parents=True, exist_ok=True)
        ablation_runs = [r for r in runs if r["stream"] == "glyphs" and r["base_method"] == "rwf"]
        stream_plots(folder, SimpleNamespace(methods=("rwf", *ablations)), ablation_runs, ("glyphs",))
