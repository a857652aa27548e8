"""Models assembled from registered layers."""

from routemem.models.config import LMConfig
from routemem.models.transformer import Block, TransformerLM
from routemem.models.vit import VisionTransformer, ViTConfig
from routemem.models.vit_weights import load_vit, read_vit_config, save_vit

__all__ = ["LMConfig", "Block", "TransformerLM"]
__all__ += ["ViTConfig", "VisionTransformer", "load_vit", "read_vit_config", "save_vit"]
