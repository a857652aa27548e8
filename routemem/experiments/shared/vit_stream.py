"""The online class-incremental protocol shared by the ocl-baselines and rwf studies: the ViT
backbone (pretrained once on the glyph source's pretraining classes, ``routemem pretrain-vit``'s
protocol) and the runner that makes a method learn one stream online from it.

``Setting`` holds the backbone's and the streams' sizes; ``QUICK`` and ``FULL`` are the base that
both studies extend with their own methods (their ``BACKBONE_FIELDS`` must stay equal, so rwf can
reuse the ocl-baselines backbone).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from routemem.errors import DataError
from routemem.experiments.shared.cache import RunCache, run_key
from routemem.experiments.shared.runner import Execution, Unit, run_units

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


# every field pretrain_backbone reads: the backbone unit's key, so a study that grows (a seed, a
# method) or changes only its streams keeps its backbone (rwf compares the same fields to borrow one)
BACKBONE_FIELDS = ("d_model", "n_layer", "n_head", "patch_size", "image_size", "pretrain_steps", "pretrain_batch",
                   "pretrain_lr", "pretrain_samples", "pretrain_classes")


def ensure_backbone(setting, study_dir: Path, cache: RunCache, execution: Execution, pretrain=None):
    """The study's backbone unit: reused when the cache has its record and its weights, else
    trained with ``pretrain`` (default ``pretrain_backbone``) in this process, never sharded (every
    stream unit loads it). Returns run_units' Outcome."""
    if not backbone_path(study_dir).exists():
        (Path(study_dir) / "runs" / "backbone.json").unlink(missing_ok=True)  # a record without its weights
    unit = Unit("backbone", pretrain or pretrain_backbone, (setting, str(study_dir), execution.device.type),
                run_key({field: getattr(setting, field) for field in BACKBONE_FIELDS}))
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


def stream_data(setting, streams: tuple[str, ...], runs: list[dict]) -> dict:
    """results.json's "data": the streams run, those skipped (no scikit-learn), the images' hashes."""
    return {"streams": list(streams), "skipped": [s for s in setting.streams if s not in streams],
            "sha256": {r["stream"]: r["images_sha256"] for r in runs}}
