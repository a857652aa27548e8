"""The ocl-baselines study's report.md and plots, made from results already measured."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from routemem.experiments.common import invocation_text, markdown_table, summarize

METRICS = (("final_average_accuracy", "final acc"), ("average_incremental_accuracy", "avg incremental acc"),
           ("forgetting", "forgetting"), ("backward_transfer", "BWT"), ("a_auc", "A_auc"))


def _stats(values: list, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    s = summarize(values)
    return f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if s["n"] > 1 else "")


def of(runs: list[dict], stream: str, method: str) -> list[dict]:
    return [r for r in runs if r["stream"] == stream and r["method"] == method]


def _table(runs: list[dict], stream: str, methods) -> str:
    rows = []
    for method in methods:
        done = of(runs, stream, method)
        rows.append([method, len(done), *(_stats([r["metrics"].get(key) for r in done]) for key, _ in METRICS),
                     _stats([r["train_images_per_second"] for r in done], 0)])
    return markdown_table(["method", "runs", *(label for _, label in METRICS), "train images/s"], rows)


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
        "`routemem/experiments/ocl_baselines.py` before the runs.",
        "",
        markdown_table(["claim", "verdict", "why"],
                       [[f"{c['statement']} (`{c['id']}`)", c["verdict"], c["why"]] for c in results["claims"]]),
    ]
    for stream in streams:
        first = next(r for r in runs if r["stream"] == stream)
        lines += ["", f"## {stream} stream", "",
                  f"{first['n_classes']} classes, {first['train_samples']} training samples, {setting.n_tasks} tasks; "
                  "accuracies are fractions, mean ± std over seeds; forgetting and BWT from the accuracy matrix "
                  "(avalanche / mammoth definitions, train/continual_metrics.py); A_auc: the anytime-accuracy "
                  f"curve ({setting.anytime_points} evaluations on the classes seen so far) averaged over the stream.",
                  "", _table(runs, stream, setting.methods)]
    lines += ["", "Plots: `accuracy_matrices.png` (R[i, j], mean over seeds, per stream and method), "
              "`anytime.png` (accuracy on the classes seen so far along each stream)."]
    return "\n".join(lines) + "\n"


def plots(study_dir: Path, setting, runs: list[dict], streams) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = setting.methods
    fig, axes = plt.subplots(len(streams), len(methods), figsize=(2.3 * len(methods), 2.4 * len(streams)),
                             squeeze=False)
    for row, stream in zip(axes, streams):
        for ax, method in zip(row, methods):
            done = of(runs, stream, method)
            if done:
                stack = np.array([[[np.nan if v is None else v for v in line] for line in r["accuracy_matrix"]]
                                  for r in done], dtype=float)
                measured = np.isfinite(stack).sum(0)  # above the diagonal: never measured
                R = np.where(measured > 0, np.nansum(stack, 0) / np.maximum(measured, 1), np.nan)
                ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
                for (i, j), value in np.ndenumerate(R):
                    if np.isfinite(value):
                        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="w")
            ax.set(title=f"{stream}: {method}", xlabel="task j", ylabel="after task i")
            ax.title.set_fontsize(8)
    fig.tight_layout()
    fig.savefig(study_dir / "accuracy_matrices.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(streams), figsize=(5.2 * len(streams), 3.6), squeeze=False)
    for ax, stream in zip(axes[0], streams):
        for method in methods:
            done = of(runs, stream, method)
            if done:
                curves = np.array([r["anytime_accuracy"] for r in done], dtype=float)
                ax.plot(done[0]["anytime_samples"], curves.mean(0), marker="o", ms=2, label=method)
        ax.set(title=f"{stream} stream", xlabel="stream samples seen", ylabel="accuracy on seen classes", ylim=(0, 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(study_dir / "anytime.png", dpi=110)
    plt.close(fig)
