"""nn.Modules, one file per mechanism; each registers itself as a mixer or an FFN."""

from routemem.layers.registry import (
    FFNS,
    MIXERS,
    VARIANTS,
    LayerSpec,
    build_ffn,
    build_mixer,
    register_ffn,
    register_mixer,
)
from routemem.layers.norms import RMSNorm, make_norm

# Importing a layer file registers it.
from routemem.layers import apn, attention, ffn  # noqa: E402,F401  (registration side effect)
from routemem.layers import fast_slow, gated_deltanet, gated_sparse, mamba2, palimpsa  # noqa: E402,F401  (registration side effect)
from routemem.layers.apn import AttractorPatchFFN  # noqa: E402
from routemem.layers.attention import CausalSelfAttention  # noqa: E402
from routemem.layers.ffn import DenseFFN, NoFFN  # noqa: E402

__all__ = [
    "FFNS", "MIXERS", "VARIANTS", "LayerSpec", "build_ffn", "build_mixer", "register_ffn", "register_mixer",
    "RMSNorm", "make_norm", "AttractorPatchFFN", "CausalSelfAttention", "DenseFFN", "NoFFN",
]
