"""The Palimpsa study's report.md and plots, made from results already measured."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from routemem.experiments.common import markdown_table, summarize


def _cell(runs: list[dict], key: str) -> str:
    if not runs:
        return "-"
    stats = summarize([r["metrics"][key] for r in runs])
    return f"{stats['mean']:.3f}" + (f" ± {stats['std']:.3f}" if stats["n"] > 1 else "")


def report(results: dict, setting, chosen: dict[str, list[dict]]) -> str:
    grid_keys = [f"acc_L{s}_kv{p}" for s, p in setting.test_grid]
    lines = [
        f"# Palimpsa on MQAR ({results['mode']})",
        "",
        f"{setting.n_layer} layers, d_model {setting.d_model}, {setting.n_head} heads, no FFN, vocab "
        f"{setting.vocab_size}; {setting.steps} steps of {setting.batch_size} sequences on the round-robin "
        f"tasks (seq_len, kv pairs, re-bound) {list(setting.train_tasks)}; learning rates {list(setting.lrs)} "
        f"(best on validation per seed); seeds {list(setting.seeds)}; {setting.n_test} test sequences per "
        f"setting. Total {results['seconds'] / 60:.1f} min on {results['env']['device']} "
        f"({results['env']['threads']} threads).",
        "",
        "## Claims",
        "",
        markdown_table(["claim", "verdict", "why"],
                       [[c["id"], c["verdict"], c["why"]] for c in results["claims"]]),
        "",
        "## Recall accuracy (test; mean ± std over seeds)",
        "",
        markdown_table(
            ["mixer", *[f"L{s} kv{p}" for s, p in setting.test_grid], "stability", "plasticity",
             "state floats", "params", "lr"],
            [[m, *[_cell(runs, key) for key in grid_keys], _cell(runs, "overwrite_stability"),
              _cell(runs, "overwrite_plasticity"), runs[0]["state_size"] if runs else "-",
              runs[0]["params"] if runs else "-", ",".join(f"{r['lr']:g}" for r in runs)]
             for m, runs in chosen.items()]),
        "",
        f"State floats: recurrent state per sequence summed over layers at seq_len {setting.hardest[0]} "
        "(attention's KV cache grows with the length). Overwrite variant (seq_len, kv pairs, re-bound) = "
        f"{setting.overwrite_test}: stability is recall of keys bound once, plasticity of re-bound keys "
        "(the latest value is the answer).",
        "",
        "## Every run",
        "",
        markdown_table(["mixer", "lr", "seed", "final loss", "val grid mean", "test grid mean", "seconds"],
                       [[r["arm"], f"{r['lr']:g}", r["seed"], r.get("final_loss", "diverged"),
                         r["val"]["grid_mean"] if "val" in r else "-",
                         r["metrics"]["grid_mean"] if "metrics" in r else "-", round(r["seconds"], 1)]
                        for r in results["runs"]]),
        "",
    ]
    return "\n".join(lines)


def _std(values: np.ndarray):
    """Sample std over seeds (axis 0), as in the report's tables; 0 for a single seed."""
    return values.std(0, ddof=1) if len(values) > 1 else np.zeros_like(values[0])


def plots(study_dir: Path, setting, chosen: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    lengths = sorted({s for s, _ in setting.test_grid})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4 * len(lengths), 3.4), sharey=True, squeeze=False)
    for ax, seq_len in zip(axes[0], lengths):
        pairs = sorted(p for s, p in setting.test_grid if s == seq_len)
        for mixer, runs in chosen.items():
            if not runs:
                continue
            acc = np.array([[r["metrics"][f"acc_L{seq_len}_kv{p}"] for p in pairs] for r in runs])
            ax.errorbar(pairs, acc.mean(0), yerr=_std(acc), marker="o", capsize=3, label=mixer)
        ax.set(title=f"seq_len {seq_len}", xlabel="kv pairs", xscale="log", ylim=(-0.02, 1.02))
        ax.set_xticks(pairs, [str(p) for p in pairs])
        ax.xaxis.set_minor_formatter(NullFormatter())
    axes[0][0].set_ylabel("recall accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(study_dir / "accuracy_vs_kv_pairs.png", dpi=120)
    plt.close(fig)

    hard = "acc_L{}_kv{}".format(*setting.hardest)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for mixer, runs in chosen.items():
        if runs:
            acc = [r["metrics"][hard] for r in runs]
            ax.errorbar(runs[0]["state_size"], np.mean(acc), yerr=_std(np.array(acc)), marker="o", capsize=3,
                        label=mixer)
    ax.set(xscale="log", xlabel="recurrent state (floats per sequence)", ylabel="recall accuracy",
           title=f"MQAR seq_len {setting.hardest[0]}, {setting.hardest[1]} kv pairs", ylim=(-0.02, 1.02))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(study_dir / "accuracy_vs_state_size.png", dpi=120)
    plt.close(fig)
