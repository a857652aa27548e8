"""Online class-incremental baselines: ``routemem reproduce ocl-baselines [--quick]``.

The reference table that Routing-without-Forgetting (papers/rwf.md) will be held against. A small
ViT is pretrained once on the glyph source's pretraining classes (``routemem pretrain-vit``'s
protocol, train/vit_pretrain.py); then every method of ``routemem.train.continual`` learns two
streams online from that backbone, one pass, batches of 10, no task ids at test time:

    glyphs   the glyph source's stream classes (characters the backbone never saw), split into
             tasks of disjoint classes
    digits   scikit-learn's 1797 handwritten digits (a real-image domain shift), 10 classes; skipped,
             with a note in the report, where scikit-learn is not installed

Methods: linear-probe, finetune, er, l2p, dualprompt, coda-prompt with their documented defaults, and
linear-probe-task: the linear probe trained with the current-task loss mask (``train_mask="task"``,
the prompt methods' convention), so the table shows what the mask alone is worth.
Metrics (train/continual/metrics.py): final average accuracy, average incremental accuracy,
forgetting, backward transfer, A_auc, the accuracy matrix and the anytime-accuracy curve.

The three claims are what the field expects of these baselines, each decided by the shared
directional rule (experiments/shared/common.py) on the glyph stream: replay beats sequential fine-tuning;
sequential fine-tuning forgets more than replay; the best prompt method beats the linear probe
(the premise of the prompt papers). Rules fixed here, before the full run.

Units of work (``--jobs`` / ``--shard``): the backbone's pretraining, then one per (stream,
method, seed); every stream unit loads the backbone the first unit wrote.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from routemem.experiments.ocl_baselines import report as ocl_report
from routemem.experiments.ocl_baselines.claims import claims
from routemem.experiments.shared.cache import RunCache, run_key
from routemem.experiments.shared.common import NOT_COMPILED, compile_fields, write_outputs
from routemem.experiments.shared.runner import Execution, Unit, run_units
from routemem.experiments.shared import vit_stream
from routemem.experiments.shared.vit_stream import (  # the backbone and stream runner; Setting
    PROMPT_METHODS,
    STREAMS,
    Setting,
    digits_available,
    ensure_backbone,
    learn_stream,
    pretrain_backbone,
    stream_data,
    stream_images,
)
from routemem.machine import machine_header

__all__ = ["FULL", "METHODS", "PROMPT_METHODS", "QUICK", "STREAMS", "Setting", "VARIANTS", "claims",
           "pretrain_backbone", "run", "stream_unit", "units"]

# Rows of this study that are a registered method run with other options: row -> (method, options).
# linear-probe-task trains the probe's loss over the current task's classes only, the mask of the
# prompt methods (and rwf), so the table separates what the mask is worth from what prompts add.
VARIANTS: dict[str, tuple[str, dict]] = {"linear-probe-task": ("linear-probe", {"train_mask": "task"})}
# the shared baselines (vit_stream.METHODS, rwf's too) plus the variant beside the probe it varies
METHODS = ("linear-probe", "linear-probe-task", "finetune", "er", "l2p", "dualprompt", "coda-prompt")
FULL = replace(vit_stream.FULL, methods=METHODS)
QUICK = replace(vit_stream.QUICK, methods=METHODS)


def stream_unit(setting: Setting, stream: str, method_name: str, seed: int, study_dir: str,
                device: str = "cpu") -> dict:
    """One method learning one stream online from the pretrained backbone."""
    from routemem.data.streams import make_stream

    images = stream_images(setting, stream)
    order = make_stream(images, setting.n_tasks, batch_size=setting.batch_size, seed=seed,
                        test_share=setting.test_share)
    base, options = VARIANTS.get(method_name, (method_name, {}))
    _, result = learn_stream(setting, study_dir, images, order, base, seed, device,
                             f"{stream} {method_name} seed={seed}", **options)
    return {"stream": stream, "seed": seed, "n_classes": images.n_classes, "train_samples": len(order),
            "images_sha256": images.sha256, **result,
            "method": method_name, "base_method": base}  # the row, not run_stream's method name, names the run


# --- the study -------------------------------------------------------------------------------


def units(setting: Setting, study_dir: Path, streams: tuple[str, ...], device: torch.device) -> list[Unit]:
    # a run reads its own stream, method and seed; the backbone's fields are in its key with the rest
    grid = ("streams", "methods", "seeds")
    return [Unit(f"{stream}-{method}-seed{seed}", stream_unit, (setting, stream, method, seed, str(study_dir), device.type),
                 run_key(setting, grid, stream=stream, method=method, seed=seed))
            for stream in streams for method in setting.methods for seed in setting.seeds]


def run(out: Path, quick: bool = False, data_dir: str | None = None, setting: Setting | None = None,
        device: str | torch.device = "auto", jobs: int = 1, shard=None,
        threads: int | None = None, compile: bool = False) -> dict:
    """Writes OUT/ocl-baselines/{results.json, report.md, *.png}; the backbone and finished runs
    are kept in OUT/ocl-baselines/runs/ (resumable; shards add up after the backbone exists)."""
    setting = setting or (QUICK if quick else FULL)
    execution = Execution.make(device, jobs, shard, threads, compile)
    study_dir = Path(out) / "ocl-baselines"
    started = time.perf_counter()
    streams = tuple(s for s in setting.streams if s != "digits" or digits_available())
    cache = RunCache(study_dir / "runs", asdict(setting))
    backbone = ensure_backbone(setting, study_dir, cache, execution, pretrain_backbone)
    todo = units(setting, study_dir, streams, execution.device)
    outcome = run_units(todo, cache, execution)
    if execution.shard is not None:
        return outcome.shard_summary(execution.shard, cache)
    runs = [outcome.records[u.name] for u in todo]
    results = {
        "study": "ocl-baselines",
        "mode": "quick" if quick else "full",
        "env": machine_header(execution.device),
        "execution": {"jobs": execution.jobs, "trained_on": cache.trained_on()},
        **compile_fields(execution.compile, NOT_COMPILED),
        "data": stream_data(setting, streams, runs),
        "setting": asdict(setting),
        "backbone": backbone.records["backbone"],
        "claims": claims(runs),
        "runs": runs,
        "runs_reused": outcome.reused + backbone.reused,
        "seconds": time.perf_counter() - started,
    }
    write_outputs(study_dir, results, ocl_report.report(results, setting))
    ocl_report.plots(study_dir, setting, runs, streams)
    return results

