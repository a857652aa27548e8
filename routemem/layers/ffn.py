"""Baseline feed-forward layers: the dense GELU MLP and ``none`` (for mixer-only models)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from routemem.layers.registry import LayerSpec, register_ffn


@register_ffn("dense")
class DenseFFN(nn.Module):
    """Linear -> GELU -> Linear with ``mult * d_model`` hidden units (4x by default)."""

    def __init__(self, spec: LayerSpec, mult: float = 4.0, hidden: int | None = None, bias: bool = False):
        super().__init__()
        hidden = hidden or int(mult * spec.d_model)
        self.up = nn.Linear(spec.d_model, hidden, bias=bias)
        self.down = nn.Linear(hidden, spec.d_model, bias=bias)
        self.dropout = nn.Dropout(spec.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


@register_ffn("none")
class NoFFN(nn.Module):
    """Contributes nothing; the block then skips its FFN branch (and its norm) entirely."""

    is_identity = True

    def __init__(self, spec: LayerSpec):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)
