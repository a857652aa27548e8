"""The fast-slow study's report.md and plots, made from results already measured."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from routemem.experiments.fast_slow import theorem as fast_slow_theorem
from routemem.experiments.shared.common import invocation_text, markdown_table, summarize
from routemem.experiments.fast_slow.claims import COST_RATIO, OPEN_SHARE, finished, machine_was_shared
from routemem.experiments.fast_slow.tasks import topic_levels

ARMS = ("dense", "coupled", "frozen")


def configurations(setting) -> list[tuple[str, int, int | None, str]]:
    """(title, training tokens, fast window, task) of each group of three arms, in report order."""
    groups = [(f"{tokens:,} tokens", tokens, None, "text") for tokens in setting.budgets]
    return groups + [
        (f"control: window {setting.control_window}, {setting.control_budget:,} tokens",
         setting.control_budget, setting.control_window, "text"),
        (f"topic control: window {setting.topic_window}, {setting.topic_tokens:,} tokens",
         setting.topic_tokens, setting.topic_window, "topics")]


def _stats(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    s = summarize(values)
    return f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if s["n"] > 1 else "")


def _claim_row(claim: dict) -> list:
    paper = claim["paper"]
    number = f"{paper['ours']}" + (f" ({paper['number']})" if paper.get("number") else "")
    return [f"{claim['statement']} (`{claim['id']}`)", number, claim["verdict"], claim["why"]]


def _arm_rows(runs: list[dict], tokens: int, window: int | None, task: str) -> list[list]:
    rows = []
    for arm in ARMS:
        done = finished(runs, arm, tokens, window, task)
        rows.append([arm, len(done), _stats([r["metrics"]["val_loss"] for r in done]),
                     _stats([max(r["gate"]["rms"]) for r in done if r["gate"]["rms"]]),
                     _stats([max(r["slow_share"]) for r in done if r["slow_share"]]),
                     _stats([r["steps"] * r["batch_tokens"] / r["train_seconds"] for r in done], 0)])
    return rows


def topic_undertrained_text(runs: list[dict], tokens: int, window: int, levels: dict, mode: str) -> list[str]:
    """A sentence when every arm's mean val loss on the topic task is above the one-token level:
    then no arm learnt even what the current token alone tells, so the control says nothing about
    the slow path (the runs are undertrained)."""
    means = {arm: summarize([r["metrics"]["val_loss"] for r in done])["mean"]
             for arm in ARMS if (done := finished(runs, arm, tokens, window, "topics"))}
    if not means or min(means.values()) <= levels["one_token"]:
        return []
    budget = f" (quick mode's topic budget is {tokens:,} tokens)" if mode == "quick" else ""
    return ["", f"In this setting no arm reached even the one-token level: every arm's val loss is above "
                f"{levels['one_token']:.3f} (the lowest arm mean is {min(means.values()):.3f}), so the models are "
                f"undertrained{budget} and this control cannot show what the slow path adds."]


def report(results: dict, setting) -> str:
    runs, cost, theorem = results["runs"], results["cost"], results["theorem"]
    diverged = [r for r in runs if "diverged" in r]
    lines = [
        f"# Fast-slow coupled attention ({results['mode']})",
        "",
        f"Byte-level LMs on `{results['data']['train']}`: {setting.n_layer} layers, d_model {setting.d_model}, "
        f"{setting.n_head} heads, context {setting.seq_len}, block P = {setting.block} (eps = 1/{setting.block}), "
        f"batch {setting.batch_size}, lr {setting.lr:g} (warmup + cosine), seeds {list(setting.seeds)}. "
        f"The runs took {sum(r.get('seconds', 0.0) for r in runs) / 60:.0f} min of training; this invocation "
        f"{invocation_text(results)}" + (", bf16 autocast." if results["execution"].get("bf16") else ", float32."),
        "",
        *(["Quick mode is a smoke test of the whole pipeline: its budgets are far too small to decide the "
            "claims; the full run decides them.", ""] if results["mode"] == "quick" else []),
        "## Claims",
        "",
        "Rules (fixed before the runs, in `routemem/experiments/fast_slow/claims.py`): neutral = both "
        "val-loss gaps within max(0.01, 2 x pooled seed std) and the gate closed; cost = coupled/dense "
        f"step time <= {COST_RATIO}; control = gate open and coupled better than frozen and dense with "
        "mean ± std disjoint; theorem = log-log slope in [0.8, 1.2]. The gate counts as open when the "
        f"slow path carries at least {OPEN_SHARE} of the mixer's output (slow share = rms(g * message) / "
        "rms(mixer output)); g alone does not say it, because phi's output scale can grow while g stays "
        "small (compare the two columns below).",
        "",
        markdown_table(["claim", "paper", "verdict", "why"], [_claim_row(c) for c in results["claims"]]),
        "",
        "## Runs (mean ± std over seeds)",
        "",
        f"Val loss in nats per byte on {setting.val_tokens:,} validation tokens (uniform guess: ln 256 = 5.545). "
        "Gate rms: the largest final rms g over layers. Slow share: rms of what the slow path adds over rms "
        "of the mixer output, largest layer, on 16 validation windows. Tokens/s: training only.",
    ]
    levels = results["topic_levels"]
    for title, tokens, window, task in configurations(setting):
        lines += ["", f"### {title}", ""]
        if task == "topics":
            lines += [f"Batches of {setting.topic_batch_size} sequences. "
                      f"Topic sequences ({setting.topic_count} topics, each {setting.topic_size} of "
                      f"{setting.topic_vocab} tokens, uniform): the best possible loss is "
                      f"{levels['topic_known']:.3f} knowing the topic and {levels['one_token']:.3f} seeing only "
                      "the current token.", ""]
        lines += [markdown_table(["arm", "runs", "val loss", "gate rms", "slow share", "train tokens/s"],
                                 _arm_rows(runs, tokens, window, task))]
        if task == "topics":
            lines += topic_undertrained_text(runs, tokens, window, levels, results["mode"])
    step = cost["step_seconds"]
    lines += [
        "",
        "## Cost",
        "",
        f"Median training-step time at the study's size (batch {setting.batch_size} x {setting.seq_len}), "
        f"the arms interleaved in one process, {cost['samples']['dense']} timed steps each, gates opened to 0.1:",
        "",
        markdown_table(["arm", "ms / step", "ratio to dense"],
                       [[arm, f"{1000 * step[arm]:.1f}", f"{step[arm] / step['dense']:.3f}"] for arm in ARMS]),
        "",
        *cost_spread_text(cost),
        "## Theorem, numerically",
        "",
        f"A {theorem['setting']['states']}-state master equation eps dx/dt = Q(y)^T x with rates depending on a "
        "slow y (dy/dt = c.x - y + forcing); max ||x - p_st(y)||_1 after the initial layer:",
        "",
        markdown_table(["eps", *[f"{e:g}" for e in theorem["epsilons"]]],
                       [["tracking error", *[f"{e:.3e}" for e in theorem["errors"]]]]),
        "",
        f"Log-log slope {theorem['slope']:.3f} (linear in eps is 1): {theorem['verdict']}.",
        "",
        "Plots: `gate.png` (gate rms and slow share vs step, per layer and arm; seeds overlaid; the dotted line "
        f"is the slow share {OPEN_SHARE} at which the gate counts as open), `val_loss.png` (val loss along "
        "training; on the topic panel the one-token and topic-known levels), `eps_slope.png` (the theorem).",
    ]
    if diverged:
        lines += ["", "Diverged runs: " + ", ".join(f"{r['arm']} {r['tokens']} seed {r['seed']}" for r in diverged)]
    return "\n".join(lines) + "\n"


def plots(study_dir: Path, setting, runs: list[dict], theorem: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.lines import Line2D

    groups = configurations(setting)
    colors = {"dense": "tab:gray", "coupled": "tab:blue", "frozen": "tab:orange"}
    styles = ("-", "--", "-.", (0, (1, 1)))  # per layer; the threshold line alone is dotted black

    fig, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 6.4), squeeze=False)
    for ax, share_ax, (title, tokens, window, task) in zip(axes[0], axes[1], groups):
        for arm in ("coupled", "frozen"):
            for r in finished(runs, arm, tokens, window, task):
                rms = np.array(r["gate_trace"]["rms"])
                for layer in range(rms.shape[1] if rms.ndim == 2 else 0):
                    ax.plot(r["gate_trace"]["step"], rms[:, layer], color=colors[arm], alpha=0.6,
                            linestyle=styles[layer % len(styles)])
                share = np.array(r["curve"]["slow_share"])
                for layer in range(share.shape[1] if share.ndim == 2 else 0):
                    share_ax.plot(r["curve"]["step"], share[:, layer], color=colors[arm], alpha=0.6,
                                  linestyle=styles[layer % len(styles)], marker="o", ms=2)
        ax.set(title=title, xlabel="step", ylabel="gate rms")
        share_ax.axhline(OPEN_SHARE, color="k", lw=0.8, ls=":")
        share_ax.set(xlabel="step", ylabel="slow share of the mixer output")
    # one legend for every panel: the colour is the arm, the line style the layer (seeds overlaid)
    handles = [Line2D([], [], color=colors[arm], label=arm) for arm in ("coupled", "frozen")]
    handles += [Line2D([], [], color="k", alpha=0.6, linestyle=styles[layer % len(styles)], label=f"layer {layer}")
                for layer in range(setting.n_layer)]
    handles += [Line2D([], [], color="k", lw=0.8, ls=":", label=f"gate open: slow share >= {OPEN_SHARE} (OPEN_SHARE)")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(study_dir / "gate.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    for ax, (title, tokens, window, task) in zip(axes[0], groups):
        for arm in ARMS:
            done = finished(runs, arm, tokens, window, task)
            if done:
                curves = np.array([r["curve"]["val_loss"] for r in done])
                ax.plot(done[0]["curve"]["step"], curves.mean(0), color=colors[arm], marker="o", ms=3, label=arm)
                ax.fill_between(done[0]["curve"]["step"], curves.min(0), curves.max(0), color=colors[arm], alpha=0.2)
        if task == "topics":  # the task's two reference losses, computed from the setting as the study does
            levels = topic_levels(setting)
            ax.axhline(levels["one_token"], color="k", lw=0.8, ls="--",
                       label=f"best seeing one token ({levels['one_token']:.3f})")
            ax.axhline(levels["topic_known"], color="k", lw=0.8, ls=":",
                       label=f"best knowing the topic ({levels['topic_known']:.3f})")
        ax.set(title=title, xlabel="step", ylabel="val loss (nats/token)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(study_dir / "val_loss.png", dpi=120)
    plt.close(fig)

    fast_slow_theorem.plot_tracking(theorem, study_dir / "eps_slope.png")


def cost_spread_text(cost: dict) -> list[str]:
    """The timing's spread over rounds and how much CPU the process got: a reader weighs the ratio
    by both (a cost cached before they were kept has neither)."""
    if "round_ratios" not in cost:
        return []
    rounds = f"coupled / dense per round: {', '.join(f'{r:.3f}' for r in cost['round_ratios'])}."
    if cost.get("device") != "cpu":  # a GPU process waits on the device: its CPU time says nothing
        return [rounds, ""]
    shared = "shared with another process: the cost claim is inconclusive" if machine_was_shared(cost) else "not shared"
    return [f"{rounds} While timing, the process got {cost['cpu_share']:.0%} of its threads' CPU time, with a load "
            f"average of {cost['load_average']:.1f} on {cost['cpu_count']} CPUs and {cost.get('threads', 1)} "
            f"thread(s) of its own: the CPU was {shared}.", ""]

