"""The APN study's report.md and plots, made from results already measured."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from routemem.experiments.shared.common import invocation_text, markdown_table, summarize

# The paper's table (papers/apn.md): tiny Shakespeare, its own (larger) models; the shifted domain is
# not named. A-test perplexity after pretraining, then A and B perplexity after adapting.
PAPER_PRETRAINED = {"dense": 4.32, "apn": 4.57}
PAPER_ADAPTED = {"apn-patches": (11.1, 6.4), "dense-global": (29.4, 17.8)}
NOT_IN_PAPER = "— (our control)"


def _cell_stats(stats: dict) -> str:
    return f"{stats['mean']:.2f}" + (f" ± {stats['std']:.2f}" if stats["n"] > 1 else "")


def _cell(values: list[float]) -> str:
    return _cell_stats(summarize(values)) if values else "-"


def _pretrained(results: dict, kind: str) -> list[dict]:
    return [r for r in results["runs"] if r["arm"] == f"pretrain-{kind}"]


def _claim_row(claim: dict) -> list:
    paper, measured = claim["paper"], claim["measured"]
    return [f"{claim.get('statement', claim['id'])} (`{claim['id']}`)",
            f"{paper['ours']} vs {paper['baseline']} ({paper['ratio']:.2f}x)",
            f"{_cell_stats(measured['ours'])} vs {_cell_stats(measured['baseline'])} "
            f"({_cell_stats(measured['ratio'])}x)", claim["verdict"], claim["why"]]


def by_rate(results: dict) -> dict[str, dict[float, dict]]:
    """arm -> lr -> mean over seeds of A-test and B-test perplexity after adapting (finished runs)."""
    table: dict[str, dict[float, dict]] = {}
    for r in results["runs"]:
        if r["arm"].startswith("pretrain") or "metrics" not in r:
            continue
        cell = table.setdefault(r["arm"], {}).setdefault(r["lr"], {"a": [], "b": []})
        cell["a"].append(r["metrics"]["a_test_ppl"])
        cell["b"].append(r["metrics"]["b_test_ppl"])
    return {arm: {lr: {k: float(np.mean(v)) for k, v in cell.items()} for lr, cell in sorted(rates.items())}
            for arm, rates in table.items()}


def dominated(results: dict, chosen: dict[str, list[dict]], ours: str = "apn-patches",
              other: str = "dense-global") -> list[str]:
    """Per seed: the rates at which ``other`` was at least as good as ``ours``' chosen run on both
    A-test and B-test (the choice by B-validation trades retention for adaptation differently
    for different arms; this shows whether ours wins at any trade-off or only at the chosen one)."""
    lines = []
    for mine in chosen.get(ours, []):
        better = [r["lr"] for r in results["runs"] if r["arm"] == other and r["seed"] == mine["seed"]
                  and "metrics" in r and r["metrics"]["a_test_ppl"] <= mine["metrics"]["a_test_ppl"]
                  and r["metrics"]["b_test_ppl"] <= mine["metrics"]["b_test_ppl"]]
        lines.append(f"seed {mine['seed']}: {other} at lr " + ", ".join(f"{lr:g}" for lr in better)
                     + f" beats {ours} (lr {mine['lr']:g}) on both" if better else
                     f"seed {mine['seed']}: no {other} rate beats {ours} (lr {mine['lr']:g}) on both")
    return lines


def report(results: dict, setting, chosen: dict[str, list[dict]]) -> str:
    a, b = results["data"]["train"], results["data"]["shift"]
    stage1 = []
    for kind in ("dense", "apn"):
        runs = _pretrained(results, kind)
        if runs:
            stage1.append([kind, f"{PAPER_PRETRAINED[kind]:g}", runs[0]["params"], runs[0]["ffn_params"], runs[0]["ffn_active_per_token"],
                           _cell([r["metrics"]["a_test_ppl"] for r in runs]),
                           _cell([r["metrics"]["b_test_ppl"] for r in runs]),
                           _cell([r["metrics"]["final_train_loss"] for r in runs])])
    stage2 = []
    for arm, runs in chosen.items():
        if not runs:
            continue
        kind = arm.split("-")[0]
        before = {r["seed"]: r["metrics"] for r in _pretrained(results, kind)}
        paper = PAPER_ADAPTED.get(arm)
        stage2.append([arm, ",".join(f"{r['lr']:g}" for r in runs), runs[0]["trainable"],
                       _cell([r["changed_fraction"] for r in runs]),
                       _cell([r["patches_changed_fraction"] for r in runs if "patches_changed_fraction" in r]),
                       _cell([before[r["seed"]]["a_test_ppl"] for r in runs]),
                       _cell([r["metrics"]["a_test_ppl"] for r in runs]), f"{paper[0]:g}" if paper else NOT_IN_PAPER,
                       _cell([before[r["seed"]]["b_test_ppl"] for r in runs]),
                       _cell([r["metrics"]["b_test_ppl"] for r in runs]), f"{paper[1]:g}" if paper else NOT_IN_PAPER])
    usage = [r["patch_usage"]["overlap"] for r in _pretrained(results, "apn")]
    lines = [
        f"# Attractor Patch Networks: {a} -> {b} ({results['mode']})",
        "",
        f"Byte-level LMs, {setting.n_layer} layers, d_model {setting.d_model}, {setting.n_head} heads, "
        f"context {setting.seq_len}, batch {setting.batch_size}. APN FFN {setting.apn}; the dense FFN's "
        f"hidden width matches its parameter count. Pretraining: {setting.pretrain_steps} steps on {a}, "
        f"lr {setting.pretrain_lr:g}. Adaptation: {setting.adapt_steps} steps on {b}, learning rates "
        f"{list(setting.adapt_lrs)} (per arm and seed, the best B-validation perplexity is kept), no weight "
        f"decay; seeds {list(setting.seeds)}. Test perplexities on up to {setting.test_tokens} tokens. "
        f"This invocation: {invocation_text(results)}"
        + (", bf16 autocast." if results.get("execution", {}).get("bf16") else ", float32."),
        "",
        "The paper's numbers come from its own, larger models on tiny Shakespeare (the domain it adapts to "
        "is not named); ours are tiny models, so only the directions and ratios are tested. For scale: a "
        "uniform guess over the 256 byte values has perplexity 256.",
        "",
        "## Claims",
        "",
        markdown_table(["claim", "paper (APN vs dense)", "ours (APN vs dense, mean ± std)", "verdict", "why"],
                       [_claim_row(c) for c in results["claims"]]),
        "",
        "## Stage 1: pretraining on A",
        "",
        markdown_table(["FFN", "paper: A test ppl", "params (no emb.)", "FFN params", "FFN params used per token", f"{a} test ppl",
                        f"{b} test ppl", "final train loss"], stage1),
        "",
        "## Stage 2: adapting to B (the chosen learning rate per seed)",
        "",
        markdown_table(["arm", "lr", "trainable", "params changed", "patches changed", f"{a} ppl before",
                        f"{a} ppl after", "paper: A after", f"{b} ppl before", f"{b} ppl after",
                        "paper: B after"], stage2),
        "",
        "Params changed: fraction of the pretrained model's parameters whose value moved (LoRA folded "
        "into the weights it adapts). Patches changed: fraction of patches whose U_i moved. `forgetting_curves.png` scores "
        f"the first {setting.curve_tokens} tokens of each test split {setting.curve_points} times along the "
        f"adaptation (its step 0 is therefore not the 'before' column, which uses up to {setting.test_tokens}).",
        "",
        f"Patch usage overlap between {a} and {b} (sum over patches of min(share on A, share on B), per "
        f"layer, mean over seeds {[r['seed'] for r in _pretrained(results, 'apn')]}): "
        + (", ".join(f"layer {i}: {v:.3f}" for i, v in enumerate(np.mean(usage, 0))) if usage else "-")
        + ". `patch_usage.png` shows the shares averaged over the same seeds. The paper reports no usage numbers.",
        "",
        "## Retention against adaptation, every learning rate (mean over seeds)",
        "",
        "Choosing each arm's rate by B-validation picks its best adaptation, which for some arms costs "
        "more forgetting than for others. This table and `tradeoff.png` show every rate.",
        "",
        markdown_table(["arm", *[f"lr {lr:g}: {a} / {b} ppl" for lr in setting.adapt_lrs]],
                       [[arm, *[f"{rates[lr]['a']:.2f} / {rates[lr]['b']:.2f}" if lr in rates else "-"
                                for lr in setting.adapt_lrs]] for arm, rates in by_rate(results).items()]),
        "",
        *[f"- {line}" for line in dominated(results, chosen)],
        "",
        "## Every run",
        "",
        markdown_table(["arm", "lr", "seed", f"{b} val ppl", f"{a} test ppl", f"{b} test ppl", "seconds"],
                       [[r["arm"], f"{r['lr']:g}", r["seed"], r.get("val", {}).get("b_val_ppl", "-"),
                         r["metrics"]["a_test_ppl"] if "metrics" in r else r.get("diverged", "-"),
                         r["metrics"]["b_test_ppl"] if "metrics" in r else "-", f"{r['seconds']:.1f}"]
                        for r in results["runs"]]),
        "",
    ]
    return "\n".join(lines)


def plots(study_dir: Path, results: dict, setting, chosen: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = results["data"]["train"], results["data"]["shift"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for arm, runs in chosen.items():
        if not runs:
            continue
        steps = [point["step"] for point in runs[0]["curve"]]
        for ax, key in zip(axes, ("a_ppl", "b_ppl")):
            values = np.array([[point[key] for point in r["curve"]] for r in runs])
            ax.plot(steps, values.mean(0), marker="o", markersize=3, label=arm)
            if len(runs) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), alpha=0.15)
    axes[0].set(title=f"retention: {a} test", xlabel="adaptation step", ylabel="perplexity")
    axes[1].set(title=f"adaptation: {b} test", xlabel="adaptation step", ylabel="perplexity")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(study_dir / "forgetting_curves.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for arm, rates in by_rate(results).items():
        lrs = sorted(rates)
        ax.plot([rates[lr]["b"] for lr in lrs], [rates[lr]["a"] for lr in lrs], marker="o", label=arm)
        ax.annotate(f"{lrs[-1]:g}", (rates[lrs[-1]]["b"], rates[lrs[-1]]["a"]), fontsize=6)
    ax.set(xlabel=f"{b} test perplexity (adaptation)", ylabel=f"{a} test perplexity (retention)",
           title="after adapting, one point per learning rate")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(study_dir / "tradeoff.png", dpi=120)
    plt.close(fig)

    pretrained = _pretrained(results, "apn")
    if not pretrained:
        return
    seeds = [r["seed"] for r in pretrained]
    # mean over seeds, as in the report's text (patch i of one seed is unrelated to patch i of
    # another, so the bars are each seed's shares sorted by share on A, then averaged rank by rank)
    on_a_all, on_b_all, overlap = [], [], []
    for r in pretrained:
        usage = r["patch_usage"]
        order = [np.argsort(-np.array(layer)) for layer in usage["A"]]
        on_a_all.append([np.array(layer)[o] for layer, o in zip(usage["A"], order)])
        on_b_all.append([np.array(layer)[o] for layer, o in zip(usage["B"], order)])
        overlap.append(usage["overlap"])
    on_a, on_b, overlap = np.mean(on_a_all, 0), np.mean(on_b_all, 0), np.mean(overlap, 0)
    fig, axes = plt.subplots(1, len(on_a), figsize=(5 * len(on_a), 3.6), squeeze=False)
    for layer, ax in enumerate(axes[0]):
        x = np.arange(len(on_a[layer]))
        ax.bar(x - 0.2, on_a[layer], width=0.4, label=a)
        ax.bar(x + 0.2, on_b[layer], width=0.4, label=b)
        ax.set(title=f"layer {layer}: overlap {overlap[layer]:.2f}", xlabel="patch rank (by share on A)",
               ylabel="share of routing slots")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"pretrained APN, mean over seeds {', '.join(map(str, seeds))}", fontsize=9)
    fig.tight_layout()
    fig.savefig(study_dir / "patch_usage.png", dpi=120)
    plt.close(fig)
