"""The ocl-baselines study's report.md and plots, made from results already measured."""

from __future__ import annotations

from routemem.experiments.shared.common import invocation_text, markdown_table, summarize
from routemem.experiments.shared.stream_report import accuracy_table, plots
from routemem.experiments.shared.vit_stream import PROMPT_METHODS

__all__ = ["mask_numbers", "mask_text", "plots", "report"]

MASK_ROW = "linear-probe-task"


def _final(runs: list[dict], stream: str, method: str) -> float | None:
    values = [r["metrics"]["final_average_accuracy"] for r in runs if r["stream"] == stream
              and r["method"] == method and r["metrics"].get("final_average_accuracy") is not None]
    return summarize(values)["mean"] if values else None


def mask_text(methods) -> list[str]:
    """What the linear-probe-task row is (nothing when the setting has no such row)."""
    if MASK_ROW not in methods:
        return []
    return ["", f"The `{MASK_ROW}` row is the linear probe trained with the loss over the current task's classes "
                "only (`train_mask=\"task\"`, the mask L2P, DualPrompt, CODA-Prompt and RwF train with), where "
                "`linear-probe` trains over every class seen so far: the gap between the two rows is what the mask "
                "alone is worth. The claim `prompts_beat_linear_probe` is against `linear-probe`."]


def mask_numbers(runs: list[dict], stream: str, methods) -> list[str]:
    """On one stream, from the final average accuracies: how far the task mask alone moves the linear
    probe, beside how far the best prompt method is from it (nothing where a side has no runs)."""
    prompts = {m: _final(runs, stream, m) for m in PROMPT_METHODS if m in methods}
    prompts = {m: v for m, v in prompts.items() if v is not None}
    probe, masked = _final(runs, stream, "linear-probe"), _final(runs, stream, MASK_ROW)
    if MASK_ROW not in methods or not prompts or probe is None or masked is None:
        return []
    best = max(prompts, key=prompts.get)
    return ["", f"Final average accuracy (means): linear-probe {probe:.3f}, {MASK_ROW} {masked:.3f}, {best} (the "
                f"best prompt method) {prompts[best]:.3f}. The task mask alone moves the probe by "
                f"{masked - probe:+.3f}; {best} is {prompts[best] - probe:+.3f} from the probe."]


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
        "`routemem/experiments/ocl_baselines/claims.py` before the runs.",
        "",
        markdown_table(["claim", "verdict", "why"],
                       [[f"{c['statement']} (`{c['id']}`)", c["verdict"], c["why"]] for c in results["claims"]]),
        *mask_text(setting.methods),
    ]
    for stream in streams:
        first = next(r for r in runs if r["stream"] == stream)
        lines += ["", f"## {stream} stream", "",
                  f"{first['n_classes']} classes, {first['train_samples']} training samples, {setting.n_tasks} tasks; "
                  "accuracies are fractions, mean ± std over seeds; forgetting and BWT from the accuracy matrix "
                  "(avalanche / mammoth definitions, train/continual/metrics.py); A_auc: the anytime-accuracy "
                  f"curve ({setting.anytime_points} evaluations on the classes seen so far) averaged over the stream.",
                  "", accuracy_table(runs, stream, setting.methods)]
        lines += mask_numbers(runs, stream, setting.methods)
    lines += ["", "Plots: `accuracy_matrices.png` (R[i, j], mean over seeds, per stream and method), "
              "`anytime.png` (accuracy on the classes seen so far along each stream)."]
    return "\n".join(lines) + "\n"
