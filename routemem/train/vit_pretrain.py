"""Supervised pretraining of a VisionTransformer on an image source's pretraining classes, so that a
backbone exists on a machine with no downloads (``routemem pretrain-vit``).

Protocol: each class's samples in a seeded order, the first ``max(1, round(val_share * n))`` held out
for validation (the rest train; a class needs 2 samples); batches drawn without replacement, epoch
after epoch, each epoch a seeded permutation of the training samples; cross-entropy on a linear head
over the CLS feature; AdamW (weight decay on matrices only: not on norms, biases, the CLS token or
the position embeddings), linear warmup then cosine decay (``routemem.train.optim.lr_at``), gradient
clipping at 1, bf16 autocast where the device runs it natively (the Trainer's ``precision: auto``).
Validation accuracy (top-1 and top-5) on the held-out samples ``N_EVALS`` times, evenly spaced, the
last after the final step. Everything follows from ``seed``: two runs on one machine give the same
weights.

Which classes: ``load_pretraining_images`` takes the pretraining half of the source's fixed split
(``routemem.data.vision.split_pretrain_stream``: for glyphs the even CHARSET positions, for digits
and folders the fixed-permutation half), so a stream built from the other half holds only classes
the backbone never saw. ``all_classes=True`` trains on every class instead (a folder that holds only
pretraining data); a warning says that streams from the same source then reuse seen classes.

Files (``write_pretrained``): the weights with ``save_vit`` (safetensors, common ViT layout, config
in the metadata) and a JSON sidecar beside them (``FILE.json``), each written to a temp file and
renamed. ``check_out_path`` refuses a bad path before any work is done. The sidecar holds
``pretrain_vit``'s record: ``weights`` (the file's name), ``source``, ``source_sha256`` (the hash of
the images trained and validated on), ``class_names`` (so a stream can check that it holds none of
them), ``n_train`` / ``n_val``, ``config``, ``settings`` (steps, batch size, lr, min_lr, warmup,
weight decay, clipping, val share, seed), ``bf16``, ``seconds`` (the training loop's wall time,
evaluations included), ``images_per_s``, ``epochs``, ``val_accuracy`` / ``val_top5`` (after the
last step), ``chance``, ``curve`` (step, recent train loss, val accuracy at each evaluation) and
``env`` (``routemem.machine.machine_header``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from routemem.data.images import ImageSet
from routemem.errors import ConfigError, DataError, UserError
from routemem.fileio import check_output_path, write_text_atomic
from routemem.machine import machine_header
from routemem.models.vit import VisionTransformer, ViTConfig
from routemem.models.vit_weights import save_vit
from routemem.train.config import TrainConfig
from routemem.train.evaluate import autocast_context
from routemem.train.supervised import fit_steps
from routemem.train.trainer import bf16_supported

N_EVALS = 4  # validation points along the run (the last after the final step)
EVAL_BATCH = 256
WEIGHT_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class PretrainSettings:
    """The optimisation settings. The defaults train the default ViTConfig (192 wide, 6 blocks,
    2.8M parameters) on the 629 glyph pretraining classes (2.3 epochs of 28305 images) in under 9
    minutes on one loaded CPU core (bf16), to 9% validation accuracy (33% top-5; chance 0.16%):
    a weak but real backbone. More steps give a stronger one: ``--steps 3000`` (6.8 epochs) reached
    45.5% (88% top-5) in 26 minutes on the same core."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float | None = None  # the cosine's floor; None: lr / 100
    warmup_steps: int | None = None  # None: 10% of steps
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    val_share: float = 0.1
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be an int >= 1, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr must lie in [0, lr={self.lr}], got {self.min_lr!r}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(f"warmup_steps must lie in [0, steps={self.steps}], got {self.warmup_steps!r}")
        if not 0.0 < self.val_share < 1.0:
            raise ConfigError(f"val-share must lie strictly between 0 and 1, got {self.val_share!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("weight_decay and grad_clip must be >= 0")

    def train_config(self) -> TrainConfig:
        warmup = max(1, round(0.1 * self.steps)) if self.warmup_steps is None else max(1, self.warmup_steps)
        return TrainConfig(batch_size=self.batch_size, max_steps=self.steps, lr=float(self.lr),
                           min_lr=self.lr / 100 if self.min_lr is None else float(self.min_lr), warmup_steps=warmup, weight_decay=self.weight_decay,
                           grad_clip=self.grad_clip, seed=self.seed, progress=False)


# -- data -------------------------------------------------------------------------------------------
def load_pretraining_images(source: str, *, size: int = 32, samples_per_class: int = 50, seed: int = 0,
                            max_classes: int | None = None, color: str = "gray",
                            all_classes: bool = False) -> ImageSet:
    """The classes to pretrain on (module docstring). ``glyphs`` renders only its pretraining half;
    ``seed`` and ``samples_per_class`` shape rendered glyphs only; ``max_classes`` keeps that many
    (a fixed choice) of the classes trained on."""
    from routemem.data.vision import limit_classes, load_source, split_pretrain_stream

    if source == "glyphs:stream" and not all_classes:  # say so before rendering 632 classes to split
        raise DataError("'glyphs:stream' holds only the stream classes, which the backbone must not see: "
                        "pretrain on 'glyphs' (its pretraining half is used), or pass --all-classes")
    if source in ("glyphs", "glyphs:pretrain") and not all_classes:  # the half alone: half the rendering
        return load_source("glyphs:pretrain", size=size, seed=seed, samples_per_class=samples_per_class,
                           max_classes=max_classes)
    images = load_source(source, size=size, seed=seed, samples_per_class=samples_per_class, color=color)
    if all_classes:
        print(f"routemem: warning: training on all {images.n_classes} classes of '{source}': a stream "
              "built from this source will hold classes the backbone has seen", file=sys.stderr)
    else:
        images = split_pretrain_stream(images)[0]
    return images if max_classes is None else limit_classes(images, max_classes)


def split_train_val(labels: np.ndarray, val_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices), sorted: per class, its samples in a seeded order, the first
    ``max(1, round(val_share * n))`` (at most n - 1) for validation."""
    rng = np.random.default_rng([seed, 29])
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < 2:
            raise DataError(f"class {int(c)} has {len(idx)} sample(s): pretraining needs at least 2 per class "
                            "(one to train on, one to validate)")
        n_val = min(max(1, int(np.floor(val_share * len(idx) + 0.5))), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class EpochSampler:
    """Batch ``step`` of an endless sequence of epochs, each a seeded permutation of ``indices``:
    every sample once per epoch, a batch may run over into the next epoch. A pure function of
    (seed, step), so a run needs no sampler state."""

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int):
        self.indices, self.batch_size, self.seed = np.asarray(indices), batch_size, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, 31, epoch]).permutation(len(self.indices))
        return self._perms[epoch]

    def __call__(self, step: int) -> np.ndarray:
        n = len(self.indices)
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        out = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(positions // n):
            where = positions // n == epoch
            out[where] = self.indices[self._perm(int(epoch))[positions[where] % n]]
        return out


# -- model and training -----------------------------------------------------------------------------
class _WithLoss(nn.Module):
    """``fit_steps``' interface: (images, labels) -> (logits, cross-entropy); keeps each step's loss
    (detached, no sync) so that the evaluations along the way can report the recent training loss."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit
        self.losses: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.vit(images)
        loss = F.cross_entropy(logits.float(), labels)
        self.losses.append(loss.detach())
        return logits, loss


@torch.no_grad()
def accuracy(model: VisionTransformer, images: torch.Tensor, labels: torch.Tensor, *, device: torch.device,
             bf16: bool = False, batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """Top-1 and top-5 accuracy of ``model`` on ``images`` [N, C, H, W] (CPU) with ``labels`` [N]."""
    was_training = model.training
    model.eval()
    top1 = top5 = 0
    try:
        for lo in range(0, len(labels), batch_size):
            x, y = images[lo:lo + batch_size].to(device), labels[lo:lo + batch_size].to(device)
            with autocast_context(device, bf16):
                logits = model(x).float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            top1 += (top[:, 0] == y).sum().item()
            top5 += (top == y[:, None]).any(dim=1).sum().item()
    finally:
        model.train(was_training)
    n = max(1, len(labels))
    return {"val_accuracy": top1 / n, "val_top5": top5 / n}


def eval_steps(steps: int, n_evals: int = N_EVALS) -> list[int]:
    """The steps (0-based, after which to evaluate): evenly spaced, the last step always among them."""
    return sorted({max(0, math.ceil(k * steps / n_evals) - 1) for k in range(1, n_evals + 1)})


def pretrain_vit(config: ViTConfig, images: ImageSet, *, steps: int = PretrainSettings.steps,
                 batch_size: int = PretrainSettings.batch_size, lr: float = PretrainSettings.lr, seed: int = 0,
                 device: torch.device | str = "cpu", val_share: float = PretrainSettings.val_share,
                 min_lr: float | None = None, warmup_steps: int | None = None,
                 weight_decay: float = PretrainSettings.weight_decay, bf16: bool | None = None,
                 progress: bool = False) -> tuple[VisionTransformer, dict]:
    """Train a VisionTransformer from scratch to classify ``images`` (all its classes: pick the
    pretraining ones with ``load_pretraining_images``); protocol in the module docstring.
    ``config``'s n_classes, in_chans and image_size are taken from the data. ``min_lr``: None is
    lr / 100; ``warmup_steps``: None is 10% of the steps; ``bf16``: None autocasts where the device
    runs bf16 natively; ``progress``: a step bar and one stderr line per evaluation.
    Returns (the model, in eval mode on ``device``; the record, which the sidecar file holds)."""
    settings = PretrainSettings(steps=steps, batch_size=batch_size, lr=lr, seed=seed, val_share=val_share,
                                min_lr=min_lr, warmup_steps=warmup_steps,
                                weight_decay=weight_decay)
    device = torch.device(device)
    bf16 = bf16_supported(device) if bf16 is None else bool(bf16)
    config = replace(config, n_classes=images.n_classes, in_chans=images.channels, image_size=images.size)
    train_idx, val_idx = split_train_val(images.labels, settings.val_share, settings.seed)
    all_images, all_labels = torch.from_numpy(images.images), torch.from_numpy(images.labels)
    val_images, val_labels = all_images[val_idx], all_labels[val_idx]
    sampler = EpochSampler(train_idx, settings.batch_size, settings.seed)

    torch.manual_seed(settings.seed)
    model = VisionTransformer(config).to(device)
    no_decay = (model.cls_token, model.pos_embed)
    for p in no_decay:
        p._no_weight_decay = True  # as ViT recipes do; optim.wants_weight_decay reads the mark
    wrapped = _WithLoss(model)

    def batch_at(step: int):
        idx = torch.from_numpy(sampler(step))
        return all_images[idx], all_labels[idx]

    curve, at = [], set(eval_steps(settings.steps))
    window = max(1, settings.steps // (2 * N_EVALS))  # the train loss reported: mean over the recent steps

    def after_step(step: int) -> None:
        if step not in at:
            return
        recent = torch.stack(wrapped.losses[-window:]).mean().item()
        point = {"step": step + 1, "train_loss": recent,
                 **accuracy(model, val_images, val_labels, device=device, bf16=bf16)}
        curve.append(point)
        if progress:
            from tqdm.auto import tqdm

            tqdm.write(f"pretrain-vit: step {point['step']}/{settings.steps}  train loss {recent:.3f}  val accuracy "
                       f"{point['val_accuracy']:.3f} (top-5 {point['val_top5']:.3f})", file=sys.stderr)

    cfg = settings.train_config()
    start = time.perf_counter()
    try:
        fit_steps(wrapped, batch_at, cfg, bf16=bf16, device=device, progress="pretrain-vit" if progress else None,
                  after_step=after_step)
    finally:  # the model handed back is what load_vit gives from the file: no marks left on it
        for p in no_decay:
            del p._no_weight_decay
    seconds = time.perf_counter() - start
    model.eval()
    final = curve[-1]
    record = {
        "source": images.name, "source_sha256": images.sha256, "n_classes": images.n_classes,
        "class_names": list(images.class_names), "n_train": len(train_idx), "n_val": len(val_idx),
        "config": asdict(config), "n_params": model.num_params(),
        "settings": {**asdict(settings), "warmup_steps": cfg.warmup_steps, "min_lr": cfg.min_lr},
        "bf16": bf16, "device": device.type, "seconds": seconds,
        "images_per_s": settings.steps * settings.batch_size / seconds,
        "epochs": settings.steps * settings.batch_size / len(train_idx),
        "val_accuracy": final["val_accuracy"], "val_top5": final["val_top5"], "chance": 1.0 / images.n_classes,
        "final_train_loss": final["train_loss"], "curve": curve, "env": machine_header(device),
    }
    return model, record


# -- files ------------------------------------------------------------------------------------------
def sidecar_path(out: str | Path) -> Path:
    """``model.safetensors`` -> ``model.json``."""
    return Path(out).with_suffix(".json")


def check_out_path(out: str | Path) -> Path:
    """Refuse, before any work, an output path the weights cannot be written to: not ending in
    .safetensors, an existing folder (or a folder at the sidecar's path), under a file, or in a
    folder that cannot be written."""
    out = check_output_path(out, "--out", folder=False)  # empty, a folder, under a file, unwritable
    if out.suffix != WEIGHT_SUFFIX or out.name == WEIGHT_SUFFIX:
        raise UserError(f"--out must name a {WEIGHT_SUFFIX} file (the JSON sidecar goes beside it), got '{out}'")
    if sidecar_path(out).is_dir():
        raise UserError(f"--out: {sidecar_path(out)} (where the JSON sidecar goes) is a folder")
    return out


def write_pretrained(model: VisionTransformer, record: dict, out: str | Path) -> tuple[Path, Path]:
    """The weights (``save_vit``) and then the sidecar, each atomically; if the sidecar cannot be
    written the new weights are removed again, so a pair is never left half-written."""
    out = check_out_path(out)
    save_vit(model, out)
    sidecar = sidecar_path(out)
    try:
        write_text_atomic(sidecar, json.dumps({"weights": out.name, **record}, indent=2) + "\n")
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return out, sidecar
