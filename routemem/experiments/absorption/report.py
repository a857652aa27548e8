"""The absorption study's report.md and plots, made from results already measured."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from routemem.experiments.absorption.arms import ARMS, BLOCK_ARMS, COLORS, LEARNED_GATES
from routemem.experiments.absorption.claims import (
    CONCENTRATION_MIN,
    F1_RATIO,
    SHARE_MAX,
    finished,
)
from routemem.experiments.shared.common import invocation_text, markdown_table, summarize

DISTILL_SOURCES = (("token", "dense"), ("token", "hard"), ("block", "dense"), ("block", "block-hard"))


def _stats(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    s = summarize(values)
    return f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if s["n"] > 1 else "")


def _ppl(values: list[float]) -> str:
    return _stats([math.exp(v) for v in values], 2)


def _claim_row(claim: dict) -> list:
    return [f"{claim['statement']} (`{claim['id']}`)", claim["paper"]["ours"], claim["verdict"], claim["why"]]


def _arm_rows(runs: list[dict]) -> list[list]:
    rows = []
    for arm in ARMS:
        done = finished(runs, arm)
        deployed = {path: [r["metrics"]["deployed"].get(path) for r in done] for path in ("gate", "dense", "oracle")}
        rows.append([arm, len(done), _stats([r["metrics"]["val_loss"] for r in done]),
                     _ppl([r["metrics"]["val_loss"] for r in done]),
                     *(_ppl([v for v in deployed[p] if v is not None]) for p in ("gate", "dense", "oracle")),
                     _stats([r["steps"] * r["batch_tokens"] / r["train_seconds"] for r in done], 0)])
    return rows


def _distill_rows(distilled: list[dict]) -> list[list]:
    rows = []
    for granularity, source in DISTILL_SOURCES:
        done = [r for r in distilled if r["source"] == source and r.get("granularity", "token") == granularity]
        rows.append([granularity, source, len(done), _stats([float(np.mean(r["f1"])) for r in done]),
                     _ppl([r["own_loss"] for r in done]), _ppl([r["deployed_loss"] for r in done]),
                     _ppl([r["oracle_loss"] for r in done]), _stats([r["deployed_loss"] - r["own_loss"] for r in done]),
                     _stats([float(np.mean(r["own_gate_f1"])) for r in done if "own_gate_f1" in r])])
    return rows


def _block_rows(runs: list[dict], setting) -> list[list]:
    rows = []
    for arm in ("dense", *BLOCK_ARMS):
        done = [r for r in finished(runs, arm) if "block_concentration" in r]
        rows.append([arm, len(done), *(_stats([r["block_concentration"][i] for r in done])
                                       for i in range(setting.n_layer))])
    return rows


def _apn_rows(apn_runs: list[dict]) -> list[list]:
    rows = []
    for router in ("learned", "random"):
        base = [r for r in apn_runs if r["router"] == router and r["arm"] == "pretrain-apn"]
        adapted = [r for r in apn_runs if r["router"] == router and r["arm"] == "apn-patches" and "metrics" in r]
        rows.append([router, len(base), _stats([r["metrics"]["a_test_ppl"] for r in base], 2),
                     _stats([r["metrics"]["b_test_ppl"] for r in base], 2),
                     _stats([r["metrics"]["a_test_ppl"] for r in adapted], 2),
                     _stats([r["metrics"]["b_test_ppl"] for r in adapted], 2)])
    return rows


def report(results: dict, setting) -> str:
    runs, distilled, apn_runs = results["runs"], results["distilled"], results["apn_runs"]
    seconds = sum(r.get("seconds", 0.0) for r in runs + distilled + apn_runs)
    diverged = [r for r in runs if "diverged" in r]
    conc = next(c for c in results["claims"] if c["id"] == "attention_concentration")["measured"]
    lines = [
        f"# Routing absorption in sparse attention ({results['mode']})",
        "",
        f"Byte-level LMs on `{results['data']['train']}`: {setting.n_layer} layers, d_model {setting.d_model}, "
        f"{setting.n_head} heads, context T = {setting.seq_len}, k = {setting.k} keys per query, gate rank "
        f"{setting.rank}, tau {setting.tau:g}, {setting.tokens:,} training tokens per run (batch "
        f"{setting.batch_size}, lr {setting.lr:g}, warmup + cosine), seeds {list(setting.seeds)}. "
        f"The runs took {seconds / 60:.0f} min of compute; this invocation {invocation_text(results)}"
        + (", bf16 autocast." if results["execution"].get("bf16") else ", float32."),
        "",
        *(["Quick mode is a smoke test of the whole pipeline: its budgets are far too small to decide the "
           "claims; the full run decides them.", ""] if results["mode"] == "quick" else []),
        "## Claims",
        "",
        "Rules (fixed before the runs, in `routemem/experiments/absorption/claims.py`): equivalence margin "
        f"max(0.01, 2 x pooled seed std) nats; claim 1 holds when the learned gate closes less than "
        f"{SHARE_MAX:.0%} of the random-to-dense gap (or is within the margin of random); claim 2 when every "
        "logged gate-gradient norm of the hard arm is exactly 0 and the soft control's is not; claim 3 when "
        "the co-adapted source degrades more than the dense one on deployment (mean ± std disjoint) with a "
        f"distilled gate at least {F1_RATIO} times as accurate; claim 4 when mask-random deployed dense is worse "
        f"than dense (disjoint); claim 5 when the mean concentration is at least {CONCENTRATION_MIN}; claim 6 "
        "when the random APN router is within the margin of the learned one. Block level: B1 is claim 1's rule "
        "on the block soft arms; B2 holds when block-moba is no worse than dense beyond the margin; B3 is "
        "claim 3's rule on the block gates distilled onto dense and block-hard; B4 is claim 5's threshold on "
        "block concentration.",
        "",
        markdown_table(["claim", "paper", "verdict", "why"], [_claim_row(c) for c in results["claims"]]),
        "",
        "## Language models (mean ± std over seeds)",
        "",
        f"Val loss in nats per byte on {setting.val_tokens:,} validation tokens; perplexity per byte = exp(loss). "
        "`val loss` is each arm as used: the soft and hard arms through their gate, dense and mask-random dense. "
        "The deployed columns evaluate the same weights through the gate, through dense attention, and through "
        f"the oracle mask (each query's top {setting.k} keys by its own dense attention). mask-random trains with "
        f"random masks on a share {setting.mask_p} of its steps.",
        "",
        markdown_table(["arm", "runs", "val loss", "ppl", "ppl via gate", "ppl dense", "ppl oracle", "train tokens/s"],
                       _arm_rows(runs)),
        "",
        "## Gate distillation onto frozen models (claims 3 and B3)",
        "",
        f"A fresh gate trained for {setting.distill_steps} steps (batch {setting.distill_batch}, lr "
        f"{setting.distill_lr:g}) by KL(dense attention row || softmax(gate scores)), everything else frozen; "
        "deployed with hard top-k. F1: overlap of the gate's top k with the oracle's, mean over layers, on the "
        "deployed forward. Own: the source as trained (dense, or hard through its co-adapted gate). Oracle: the "
        "source's weights with each query's own top-k dense keys. Block gates (B3): the target is each query "
        "block's dense mass over its past key blocks (SeerAttention's), deployed with the top "
        f"{setting.top_k_blocks} past blocks plus the own block; the oracle picks those blocks by that mass "
        "(it reads the whole query block, so it is an upper bound, not a causal decoder).",
        "",
        markdown_table(["gate", "source", "runs", "distilled F1", "own ppl", "deployed ppl", "oracle ppl",
                        "degradation (nats)", "own gate's F1"], _distill_rows(distilled)),
        "",
        "## Attention concentration (claim 5)",
        "",
        f"Share of dense attention mass in each query's top {setting.k} keys (queries with more than "
        f"{setting.k} keys), dense model, per layer: "
        + ", ".join(f"layer {i}: {s['mean']:.3f}" for i, s in enumerate(conc["per_layer"]))
        + f". A uniform row would keep {conc['uniform_reference']:.3f}.",
        "",
        "## Block routing (claims B1-B4)",
        "",
        f"Query and key blocks of {setting.block_size} tokens; a query block reads its own block and the top "
        f"{setting.top_k_blocks} past key block(s) (hard), so a query reads at most "
        f"{(setting.top_k_blocks + 1) * setting.block_size} keys, the token arms' k. A query block is scored by "
        "the mean gate feature of the block before it, a key block by its own mean (causal: "
        "`routemem/ops/gated_sparse/block_select.py`). Block concentration, per layer (share of each query "
        "block's dense mass in its top 1/8 of causal key blocks):",
        "",
        markdown_table(["arm", "runs", *(f"layer {i}" for i in range(setting.n_layer))], _block_rows(runs, setting)),
        "",
        "## APN: learned vs random router (claim 6)",
        "",
        f"The APN study's model and data (`{results['data']['apn_pair']}`), pretrained "
        f"{setting.apn_pretrain_steps} steps on A, then only the patches adapted {setting.apn_adapt_steps} steps "
        f"on B (lr {setting.apn_adapt_lr:g}); perplexity per byte on each domain's test split.",
        "",
        markdown_table(["prototypes", "runs", "A ppl pretrained", "B ppl pretrained", "A ppl adapted", "B ppl adapted"],
                       _apn_rows(apn_runs)),
        "",
        "Plots: `ppl_per_arm.png`, `f1_vs_deployed_ppl.png`, `concentration.png` and `block_concentration.png` "
        "(per layer, every arm), `gate_grad_norm.png` (the gate's gradient norm at every step; the hard arms' "
        "are 0, drawn on a symlog axis), `block_map.png` (the key blocks each query block reads, layer 0, head 0, "
        "one validation sequence, first seed, per block arm).",
    ]
    if diverged:
        lines += ["", "Diverged runs: " + ", ".join(f"{r['arm']} seed {r['seed']}" for r in diverged)]
    return "\n".join(lines) + "\n"


def plain_log_ticks(axis) -> None:
    """Tick labels of a log or symlog ``axis`` as plain numbers ('%g': "20", "0.001", "1e-06"), not
    matplotlib's "2 x 10^1", which it prints on a narrow log range. Which ticks get a label stays
    the log formatter's choice (minor ones only on a narrow range, so a wide one is not crowded)."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    linthresh = getattr(axis.get_transform(), "linthresh", None)  # set on a symlog axis
    axis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False, linthresh=linthresh))
    axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, linthresh=linthresh))


def plots(study_dir: Path, setting, runs: list[dict], distilled: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 3.6))
    for i, arm in enumerate(ARMS):
        values = [math.exp(r["metrics"]["val_loss"]) for r in finished(runs, arm)]
        if values:
            ax.bar(i, np.mean(values), color=COLORS[arm], alpha=0.6)
            ax.scatter([i] * len(values), values, color="k", s=10, zorder=3)
    ax.set_xticks(range(len(ARMS)), ARMS, fontsize=7, rotation=30, ha="right")
    ax.set(ylabel="val perplexity per byte", title="perplexity per arm (dots: seeds)")
    fig.tight_layout()
    fig.savefig(study_dir / "ppl_per_arm.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for granularity, source in DISTILL_SOURCES:
        done = [r for r in distilled if r["source"] == source and r.get("granularity", "token") == granularity]
        color = COLORS[source] if granularity == "token" or source != "dense" else "k"
        name = f"{granularity} gate onto {source}"
        ax.scatter([np.mean(r["f1"]) for r in done], [math.exp(r["deployed_loss"]) for r in done], color=color,
                   label=name)
        ax.scatter([np.mean(r["f1"]) for r in done], [math.exp(r["own_loss"]) for r in done], color=color,
                   marker="x", label=f"{source} model as trained ({granularity} gate)")
    ax.set(xlabel="F1 of the distilled gate vs the oracle top-k", ylabel="val perplexity per byte", yscale="log",
           title="distilled gates: accuracy vs deployed perplexity")
    plain_log_ticks(ax.yaxis)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(study_dir / "f1_vs_deployed_ppl.png", dpi=120)
    plt.close(fig)

    for key, name, ylabel in (("concentration", "concentration.png", f"attention mass in the top {setting.k} keys"),
                              ("block_concentration", "block_concentration.png",
                               f"mass in the top 1/8 of key blocks ({setting.block_size} tokens)")):
        fig, ax = plt.subplots(figsize=(5.2, 3.6))
        for arm in ARMS:
            done = [r for r in finished(runs, arm) if key in r]
            if done:
                conc = np.array([r[key] for r in done])
                ax.errorbar(range(conc.shape[1]), conc.mean(0), yerr=conc.std(0), color=COLORS[arm], marker="o",
                            label=arm)
        ax.axhline(CONCENTRATION_MIN, color="k", lw=0.8, ls=":")
        ax.set(xlabel="layer", ylabel=ylabel, ylim=(0, 1.02), title="attention concentration (as each arm is used)")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(study_dir / name, dpi=120)
        plt.close(fig)

    maps = {arm: next((r["block_map"] for r in finished(runs, arm) if r["seed"] == setting.seeds[0]
                       and "block_map" in r), None) for arm in BLOCK_ARMS}
    maps = {arm: m for arm, m in maps.items() if m is not None}
    if maps:
        fig, axes = plt.subplots(1, len(maps), figsize=(2.6 * len(maps), 2.9), squeeze=False)
        for ax, (arm, chosen) in zip(axes[0], maps.items()):
            ax.imshow(np.array(chosen), cmap="Greys", vmin=0, vmax=1)
            ax.set(title=arm, xlabel="key block", ylabel="query block")
        fig.suptitle("key blocks read (layer 0, head 0, one sequence)", fontsize=9)
        fig.tight_layout()
        fig.savefig(study_dir / "block_map.png", dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for arm in LEARNED_GATES:
        for r in finished(runs, arm):
            norms = r["gate_grad"]["norm"]
            ax.plot(range(1, len(norms) + 1), norms, color=COLORS[arm], alpha=0.7, lw=0.8,
                    label=arm if r["seed"] == setting.seeds[0] else None)
    ax.set(xlabel="step", ylabel="gate gradient norm", yscale="symlog", title="the gate's gradient during training")
    ax.set_yscale("symlog", linthresh=1e-6)
    plain_log_ticks(ax.yaxis)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(study_dir / "gate_grad_norm.png", dpi=120)
    plt.close(fig)
