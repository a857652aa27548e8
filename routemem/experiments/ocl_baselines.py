"""Online class-incremental baselines: ``routemem reproduce ocl-baselines [--quick]``.

The reference table that Routing-without-Forgetting (papers/rwf.md) will be held against. A small
ViT is pretrained once on the glyph source's pretraining classes (``routemem pretrain-vit``'s
protocol, train/vit_pretrain.py); then every method of ``routemem.train.continual`` learns two
streams online from that backbone, one pass, batches of 10, no task ids at test time:

    glyphs   the glyph source's stream classes (characters the backbone never saw), split into
             tasks of disjoint classes
    digits   scikit-learn's 1797 handwritten digits (a real-image domain shift), 10 classes; skipped,
             with a note in the report, where scikit-learn is not installed

Methods: linear-probe, finetune, er, l2p, dualprompt, coda-prompt with their documented defaults.
Metrics (train/continual_metrics.py): final average accuracy, average incremental accuracy,
forgetting, backward transfer, A_auc, the accuracy matrix and the anytime-accuracy curve.

The three claims are what the field expects of these baselines, each decided by the shared
directional rule (experiments/common.py) on the glyph stream: replay beats sequential fine-tuning;
sequential fine-tuning forgets more than replay; the best prompt method beats the linear probe
(the premise of the prompt papers). Rules fixed here, before the full run.

Units of work (``--jobs`` / ``--shard``): the backbone's pretraining, then one per (stream,
method, seed); every stream unit loads the backbone the first unit wrote.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from routemem.errors import DataError
from routemem.experiments import ocl_report
from routemem.experiments.common import (
    INCONCLUSIVE,
    RunCache,
    directional_verdict,
    summarize,
    write_outputs,
)
from routemem.experiments.runner import Execution, Unit, run_units
from routemem.machine import machine_header

METHODS = ("linear-probe", "finetune", "er", "l2p", "dualprompt", "coda-prompt")
STREAMS = ("glyphs", "digits")
PROMPT_METHODS = ("l2p", "dualprompt", "coda-prompt")


@dataclass(frozen=True)
class Setting:
    # the backbone (ViTConfig fields; the FFN is 4 x d_model wide)
    d_model: int = 192
    n_layer: int = 6
    n_head: int = 3
    patch_size: int = 4
    image_size: int = 32
    # 3000 steps: 45.5% validation accuracy (88% top-5, chance 0.16%) on the 629 pretraining classes
    # in 26 min on one core; 1000 steps gave 9.3% (measured for `routemem pretrain-vit`)
    pretrain_steps: int = 3000
    pretrain_batch: int = 64
    pretrain_lr: float = 1e-3
    pretrain_samples: int = 50  # rendered samples per pretraining class
    pretrain_classes: int | None = None  # None: every pretraining class of the glyph source
    # the streams
    glyph_classes: int = 100  # stream classes used
    glyph_samples: int = 50  # per class; test_share of them held out
    test_share: float = 0.2
    n_tasks: int = 5
    batch_size: int = 10
    anytime_points: int = 20  # anytime evaluations per stream
    methods: tuple[str, ...] = METHODS
    streams: tuple[str, ...] = STREAMS
    seeds: tuple[int, ...] = (0, 1, 2)


FULL = Setting()
QUICK = replace(FULL, d_model=64, n_layer=4, n_head=4, pretrain_steps=150, pretrain_samples=20, pretrain_classes=200,
                glyph_classes=20, glyph_samples=25, anytime_points=8, seeds=(0, 1))


# --- the backbone ----------------------------------------------------------------------------


def backbone_path(study_dir: Path) -> Path:
    """The pretrained weights (their sidecar beside them is backbone-vit.json; the run cache's own
    record of the unit is backbone.json)."""
    return Path(study_dir) / "runs" / "backbone-vit.safetensors"


def ensure_backbone(setting, study_dir: Path, cache: RunCache, execution: Execution, pretrain=None):
    """The study's backbone unit: reused when the cache has its record and its weights, else
    trained with ``pretrain`` (default ``pretrain_backbone``) in this process, never sharded (every
    stream unit loads it). Returns run_units' Outcome."""
    if not backbone_path(study_dir).exists():
        (Path(study_dir) / "runs" / "backbone.json").unlink(missing_ok=True)  # a record without its weights
    unit = Unit("backbone", pretrain or pretrain_backbone, (setting, str(study_dir), execution.device.type))
    outcome = run_units([unit], cache, replace(execution, shard=None, jobs=1), label="backbone")
    if not backbone_path(study_dir).exists():
        raise DataError(f"the backbone {backbone_path(study_dir)} is missing; delete {Path(study_dir) / 'runs'} and rerun")
    return outcome


def pretrain_backbone(setting: Setting, study_dir: str, device: str = "cpu") -> dict:
    """Pretrain the ViT on the glyph source's pretraining classes; write it beside the run cache."""
    from routemem.models.vit import ViTConfig
    from routemem.train.vit_pretrain import load_pretraining_images, pretrain_vit, write_pretrained

    images = load_pretraining_images("glyphs", size=setting.image_size, samples_per_class=setting.pretrain_samples,
                                     max_classes=setting.pretrain_classes)
    config = ViTConfig(image_size=setting.image_size, patch_size=setting.patch_size, in_chans=1,
                       d_model=setting.d_model, n_layer=setting.n_layer, n_head=setting.n_head,
                       mlp_hidden=4 * setting.d_model, n_classes=images.n_classes)
    model, record = pretrain_vit(config, images, steps=setting.pretrain_steps, batch_size=setting.pretrain_batch,
                                 lr=setting.pretrain_lr, seed=0, device=device)
    write_pretrained(model.cpu(), record, backbone_path(Path(study_dir)))
    return record


# --- the streams -----------------------------------------------------------------------------


def stream_images(setting: Setting, stream: str):
    """The ImageSet a stream draws from (the same images for every method and seed)."""
    from routemem.data.vision import load_source

    if stream == "glyphs":
        return load_source("glyphs:stream", size=setting.image_size, samples_per_class=setting.glyph_samples,
                           max_classes=setting.glyph_classes)
    return load_source("digits", size=setting.image_size)


def digits_available() -> bool:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return False
    return True


def learn_stream(setting, study_dir: str, images, order, method_name: str, seed: int, device: str,
                 label: str, **options):
    """A fresh method (on the study's backbone) learns ``order`` online; returns (the method, its
    result as JSON types). Shared by this study's and the rwf study's runs."""
    from routemem.models.vit_weights import load_vit
    from routemem.train.continual import make_method, result_to_json, run_stream

    backbone = load_vit(backbone_path(Path(study_dir)))
    method = make_method(method_name, backbone, images.n_classes, setting.n_tasks, seed=seed, **options)
    every = max(1, -(-len(order) // setting.anytime_points))
    result = run_stream(method, order, images, eval_every=every, device=device, seed=seed, progress=label)
    return method, result_to_json(result)


def stream_unit(setting: Setting, stream: str, method_name: str, seed: int, study_dir: str,
                device: str = "cpu") -> dict:
    """One method learning one stream online from the pretrained backbone."""
    from routemem.data.streams import make_stream

    images = stream_images(setting, stream)
    order = make_stream(images, setting.n_tasks, batch_size=setting.batch_size, seed=seed,
                        test_share=setting.test_share)
    _, result = learn_stream(setting, study_dir, images, order, method_name, seed, device,
                             f"{stream} {method_name} seed={seed}")
    return {"stream": stream, "method": method_name, "seed": seed, "n_classes": images.n_classes,
            "train_samples": len(order), "images_sha256": images.sha256, **result}


def stream_data(setting, streams: tuple[str, ...], runs: list[dict]) -> dict:
    """results.json's "data": the streams run, those skipped (no scikit-learn), the images' hashes."""
    return {"streams": list(streams), "skipped": [s for s in setting.streams if s not in streams],
            "sha256": {r["stream"]: r["images_sha256"] for r in runs}}


# --- claims ----------------------------------------------------------------------------------


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


# --- the study -------------------------------------------------------------------------------


def units(setting: Setting, study_dir: Path, streams: tuple[str, ...], device: torch.device) -> list[Unit]:
    return [Unit(f"{stream}-{method}-seed{seed}", stream_unit, (setting, stream, method, seed, str(study_dir), device.type))
            for stream in streams for method in setting.methods for seed in setting.seeds]


def run(out: Path, quick: bool = False, data_dir: str | None = None, setting: Setting | None = None,
        device: str | torch.device = "auto", jobs: int = 1, shard=None) -> dict:
    """Writes OUT/ocl-baselines/{results.json, report.md, *.png}; the backbone and finished runs
    are kept in OUT/ocl-baselines/runs/ (resumable; shards add up after the backbone exists)."""
    setting = setting or (QUICK if quick else FULL)
    execution = Execution.make(device, jobs, shard)
    study_dir = Path(out) / "ocl-baselines"
    started = time.perf_counter()
    streams = tuple(s for s in setting.streams if s != "digits" or digits_available())
    cache = RunCache(study_dir / "runs", asdict(setting))
    backbone = ensure_backbone(setting, study_dir, cache, execution)
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

