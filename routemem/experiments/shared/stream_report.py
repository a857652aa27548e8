"""Tables and plots of online class-incremental runs, shared by the ocl-baselines and rwf reports:
one accuracy table per stream, the mean accuracy matrices and the anytime-accuracy curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from routemem.experiments.shared.common import markdown_table, summarize

METRICS = (("final_average_accuracy", "final acc"), ("average_incremental_accuracy", "avg incremental acc"),
           ("forgetting", "forgetting"), ("backward_transfer", "BWT"), ("a_auc", "A_auc"))


MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")


def method_styles(methods) -> dict[str, dict]:
    """Each method's anytime curve: its own colour, marker (hollow) and line style, and a line width
    and marker size that shrink along the list while the drawing order rises. Methods whose curves
    coincide (the same accuracies) then still all show: a thinner line drawn over a wider one,
    markers of other shapes and sizes on the same points. Nothing moves a point off its value."""
    last = max(len(methods) - 1, 1)
    return {m: {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)],
                "linestyle": LINESTYLES[i % len(LINESTYLES)],
                "lw": 1.0 + 3.0 * (last - i) / last, "ms": 3.5 + 6.0 * (last - i) / last, "mfc": "none",
                "alpha": 0.85, "zorder": 2 + i}
            for i, m in enumerate(methods)}


def stats_text(values: list, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    s = summarize(values)
    return f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if s["n"] > 1 else "")


def of(runs: list[dict], stream: str, method: str) -> list[dict]:
    return [r for r in runs if r["stream"] == stream and r["method"] == method]


def accuracy_table(runs: list[dict], stream: str, methods) -> str:
    rows = []
    for method in methods:
        done = of(runs, stream, method)
        rows.append([method, len(done), *(stats_text([r["metrics"].get(key) for r in done]) for key, _ in METRICS),
                     stats_text([r["train_images_per_second"] for r in done], 0)])
    return markdown_table(["method", "runs", *(label for _, label in METRICS), "train images/s"], rows)


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

    styles = method_styles(methods)
    fig, axes = plt.subplots(1, len(streams), figsize=(5.2 * len(streams), 3.6), squeeze=False)
    for ax, stream in zip(axes[0], streams):
        for method in methods:
            done = of(runs, stream, method)
            if done:
                curves = np.array([r["anytime_accuracy"] for r in done], dtype=float)
                ax.plot(done[0]["anytime_samples"], curves.mean(0), label=method, **styles[method])
        ax.set(title=f"{stream} stream", xlabel="stream samples seen", ylabel="accuracy on seen classes", ylim=(0, 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(study_dir / "anytime.png", dpi=110)
    plt.close(fig)
