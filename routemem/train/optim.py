"""AdamW with decay/no-decay parameter groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from routemem.train.config import TrainConfig


def wants_weight_decay(name: str, param: nn.Parameter, no_decay_ids: set[int]) -> bool:
    """Decay matrices only: not norms or biases (1-D), not gates, not marked parameters."""
    if id(param) in no_decay_ids or getattr(param, "_no_weight_decay", False):
        return False
    if param.ndim < 2:
        return False
    return "gate" not in name.split(".")[-1]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups. Tied embeddings (shared with the output head) are not decayed."""
    no_decay_ids: set[int] = set()
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_embeddings", False):
        no_decay_ids.add(id(model.tok_emb.weight))
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if wants_weight_decay(name, param, no_decay_ids) else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine down to ``min_lr`` at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
