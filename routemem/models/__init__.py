"""Models assembled from registered layers."""

from routemem.models.config import LMConfig
from routemem.models.transformer import Block, TransformerLM

__all__ = ["LMConfig", "Block", "TransformerLM"]
from routemem.models.vit import ViTConfig, VisionTransformer  # noqa: E402
from routemem.models.vit_weights import load_vit, read_vit_config, save_vit  # noqa: E402

__all__ += ["ViTConfig", "VisionTransformer", "load_vit", "read_vit_config", "save_vit"]
