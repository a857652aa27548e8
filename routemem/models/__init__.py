"""Models assembled from registered layers."""

from routemem.models.config import LMConfig
from routemem.models.transformer import Block, TransformerLM

__all__ = ["LMConfig", "Block", "TransformerLM"]
