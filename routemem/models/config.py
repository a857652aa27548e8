"""LMConfig: everything that defines a TransformerLM's architecture."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope", "none")


@dataclass
class LMConfig:
    vocab_size: int = 256
    n_layer: int = 2
    d_model: int = 128
    n_head: int = 4
    max_seq_len: int = 256
    dropout: float = 0.0
    norm: str = "layernorm"  # layernorm | rmsnorm
    pos: str = "learned"  # learned | rope | none
    tie_embeddings: bool = True
    mixer: str = "attention"  # any name registered with routemem.layers.register_mixer
    mixer_kwargs: dict[str, Any] = field(default_factory=dict)
    ffn: str = "dense"  # any name registered with routemem.layers.register_ffn
    ffn_kwargs: dict[str, Any] = field(default_factory=dict)
    zero_init_residual: bool = False  # zero each branch's output projection at init
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "d_model", "n_head", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got '{self.norm}'")
        if self.pos not in POSITIONS:
            raise ValueError(f"pos must be one of {POSITIONS}, got '{self.pos}'")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.pos == "rope" and (self.d_model // self.n_head) % 2:
            raise ValueError("pos=rope needs an even head dimension (d_model / n_head)")
