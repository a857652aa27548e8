"""Routing without Forgetting against the online baselines: ``routemem reproduce rwf [--quick]``.

RwF (papers/rwf.md; the method ``rwf``, routemem/train/continual/rwf.py) on the ocl-baselines
study's backbone and streams, beside the six baselines of that study, plus two streams the paper
names and two the field uses. Every stream is online (one pass, batches of 10), class-incremental,
no task ids at test time; all four draw from the same images as ocl-baselines:

    glyphs          the glyph source's stream classes in tasks of disjoint classes
    digits          scikit-learn's handwritten digits (skipped, with a note, without scikit-learn)
    glyphs-fewshot  the glyph stream with only ``shots`` training samples per class (test set unchanged)
    glyphs-blurry   Si-Blurry-style: ``disjoint_share`` of the classes disjoint, ``blurry_share`` of each
                    blurry class's samples moved to other tasks (routemem/data/streams.py)

Arms: rwf (its defaults) and linear-probe, finetune, er, l2p, dualprompt, coda-prompt (their
defaults) on every stream; on the glyph stream the ablations of rwf in ``ABLATIONS`` (prompted
blocks 0 / 1 / all beside the default, 3 Hopfield steps, a static learned prompt of the same size,
training only the state patterns or only the output projection). An ablation identical to the
default on this backbone (e.g. 1 block where the default is 1 block) is not run twice: the report
says so.

Diagnostics of each rwf run with retrieval (the run record's ``retrieval``): at the end of the
stream, on up to ``diagnostic_samples`` test images, per prompted block the retrieval weights'
entropy (``HopfieldPromptGenerator.retrieval_stats()``) and how the prompts differ across classes
(routemem/experiments/rwf/claims.py, ``prompt_similarity``).

The claims and their rules, fixed here before any run (routemem/experiments/rwf/claims.py):
(1) on the glyph stream RwF beats each prompt baseline (l2p, dualprompt, coda-prompt) on final
average accuracy and on A_auc: the shared directional rule per (baseline, metric) pair, the six
verdicts combined by ``combine_verdicts`` (all reproduced: reproduced; one against: not reproduced);
(2) the same on the few-shot stream; (3) per ablation: default RwF beats the ablation on final
average accuracy (the directional rule; "reproduced" says the removed or changed part helps), and a
sentence, computed from the numbers, on which ablation costs most.

Units of work (``--jobs`` / ``--shard``): the backbone (vit_stream.pretrain_backbone: the same
setting fields give the same backbone; copied from OUT/ocl-baselines when that study, run into the
same folder, pretrained it with the same fields), then one per (stream, arm, seed).

Budget (the full setting, estimated from per-image times measured on this 2-core VM under load,
one thread): runs about 2.5 h, plus 26 min of pretraining unless the backbone is copied.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from routemem.experiments.shared import vit_stream
from routemem.experiments.rwf import claims as rwf_claims
from routemem.experiments.rwf import report as rwf_report
from routemem.experiments.shared.cache import RunCache, run_key
from routemem.experiments.shared.common import NOT_COMPILED, compile_fields, write_outputs
from routemem.experiments.shared.vit_stream import (  # BACKBONE_FIELDS: what pretrain_backbone reads
    BACKBONE_FIELDS,
    backbone_path,
    digits_available,
    ensure_backbone,
    learn_stream,
    pretrain_backbone,
    stream_data,
    stream_images,
)
from routemem.experiments.shared.runner import Execution, Unit, run_units
from routemem.fileio import write_bytes_atomic
from routemem.machine import machine_header

METHODS = (*vit_stream.METHODS, "rwf")
STREAMS = ("glyphs", "digits", "glyphs-fewshot", "glyphs-blurry")
# name -> rwf options; "all" for layers means every block of the backbone
ABLATIONS: dict[str, dict] = {
    "blocks-0": {"layers": []},
    "blocks-1": {"layers": [0]},
    "blocks-all": {"layers": "all"},
    "steps-3": {"steps": 3},
    "static": {"retrieval": False},
    "train-queries": {"train": "queries"},
    "train-output": {"train": "output"},
}
ABLATION_STREAM = rwf_claims.ABLATION_STREAM


@dataclass(frozen=True)
class Setting(vit_stream.Setting):
    """ocl-baselines' setting (backbone, stream sizes, seeds) plus the streams and arms of this study."""

    methods: tuple[str, ...] = METHODS
    streams: tuple[str, ...] = STREAMS
    shots: int = 5  # training samples per class in the few-shot stream
    disjoint_share: float = 0.5  # Si-Blurry's N: share of disjoint classes in the blurry stream
    blurry_share: float = 0.1  # Si-Blurry's M: share of a blurry class's samples in other tasks
    ablations: tuple[str, ...] = tuple(ABLATIONS)
    diagnostic_samples: int = 200  # about this many test images (>= 2 a class) for the retrieval diagnostics


# 10 anytime evaluations, not ocl-baselines' 20: each evaluates every test image of the classes seen
# so far (a forward, ~6 ms an image on the full ViT, one thread), so with 20 the evaluations of the
# glyph stream (12k forwards a run) cost twice its training (4k steps of 5-26 ms) and the full study
# would need about 4 h here
FULL = Setting(anytime_points=10)
QUICK = Setting(**{**asdict(vit_stream.QUICK), "methods": METHODS, "streams": STREAMS})


def ablation_options(setting: Setting, name: str) -> dict:
    """The rwf options of ablation ``name`` on this setting's backbone."""
    options = dict(ABLATIONS[name])
    if options.get("layers") == "all":
        options["layers"] = list(range(setting.n_layer))
    return options


def ablation_arms(setting: Setting) -> tuple[dict[str, dict], dict[str, str]]:
    """(arm -> rwf options to run, skipped ablation -> why): an ablation that resolves to the
    default's prompted blocks is the default itself and is not run again."""
    from routemem.layers.prompts import scale_layers

    default_layers = list(scale_layers(0, 3, setting.n_layer))  # HopfieldPromptGenerator's default
    arms, skipped = {}, {}
    for name in setting.ablations:
        options = ablation_options(setting, name)
        if options.get("layers") is not None and list(options["layers"]) == default_layers:
            skipped[name] = f"the default already prompts blocks {default_layers}"
        else:
            arms[arm_name(name)] = options
    return arms, skipped


def arm_name(ablation: str) -> str:
    return f"rwf:{ablation}"


def borrow_backbone(setting: Setting, study_dir: Path, cache: RunCache) -> bool:
    """Copy the ocl-baselines study's backbone from the same output folder into this study's cache
    when it was pretrained with this setting's ``BACKBONE_FIELDS`` (sparing the full setting's 26
    min of pretraining); True if it did. Nothing is copied when this study has its backbone."""
    source = study_dir.parent / "ocl-baselines"
    if backbone_path(study_dir).exists() or not backbone_path(source).exists():
        return False
    try:
        cached = json.loads((source / "runs" / "backbone.json").read_text())
        theirs, record = cached["setting"], cached["run"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    ours = json.loads(json.dumps(asdict(setting)))
    if any(theirs.get(field) != ours[field] for field in BACKBONE_FIELDS):
        return False
    backbone_path(study_dir).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(backbone_path(study_dir), backbone_path(source).read_bytes())
    cache.put("backbone", {**record, "copied_from": str(backbone_path(source))}, cached.get("env"))
    return True


# --- one run ---------------------------------------------------------------------------------


def stream_kwargs(setting: Setting, stream: str) -> dict:
    """make_stream's arguments for ``stream`` beyond the shared ones."""
    if stream == "glyphs-fewshot":
        return {"shots": setting.shots}
    if stream == "glyphs-blurry":
        return {"disjoint_share": setting.disjoint_share, "blurry_share": setting.blurry_share}
    return {}


def source_of(stream: str) -> str:
    return "digits" if stream == "digits" else "glyphs"


def stream_unit(setting: Setting, stream: str, arm: str, seed: int, study_dir: str, device: str = "cpu") -> dict:
    """One arm learning one stream online from the pretrained backbone (ocl-baselines' stream_unit
    plus the stream's own arguments, the arm's rwf options and the retrieval diagnostics)."""
    from routemem.data.streams import make_stream

    images = stream_images(setting, source_of(stream))
    order = make_stream(images, setting.n_tasks, batch_size=setting.batch_size, seed=seed,
                        test_share=setting.test_share, **stream_kwargs(setting, stream))
    method_name, options = ("rwf", ablation_arms(setting)[0][arm]) if arm.startswith("rwf:") else (arm, {})
    method, result = learn_stream(setting, study_dir, images, order, method_name, seed, device,
                                  f"{stream} {arm} seed={seed}", **options)
    record = {"stream": stream, "seed": seed, "n_classes": images.n_classes, "train_samples": len(order),
              "images_sha256": images.sha256, "stream_settings": order.settings, **result,
              "method": arm, "base_method": method_name}  # the arm, not run_stream's "rwf", names the run
    if method_name == "rwf":
        record["retrieval"] = retrieval_diagnostics(method, images, order.test_indices, setting.diagnostic_samples,
                                                    seed)
    return record


@torch.no_grad()
def retrieval_diagnostics(method, images, test_indices: np.ndarray, samples: int, seed: int) -> dict | None:
    """Per prompted block, at the end of the stream, on about ``samples`` test images (the same
    number from each class, at least 2 so that every class has a within-class pair; a seeded draw):
    the retrieval weights' entropy and how the prompts differ across classes. None when the arm
    retrieves nothing (no prompted block, or a static prompt)."""
    generator = method.prompt
    if not generator.layers or not generator.retrieval:
        return None
    rng = np.random.default_rng([seed, 14])
    classes = np.unique(images.labels[test_indices])
    per_class = max(2, -(-samples // len(classes)))
    chosen = np.sort(np.concatenate([rng.permutation(test_indices[images.labels[test_indices] == c])[:per_class]
                                     for c in classes]))
    ref = method.vit.head.weight
    batch = torch.from_numpy(images.images[chosen]).to(device=ref.device, dtype=ref.dtype)
    method.predict(batch)  # one forward: the generator keeps this batch's weights and prompts
    stats = generator.retrieval_stats()
    labels = images.labels[chosen]
    return {"samples": len(chosen), "blocks": {
        str(layer): {**stats[layer], **rwf_claims.prompt_similarity(generator.last_prompts[layer].float().cpu(), labels)}
        for layer in generator.layers}}


# --- the study -------------------------------------------------------------------------------


def units(setting: Setting, study_dir: Path, streams: tuple[str, ...], device: torch.device) -> list[Unit]:
    arms = [(stream, method) for stream in streams for method in setting.methods]
    if ABLATION_STREAM in streams:
        arms += [(ABLATION_STREAM, arm) for arm in ablation_arms(setting)[0]]
    # a run reads its own stream, arm (an ablation's options follow from its name and n_layer) and
    # seed; the backbone's and the streams' fields are in its key with the rest
    grid = ("streams", "methods", "ablations", "seeds")
    return [Unit(f"{stream}-{arm.replace(':', '-')}-seed{seed}", stream_unit,
                 (setting, stream, arm, seed, str(study_dir), device.type),
                 run_key(setting, grid, stream=stream, arm=arm, seed=seed))
            for stream, arm in arms for seed in setting.seeds]


def run(out: Path, quick: bool = False, data_dir: str | None = None, setting: Setting | None = None,
        device: str | torch.device = "auto", jobs: int = 1, shard=None,
        threads: int | None = None, compile: bool = False) -> dict:
    """Writes OUT/rwf/{results.json, report.md, *.png}; the backbone and finished runs are kept in
    OUT/rwf/runs/ (resumable; shards add up after the backbone exists)."""
    setting = setting or (QUICK if quick else FULL)
    execution = Execution.make(device, jobs, shard, threads, compile)
    study_dir = Path(out) / "rwf"
    started = time.perf_counter()
    streams = tuple(s for s in setting.streams if s != "digits" or digits_available())
    cache = RunCache(study_dir / "runs", asdict(setting))
    borrow_backbone(setting, study_dir, cache)
    backbone = ensure_backbone(setting, study_dir, cache, execution, pretrain_backbone)
    todo = units(setting, study_dir, streams, execution.device)
    outcome = run_units(todo, cache, execution)
    if execution.shard is not None:
        return outcome.shard_summary(execution.shard, cache)
    runs = [outcome.records[u.name] for u in todo]
    arms, skipped = ablation_arms(setting)
    ablations = list(arms) if ABLATION_STREAM in streams else []
    results = {
        "study": "rwf",
        "mode": "quick" if quick else "full",
        "env": machine_header(execution.device),
        "execution": {"jobs": execution.jobs, "trained_on": cache.trained_on()},
        **compile_fields(execution.compile, NOT_COMPILED),
        "data": stream_data(setting, streams, runs),
        "setting": asdict(setting),
        "ablations": {"stream": ABLATION_STREAM, "arms": {a: arms[a] for a in ablations},
                      "skipped": skipped},
        "backbone": backbone.records["backbone"],
        "claims": rwf_claims.claims(runs, ablations),
        "ablation_summary": rwf_claims.ablation_summary(runs, ablations),
        "runs": runs,
        "runs_reused": outcome.reused + backbone.reused,
        "seconds": time.perf_counter() - started,
    }
    write_outputs(study_dir, results, rwf_report.report(results, setting))
    rwf_report.plots(study_dir, setting, runs, streams, ablations)
    return results
