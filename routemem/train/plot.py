"""``loss.png``: train and val loss against tokens seen, drawn from a run's metrics.jsonl records."""

from __future__ import annotations

import io
from pathlib import Path

from routemem.fileio import write_bytes_atomic


def plot_loss(records: list[dict], path: str | Path, title: str = "") -> None:
    """Write the loss curves of ``records`` (``kind`` train / val) to ``path`` as a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed (and none on a cluster node)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    try:
        for kind, style in (("train", "-"), ("val", "o-")):
            points = [(r["tokens"], r["loss"]) for r in records if r.get("kind") == kind]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, label=kind, markersize=3)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
