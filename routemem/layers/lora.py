"""Low-rank adapters (LoRA): the usual parameter-efficient fine-tuning baseline.

``add_lora(module, rank)`` wraps every nn.Linear inside ``module``: the original weight is
frozen and a trainable update (alpha / rank) * B A is added, with B = 0 at the start so the
wrapped model computes exactly what it did before.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from routemem.layers.options import check_int, check_positive


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        check_int("lora", "rank", rank)
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.scaling = check_positive("lora", "alpha", alpha if alpha is not None else rank) / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * F.linear(F.linear(x, self.lora_a), self.lora_b)

    def merged_weight(self) -> torch.Tensor:
        """The weight of the single nn.Linear this layer now equals."""
        return self.base.weight + self.scaling * self.lora_b @ self.lora_a


def add_lora(module: nn.Module, rank: int, alpha: float | None = None) -> list[LoRALinear]:
    """Replace every nn.Linear under ``module`` (in place) by a LoRALinear around it."""
    wrapped = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                adapter = LoRALinear(child, rank, alpha)
                setattr(parent, name, adapter)
                wrapped.append(adapter)
    return wrapped
