"""The ocl-baselines study's claims: what the field expects of these baselines, each decided by the
shared directional rule on the glyph stream. Rules fixed before the full run."""

from __future__ import annotations

from routemem.experiments.shared.common import INCONCLUSIVE, directional_verdict, summarize
from routemem.experiments.shared.vit_stream import PROMPT_METHODS


def metric(runs: list[dict], stream: str, method: str, name: str) -> dict:
    return summarize([r["metrics"][name] for r in runs if r["stream"] == stream and r["method"] == method
                      and r["metrics"].get(name) is not None])


def claims(runs: list[dict]) -> list[dict]:
    """The field's expectations on the glyph stream, each by the shared directional rule."""
    out = []

    def directional(claim_id, statement, ours, baseline, higher_is_better, description):
        if min(ours["n"], baseline["n"]) == 0:
            verdict, why = INCONCLUSIVE, "missing runs"
        else:
            verdict, why = directional_verdict(ours, baseline, higher_is_better)
        out.append({"id": claim_id, "statement": statement, "description": description, "verdict": verdict,
                    "why": why, "paper": {"ours": "expected of these baselines in the OCL literature"},
                    "measured": {"ours": ours, "baseline": baseline}})

    directional("replay_beats_finetune", "Experience replay beats sequential fine-tuning (final average accuracy)",
                metric(runs, "glyphs", "er", "final_average_accuracy"),
                metric(runs, "glyphs", "finetune", "final_average_accuracy"), True,
                "glyph stream: final average accuracy of er vs finetune")
    directional("finetune_forgets", "Sequential fine-tuning forgets more than replay",
                metric(runs, "glyphs", "finetune", "forgetting"), metric(runs, "glyphs", "er", "forgetting"), True,
                "glyph stream: forgetting of finetune vs er")
    best = max(PROMPT_METHODS, key=lambda m: metric(runs, "glyphs", m, "final_average_accuracy")["mean"]
               if metric(runs, "glyphs", m, "final_average_accuracy")["n"] else -1.0)
    directional("prompts_beat_linear_probe", "The best prompt method beats the linear probe on the frozen backbone",
                metric(runs, "glyphs", best, "final_average_accuracy"),
                metric(runs, "glyphs", "linear-probe", "final_average_accuracy"), True,
                f"glyph stream: final average accuracy of the best prompt method ({best}) vs linear-probe")
    return out
