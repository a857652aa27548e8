"""RoutememConfig: an LMConfig as a transformers configuration (config.json, AutoConfig)."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from transformers import PreTrainedConfig

from routemem.models.config import LMConfig


class RoutememConfig(PreTrainedConfig):
    """Every ``LMConfig`` field under its own name, plus transformers' generic settings.

    transformers' usual names read and write the same fields (``hidden_size`` is ``d_model``,
    ``num_hidden_layers`` is ``n_layer``, ``tie_word_embeddings`` is ``tie_embeddings``...), so
    generic code (Trainer, generate, tying) finds what it looks for. Invalid values raise the
    ``ValueError`` / ``ConfigError`` that ``LMConfig`` and the layer registry raise.
    """

    model_type = "routemem"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "max_seq_len",
        "tie_word_embeddings": "tie_embeddings",
    }

    vocab_size: int = 256
    n_layer: int = 2
    d_model: int = 128
    n_head: int = 4
    max_seq_len: int = 256
    dropout: float = 0.0
    norm: str = "layernorm"
    pos: str = "learned"
    tie_embeddings: bool = True
    mixer: str = "attention"
    mixer_kwargs: dict[str, Any] = field(default_factory=dict)
    ffn: str = "dense"
    ffn_kwargs: dict[str, Any] = field(default_factory=dict)
    zero_init_residual: bool = False
    init_std: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.to_lm_config()  # refuse a bad architecture now, not when the model is built

    def to_lm_config(self) -> LMConfig:
        return LMConfig(**{f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(LMConfig)})

    @classmethod
    def from_lm_config(cls, config: LMConfig, **kwargs) -> RoutememConfig:
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(LMConfig)}, **kwargs)


def _plain(value):
    """A copy, so the LMConfig built from this config never shares its kwargs dicts."""
    return {k: _plain(v) for k, v in value.items()} if isinstance(value, dict) else value
