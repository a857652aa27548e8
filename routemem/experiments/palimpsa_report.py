"""The Palimpsa study's report.md and plots, made from results already measured."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from routemem.experiments.common import markdown_table, summarize, where_trained


def _cell(runs: list[dict], key: str) -> str:
    if not runs:
        return "-"
    stats = summarize([r["metrics"][key] for r in runs])
    return f"{stats['mean']:.3f}" + (f" ± {stats['std']:.3f}" if stats["n"] > 1 else "")


def _claim_row(claim: dict) -> list:
    paper = claim.get("paper", {})
    number = paper.get("number", "—")
    if paper.get("numbers"):
        number += f"; {paper['numbers']}"
    measured = claim.get("measured", {})
    if "comparisons" in claim:
        ours = "; ".join(f"{c['ours']} {_stats(measured[c['ours']])} vs {c['baseline']} "
                         f"{_stats(measured[c['baseline']])}" for c in claim["comparisons"])
    else:
        ours = "see why"
    chance = f"{claim['chance']:.4f}" if "chance" in claim else "—"
    return [f"{claim.get('statement', claim['id'])} (`{claim['id']}`)", f"{number}. Paper's claim: {paper.get('ours', '—')}",
            ours, chance, claim["verdict"], claim["why"]]


def _stats(stats: dict) -> str:
    return f"{stats['mean']:.3f}" + (f" ± {stats['std']:.3f}" if stats["n"] > 1 else "")


def report(results: dict, setting, chosen: dict[str, list[dict]]) -> str:
    grid_keys = [f"acc_L{s}_kv{p}" for s, p in setting.test_grid]
    chance = results["chance_accuracy"]
    lines = [
        f"# Palimpsa on MQAR ({results['mode']})",
        "",
        f"{setting.n_layer} layers, d_model {setting.d_model}, {setting.n_head} heads, no FFN, vocab "
        f"{setting.vocab_size}; {setting.steps} steps of {setting.batch_size} sequences on the round-robin "
        f"tasks (seq_len, kv pairs, re-bound) {list(setting.train_tasks)}; learning rates {list(setting.lrs)} "
        f"(best on validation per seed); seeds {list(setting.seeds)}; {setting.n_test} test sequences per "
        f"setting. Total {results['seconds'] / 60:.1f} min on {where_trained(results)}.",
        "",
        "## Claims",
        "",
        "The paper reports no MQAR number at our (much smaller) settings, so the paper column gives its "
        "qualitative claim; the verdict tests its direction. Chance: a uniform guess among the "
        f"{setting.vocab_size - setting.vocab_size // 2} values (the upper half of the vocabulary).",
        "",
        markdown_table(["claim", "paper", "ours (mean ± std over seeds)", "chance", "verdict", "why"],
                       [_claim_row(c) for c in results["claims"]]),
        "",
        "## Recall accuracy (test; mean ± std over seeds)",
        "",
        markdown_table(
            ["mixer", *[f"L{s} kv{p}" for s, p in setting.test_grid], "stability", "plasticity",
             "state floats", "params", "lr"],
            [[m, *[_cell(runs, key) for key in grid_keys], _cell(runs, "overwrite_stability"),
              _cell(runs, "overwrite_plasticity"), runs[0]["state_size"] if runs else "-",
              runs[0]["params"] if runs else "-", ",".join(f"{r['lr']:g}" for r in runs)]
             for m, runs in chosen.items()]
            + [["chance (uniform over values)", *[f"{chance:.4f}"] * (len(grid_keys) + 2), "-", "-", "-"],
               ["a value seen in the context", *[f"{1 / p:.4f}" for _, p in setting.test_grid],
                *[f"{1 / (setting.overwrite_test[1] + setting.overwrite_test[2]):.4f}"] * 2, "-", "-", "-"]]),
        "",
        "Paper: no MQAR accuracy at these settings (the paper's MQAR uses vocab 8192 at seq_len 512 and "
        "1024 with 128 and 256 kv pairs); its claim is that Palimpsa is better than the baselines.",
        "",
        f"State floats: recurrent state per sequence summed over layers at seq_len {setting.hardest[0]} "
        "(attention's KV cache grows with the length). Overwrite variant (seq_len, kv pairs, re-bound) = "
        f"{setting.overwrite_test}: stability is recall of keys bound once, plasticity of re-bound keys "
        "(the latest value is the answer). A model that has learnt only to answer with some value from "
        "the context scores 1 / (values in the context): the last row.",
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
