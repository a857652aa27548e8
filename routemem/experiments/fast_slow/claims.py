"""The fast-slow study's six claims and the rules that decide them, fixed before the full run.

Whether the gate is open is judged by what it lets through, not by g alone: the *slow share* of a
layer is rms(g * message) / rms(mixer output) on validation text, and a run's share is its
largest layer's. g and phi's output scale trade off (phi is free to grow), so a small g does not
mean an unused slow path: in a pilot run (5M tokens, seed 0) the coupled arm's gate rms stayed at
0.03-0.04 while the slow path carried 25-28% of the mixer output. Gate rms is reported beside it.

Rules (val loss in nats per byte, means over seeds):
- Neutral (claims 1 and 4): the margin is max(0.01, 2 x the pooled seed std of the three arms' val
  loss). Reproduced when |coupled - frozen| and |coupled - dense| are both within the margin AND
  the coupled arm's mean slow share is below OPEN_SHARE (the gate stayed closed); not reproduced
  when either gap exceeds the margin or the gate opened; inconclusive with fewer than 2 seeds.
- Cost (claim 2): reproduced when the median training-step time coupled / dense, measured in one
  process, is <= COST_RATIO (the benchmark's target for "comparable to dense") in every timing round;
  above it in every round: not reproduced; rounds on both sides, or a CPU shared with another
  process while timing (``machine_was_shared``): inconclusive.
- Positive controls (claim 3 on text with a short fast window, claim 3b on topic sequences with a
  1-token window; either way the slow path is the only channel to anything further back):
  reproduced when the coupled arm's gate opened (mean slow share >= OPEN_SHARE) AND coupled beats
  frozen and dense by the shared directional rule (lower loss, mean ± std disjoint); a gate that
  stays shut means "not reproduced". The text control can be weak (how much text beyond the
  window helps a small model is an open question); the topic control is worth ~0.6 nats by
  construction, so failing it means the layer or its training is broken.
- Theorem (claim 5): decided in fast_slow_theorem (log-log slope of the tracking error in eps
  within SLOPE_RANGE).
"""

from __future__ import annotations

import math

from routemem.experiments.shared.common import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    combine_verdicts,
    directional_verdict,
    summarize,
)

OPEN_SHARE = 0.1  # slow share at or above this: the gate is open (lets a tenth of the output through)
MIN_MARGIN = 0.01  # nats: the equivalence margin never shrinks below this
MARGIN_STDS = 2.0  # the margin in pooled seed standard deviations
COST_RATIO = 1.1  # coupled / dense step time at or below this: "comparable to dense"
# Whether the CPU was shared while timing, from two signs: the process got less than FAIR_CPU_SHARE
# of its threads' CPU time, or the 1-minute load average exceeds its own threads by more than
# OTHER_LOAD. On the 2-core VM beside one busy 2-thread process a 1-thread timing still got 97% of
# its CPU but the load average was 3.0, and its ratio moved from 1.118 (idle) to 1.094: across this
# claim's 1.1 threshold. Such a timing decides nothing.
FAIR_CPU_SHARE = 0.9
OTHER_LOAD = 0.5


def finished(runs: list[dict], arm: str, tokens: int, window: int | None, task: str = "text") -> list[dict]:
    return [r for r in runs if r["arm"] == arm and r["tokens"] == tokens and r["window"] == window
            and r.get("task", "text") == task and "metrics" in r]


def val_loss(runs: list[dict]) -> dict:
    return summarize([r["metrics"]["val_loss"] for r in runs])


def gate_rms(runs: list[dict]) -> dict:
    return summarize([max(r["gate"]["rms"]) for r in runs if r["gate"]["rms"]])


def slow_share(runs: list[dict]) -> dict:
    return summarize([max(r["slow_share"]) for r in runs if r["slow_share"]])


def gate_text(share: dict, gate: dict) -> str:
    state = "open" if share["mean"] >= OPEN_SHARE else "closed"
    return f"slow share {share['mean']:.3f} ({state}; open at {OPEN_SHARE}), gate rms {gate['mean']:.3f}"


def neutral_claim(claim_id: str, statement: str, runs: list[dict], tokens: int, paper: dict) -> dict:
    stats = {arm: val_loss(finished(runs, arm, tokens, None)) for arm in ("dense", "coupled", "frozen")}
    coupled = finished(runs, "coupled", tokens, None)
    gate, share = gate_rms(coupled), slow_share(coupled)
    pooled_std = math.sqrt(sum(s["std"] ** 2 for s in stats.values()) / len(stats))
    margin = max(MIN_MARGIN, MARGIN_STDS * pooled_std)
    gaps = {other: stats["coupled"]["mean"] - stats[other]["mean"] for other in ("frozen", "dense")}
    measured = {**stats, "slow_share": share, "gate_rms": gate, "margin": margin, "gap_vs_frozen": gaps["frozen"],
                "gap_vs_dense": gaps["dense"]}
    text = (f"coupled - frozen {gaps['frozen']:+.4f}, coupled - dense {gaps['dense']:+.4f} nats "
            f"(margin {margin:.4f}); {gate_text(share, gate)}")
    if min(s["n"] for s in stats.values()) < 2 or share["n"] < 2:
        verdict, why = INCONCLUSIVE, f"fewer than 2 seeds per arm; {text}"
    elif all(abs(g) <= margin for g in gaps.values()) and share["mean"] < OPEN_SHARE:
        verdict, why = REPRODUCED, f"{text}: within the margin, gate closed"
    else:
        broke = [f"coupled differs from {o}" for o, g in gaps.items() if abs(g) > margin]
        broke += ["the gate opened"] if share["mean"] >= OPEN_SHARE else []
        verdict, why = NOT_REPRODUCED, f"{text}: {', '.join(broke)}"
    return {"id": claim_id, "statement": statement, "paper": paper, "measured": measured,
            "description": f"val loss after {tokens:,} training tokens, mean over seeds; the coupled arm's slow share",
            "verdict": verdict, "why": why}


def machine_was_shared(cost: dict) -> bool:
    """On a CPU: did another process take CPU while the cost was timed (see FAIR_CPU_SHARE)? On a
    GPU the process waits on the device, so its CPU time says nothing; a cost cached before these
    were recorded has neither sign."""
    if cost.get("device", "cpu") != "cpu" or "cpu_share" not in cost:
        return False
    others = cost["load_average"] - cost.get("threads", 1)
    return cost["cpu_share"] < FAIR_CPU_SHARE or others > OTHER_LOAD


def cost_claim(setting, cost: dict) -> dict:
    """Reproduced when every round's ratio is <= COST_RATIO, not reproduced when every round's is
    above; inconclusive when the rounds straddle it, or when the CPU was shared while timing
    (under load the ratio moved by more than the margin tested)."""
    ratio = cost["ratio_coupled_dense"]
    rounds = cost.get("round_ratios", [ratio])  # a cost cached before rounds were kept: its median only
    loaded = machine_was_shared(cost)
    if loaded:
        verdict = INCONCLUSIVE
    elif max(rounds) <= COST_RATIO:
        verdict = REPRODUCED
    elif min(rounds) > COST_RATIO:
        verdict = NOT_REPRODUCED
    else:
        verdict = INCONCLUSIVE
    spread = f"rounds {min(rounds):.3f}-{max(rounds):.3f}x over {len(rounds)}"
    machine = (f"; the CPU was shared while timing (the process got {cost['cpu_share']:.0%} of its threads' CPU "
               f"time; load average {cost['load_average']:.1f} on {cost['cpu_count']} CPUs with "
               f"{cost.get('threads', 1)} thread(s) of its own): timing not trusted" if loaded else "")
    return {"id": "cost_comparable_to_dense",
            "statement": "The coupled model costs about as much wall-clock time per training step as the dense one",
            "description": f"median training-step time coupled / dense, one process, arms interleaved "
                           f"(batch {setting.batch_size} x {setting.seq_len} tokens, P={setting.block})",
            "paper": {"ours": "comparable to dense", "number": "0.97x (a third-party summary)"},
            "measured": {"ratio": ratio, "frozen_ratio": cost["ratio_frozen_dense"],
                         "step_seconds": cost["step_seconds"], "round_ratios": rounds,
                         "cpu_share": cost.get("cpu_share"), "load_average": cost.get("load_average")},
            "verdict": verdict,
            "why": f"{ratio:.3f}x dense (median; {spread}; target <= {COST_RATIO}x){machine}"}


def control_claim(runs: list[dict], tokens: int, window: int, task: str, claim_id: str, statement: str,
                  description: str, extra: dict | None = None) -> dict:
    stats = {arm: val_loss(finished(runs, arm, tokens, window, task)) for arm in ("dense", "coupled", "frozen")}
    coupled = finished(runs, "coupled", tokens, window, task)
    gate, share = gate_rms(coupled), slow_share(coupled)
    comparisons = {other: directional_verdict(stats["coupled"], stats[other], higher_is_better=False)
                   for other in ("frozen", "dense")}
    opened = share["n"] > 0 and share["mean"] >= OPEN_SHARE
    verdict = combine_verdicts([v for v, _ in comparisons.values()])
    why = "; ".join(f"coupled vs {o}: {w}" for o, (_, w) in comparisons.items()) + f"; {gate_text(share, gate)}"
    if share["n"] >= 2 and not opened:
        verdict = NOT_REPRODUCED
    if verdict == NOT_REPRODUCED:
        why = ("POSITIVE CONTROL FAILED: the slow path did not help even where it is the only channel to "
               "anything beyond the fast window, so the layer or its training is broken, or the budget is "
               "too small to learn to use it (as in --quick). " + why)
    return {"id": claim_id, "statement": statement, "description": description,
            "paper": {"ours": "no such experiment in the paper (our check that the layer works)"},
            "measured": {**stats, "slow_share": share, "gate_rms": gate, **(extra or {})},
            "verdict": verdict, "why": why}


def text_control_claim(setting, runs: list[dict]) -> dict:
    tokens, window = setting.control_budget, setting.control_window
    return control_claim(runs, tokens, window, "text", "positive_control",
                         "Positive control (ours): with a short fast window the gate opens and coupled beats "
                         "frozen and dense", f"fast path limited to a {window}-token window (context "
                         f"{setting.seq_len}), {tokens:,} training tokens of text: val loss and slow share")


def topic_control_claim(setting, runs: list[dict], levels: dict) -> dict:
    tokens, window = setting.topic_tokens, setting.topic_window
    return control_claim(runs, tokens, window, "topics", "positive_control_topics",
                         "Decisive control (ours): on topic sequences, where only pooled context names the "
                         "topic, the gate opens and coupled beats frozen and dense",
                         f"{setting.topic_count} topics of {setting.topic_size} tokens out of {setting.topic_vocab}, "
                         f"{window}-token fast window, {tokens:,} training tokens; best possible loss "
                         f"{levels['topic_known']:.3f} knowing the topic, {levels['one_token']:.3f} seeing one token",
                         extra={"levels": levels})


def theorem_claim(theorem: dict) -> dict:
    return {"id": "theorem_tracking", "statement": "Under a linear generator the fast variable tracks the "
            "master equation's stationary distribution, with an error linear in eps",
            "description": f"log-log slope of the tracking error vs eps in {theorem['epsilons']} "
                           f"(reproduced within {theorem['slope_range']})",
            "paper": {"ours": "x = phi(y) is the stationary distribution (a theorem; slope 1 expected)"},
            "measured": {"slope": theorem["slope"], "errors": theorem["errors"]},
            "verdict": theorem["verdict"], "why": theorem["why"]}


def claims(setting, runs: list[dict], cost: dict, theorem: dict, levels: dict) -> list[dict]:
    short, long = min(setting.budgets), max(setting.budgets)
    return [
        neutral_claim("neutral_at_paper_budget", f"At {short:,} training tokens the coupling is neutral: the "
                      "gate stays closed, coupled is within noise of frozen and dense", runs, short,
                      {"ours": "neutral at 500k tokens: gate closed, coupled = frozen within run-to-run noise"}),
        cost_claim(setting, cost),
        text_control_claim(setting, runs),
        topic_control_claim(setting, runs, levels),
        neutral_claim("neutral_at_10x_budget", f"At {long:,} training tokens ({long / short:g}x) the coupling is still "
                      "neutral and the gate still closed (reported either way)", runs, long,
                      {"ours": "not tested in the paper (only 500k tokens)"}),
        theorem_claim(theorem),
    ]
