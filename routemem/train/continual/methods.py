"""Online class-incremental methods: the ``Method`` interface, and the two plain baselines
(``linear-probe``: frozen backbone, head only; ``finetune``: everything trains).

A method owns a copy of the backbone it is given (the caller's ``VisionTransformer`` is never
changed, so one pretrained backbone serves every method and seed), with the head re-initialised for
the stream's class count. The loop (``routemem.train.continual.run_stream``) drives it:

- ``begin_task(t, classes)`` at the first batch of task t (``classes``: the task's home classes);
- ``observe(images, labels)``: one optimizer step on the stream batch, called ``updates_per_batch``
  times per batch;
- ``after_batch(images, labels)``: once per stream batch, after its updates (ER fills its buffer);
- ``predict(images)``: logits over all classes, eval mode, no gradient.

Masking. Logits of classes the method has not yet seen in the stream are -inf, in training and at
test, so no method can predict a class before its first sample arrives. Each method picks what its
training loss sees (``train_mask``):

- ``"seen"``: every class seen so far in the stream, the current batch's included (the online,
  Si-Blurry convention). Default of linear-probe, finetune and er.
- ``"task"``: the classes seen so far in the current task only (the current batch's included), so
  earlier tasks' logits are masked out of the loss. This is the official L2P / DualPrompt /
  CODA-Prompt ``train_mask`` (their code unmasks the current task's classes), restricted to the
  classes already seen. Default of the prompt methods.

At test time every class seen so far is a candidate (no task ids).

Optimiser: Adam (betas 0.9, 0.999, no weight decay, constant rate), over ``trainable_parameters()``.
The official prompt methods use Adam and rebuild it at each task start
(``rebuild_optimizer_each_task = True``); the others keep one optimizer for the whole stream.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from routemem.errors import ConfigError, TrainingDiverged
from routemem.layers.options import check_int, check_positive
from routemem.models.vit import VisionTransformer

TRAIN_MASKS = ("seen", "task")


class Method(nn.Module):
    """The interface (module docstring) and what every method shares: the backbone copy with a
    fresh head, the seen-class masks, Adam, the step count. Subclasses say what trains
    (``_freeze``), and how logits and the auxiliary loss are computed (``_logits``)."""

    name = "method"  # the registry's name
    description = ""  # one line, listed by the registry
    rebuild_optimizer_each_task = False
    frozen_backbone = False

    def __init__(self, vit: VisionTransformer, n_classes: int, n_tasks: int, *, lr: float,
                 train_mask: str):
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"a method needs a VisionTransformer backbone, got {type(vit).__name__}")
        check_int(self.name, "n_classes", n_classes)
        check_int(self.name, "n_tasks", n_tasks)
        self.lr = check_positive(self.name, "lr", lr)
        if train_mask not in TRAIN_MASKS:
            raise ConfigError(f"{self.name}: train_mask must be one of {', '.join(TRAIN_MASKS)}, got {train_mask!r}")
        self.train_mask, self.n_classes, self.n_tasks = train_mask, n_classes, n_tasks
        self.vit = copy.deepcopy(vit)  # ours to train: the caller's backbone stays as it is
        self.vit.reset_head(n_classes)
        for p in self.vit.parameters():
            p.requires_grad_(True)
        if self.frozen_backbone:
            for p in self.vit.backbone_parameters():
                p.requires_grad_(False)
        self.register_buffer("seen", torch.zeros(n_classes, dtype=torch.bool))  # in the stream so far
        self.register_buffer("task_seen", torch.zeros(n_classes, dtype=torch.bool))  # in the current task
        self.task = -1
        self.steps = 0  # optimizer steps taken
        self.optimizer: torch.optim.Optimizer | None = None

    # -- what subclasses provide ------------------------------------------------------------------
    def _logits(self, images: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (unmasked logits [B, n_classes], auxiliary loss or None)."""
        return self.vit(images), None

    def _start_task(self, task: int) -> None:
        """Called by ``begin_task`` before the optimizer is (re)built (CODA-Prompt adds components)."""

    def _training_batch(self, images: torch.Tensor, labels: torch.Tensor):
        """The batch one update trains on (ER adds replayed samples)."""
        return images, labels

    # -- the interface ----------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer moves (those with ``requires_grad``)."""
        return [p for p in self.parameters() if p.requires_grad]

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.trainable_parameters(), lr=self.lr, betas=(0.9, 0.999), weight_decay=0.0)

    def begin_task(self, task: int, classes) -> None:
        """Task ``task`` starts (``classes``: its home classes, for bookkeeping; masks follow the
        samples actually seen)."""
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.n_tasks:
            raise ValueError(f"{self.name}: task must be an int in 0..{self.n_tasks - 1}, got {task!r}")
        self.task = task
        self.task_classes = torch.as_tensor(classes, dtype=torch.long)
        self.task_seen.zero_()
        self._start_task(task)
        if self.optimizer is None or self.rebuild_optimizer_each_task:
            self.optimizer = self.make_optimizer()

    def observe(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One optimizer step on a stream batch; returns the loss."""
        if self.optimizer is None:
            raise RuntimeError(f"{self.name}: call begin_task before observe")
        self.train()
        self.seen[labels] = True
        self.task_seen[labels] = True
        images, labels = self._training_batch(images, labels)
        logits, aux = self._logits(images, training=True)
        allowed = self.seen if self.train_mask == "seen" else self.task_seen
        loss = F.cross_entropy(logits.masked_fill(~allowed, float("-inf")), labels)
        if aux is not None:
            loss = loss + aux
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(f"{self.name}: loss is {value} at step {self.steps} (lr {self.lr:g})")
        return value

    def after_batch(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Once per stream batch, after its updates."""

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, n_classes] in eval mode; classes not seen so far are -inf (all of them
        before the first ``observe``)."""
        self.eval()
        logits, _ = self._logits(images, training=False)
        return logits.masked_fill(~self.seen, float("-inf"))

    def input_shape(self) -> tuple[int, int, int]:
        c = self.vit.config
        return c.in_chans, c.image_size, c.image_size


class LinearProbe(Method):
    """Frozen backbone; only the (re-initialised) linear head trains on the CLS feature.
    Loss: cross-entropy over the classes seen so far (``train_mask="seen"``). Adam, lr 1e-3."""

    name = "linear-probe"
    description = "frozen backbone, a linear head on the CLS feature (head only trains)"
    frozen_backbone = True

    def __init__(self, vit: VisionTransformer, n_classes: int, n_tasks: int, *, lr: float = 1e-3,
                 train_mask: str = "seen"):
        super().__init__(vit, n_classes, n_tasks, lr=lr, train_mask=train_mask)


class Finetune(Method):
    """Sequential fine-tuning, the lower reference: the whole ViT and its head train on each batch.
    Loss: cross-entropy over the classes seen so far (``train_mask="seen"``). Adam, lr 1e-4 (ours,
    not an official setting: ten times below the head-only rate so a pretrained backbone is
    adjusted rather than overwritten)."""

    name = "finetune"
    description = "sequential fine-tuning of the whole ViT (the lower reference)"

    def __init__(self, vit: VisionTransformer, n_classes: int, n_tasks: int, *, lr: float = 1e-4,
                 train_mask: str = "seen"):
        super().__init__(vit, n_classes, n_tasks, lr=lr, train_mask=train_mask)
