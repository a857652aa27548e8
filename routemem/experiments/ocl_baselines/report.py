"""The ocl-baselines study's report.md and plots, made from results already measured."""

from __future__ import annotations

from routemem.experiments.shared.common import invocation_text, markdown_table
from routemem.experiments.shared.stream_report import accuracy_table, plots

__all__ = ["plots", "report"]


def report(results: dict, setting) -> str:
    runs, backbone = results["runs"], results["backbone"]
    streams = results["data"]["streams"]
    lines = [
        f"# Online class-incremental baselines ({results['mode']})",
        "",
        f"A ViT (d_model {setting.d_model}, {setting.n_layer} layers, {setting.n_head} heads, patch "
        f"{setting.patch_size}, {setting.image_size}x{setting.image_size} grayscale) pretrained for "
        f"{setting.pretrain_steps} steps of {setting.pretrain_batch} images on {backbone['n_classes']} glyph "
        f"pretraining classes: validation accuracy {backbone['val_accuracy']:.3f} (chance {backbone['chance']:.4f}). "
        f"Each method then learns each stream online from that backbone: {setting.n_tasks} tasks of disjoint "
        f"classes, batches of {setting.batch_size}, one pass, no task ids at test time; seeds "
        f"{list(setting.seeds)} (class order and the method's fresh parameters). This invocation took "
        f"{invocation_text(results)}.",
        "",
        *(["Quick mode is a smoke test of the whole pipeline (a small backbone, few classes); the full run "
           "gives the reference table.", ""] if results["mode"] == "quick" else []),
        *([f"Skipped: {', '.join(results['data']['skipped'])} (scikit-learn is not installed).", ""]
          if results["data"]["skipped"] else []),
        "## Claims",
        "",
        "What the OCL literature expects of these baselines, on the glyph stream; rule: the shared directional "
        "rule (the means apart in the expected direction with mean ± std intervals disjoint), fixed in "
        "`routemem/experiments/ocl_baselines/claims.py` before the runs.",
        "",
        markdown_table(["claim", "verdict", "why"],
                       [[f"{c['statement']} (`{c['id']}`)", c["verdict"], c["why"]] for c in results["claims"]]),
    ]
    for stream in streams:
        first = next(r for r in runs if r["stream"] == stream)
        lines += ["", f"## {stream} stream", "",
                  f"{first['n_classes']} classes, {first['train_samples']} training samples, {setting.n_tasks} tasks; "
                  "accuracies are fractions, mean ± std over seeds; forgetting and BWT from the accuracy matrix "
                  "(avalanche / mammoth definitions, train/continual/metrics.py); A_auc: the anytime-accuracy "
                  f"curve ({setting.anytime_points} evaluations on the classes seen so far) averaged over the stream.",
                  "", accuracy_table(runs, stream, setting.methods)]
    lines += ["", "Plots: `accuracy_matrices.png` (R[i, j], mean over seeds, per stream and method), "
              "`anytime.png` (accuracy on the classes seen so far along each stream)."]
    return "\n".join(lines) + "\n"
