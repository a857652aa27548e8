"""Pure functions on tensors. Each op has ``mode="reference"`` (a plain loop, obviously right) and
a fast form (``"chunk"``, ``"grouped"``, ``"fast"``) that tests hold equal to it, outputs and gradients. [B, T, H, D] layout."""

from routemem.ops.apn import patch_mixture, route
from routemem.ops.block_pool import block_broadcast, block_causal_attention, causal_block_pool
from routemem.ops.delta_rule import gated_delta_rule
from routemem.ops.gated_sparse import (
    attention_probs, gate_scores, gated_attention, oracle_mask, random_causal_mask, topk_mask,
)
from routemem.ops.gla import gated_linear_attention
from routemem.ops.hopfield import default_beta, hopfield_energy, hopfield_retrieve, hopfield_state_energy
from routemem.ops.metaplastic import metaplastic_attention

__all__ = ["patch_mixture", "route", "causal_block_pool", "block_broadcast", "block_causal_attention",
           "gated_delta_rule", "gated_linear_attention", "metaplastic_attention",
           "attention_probs", "gate_scores", "gated_attention", "oracle_mask", "random_causal_mask", "topk_mask"]
__all__ += ["default_beta", "hopfield_energy", "hopfield_retrieve", "hopfield_state_energy"]
