"""A compact training loop for synthetic tasks whose batches are generated in memory (MQAR, the
continual protocols): the same AdamW groups, warmup + cosine schedule, clipping and autocast as the
``Trainer``, without corpora, checkpoints or run directories. Experiments run dozens of these."""

from __future__ import annotations

import math
import os
from typing import Callable

import torch
from tqdm.auto import tqdm

from routemem.errors import TrainingDiverged
from routemem.train.config import TrainConfig
from routemem.train.evaluate import autocast_context
from routemem.train.optim import lr_at, make_optimizer

BatchFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def fit_steps(model: torch.nn.Module, batch_at: BatchFn, cfg: TrainConfig, *, bf16: bool = False,
              device: torch.device | None = None, progress: str | None = None,
              after_step: Callable[[int], None] | None = None,
              after_backward: Callable[[int], None] | None = None) -> list[float]:
    """Train for ``cfg.max_steps`` steps on ``(inputs, targets) = batch_at(step)``; returns the loss
    of every step. ``model(inputs, targets)`` must return ``(logits, loss)``. Only parameters with
    ``requires_grad`` are optimised (freeze the rest to train a part of a model).
    ``after_step(step)`` runs after each optimizer step (e.g. to evaluate along the way);
    ``after_backward(step)`` between the backward pass and gradient clipping, while the step's
    gradients are still in ``.grad`` (e.g. to measure a part's gradient norm). Raises
    ``TrainingDiverged`` on a NaN/Inf loss (an unstable learning rate in a sweep, say).
    Batches are moved to ``device``, by default the one the model's parameters are on. ``progress`` names the
    step bar (none when None, or when ``$ROUTEMEM_STEP_BARS`` is 0: a study's worker processes
    set it, so that only their parent's bar is drawn)."""
    if device is None:
        device = next(model.parameters()).device
    optimizer = make_optimizer(model, cfg)
    model.train()
    losses = []
    steps = range(cfg.max_steps)
    quiet = progress is None or os.environ.get("ROUTEMEM_STEP_BARS", "1") == "0"
    bar = tqdm(steps, desc=progress, leave=False, disable=quiet, mininterval=2.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        inputs, targets = batch_at(step)
        with autocast_context(device, bf16):
            _, loss = model(inputs.to(device), targets.to(device))
        loss.backward()
        if after_backward is not None:
            after_backward(step)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(f"loss is {value} at step {step} (lr {cfg.lr:g})")
        losses.append(value)
        if after_step is not None:
            after_step(step)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{value:.3f}")
    return losses
