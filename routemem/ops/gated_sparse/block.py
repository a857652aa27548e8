"""Block-routed causal attention: query block i reads its own block (causally) and, by the gate's
block scores, either its ``top_k_blocks`` best past key blocks (hard: an integer choice, so no
gradient reaches the scores) or every past block with log sigmoid(score / tau) added to the logits
of each of its keys (soft). Scores come from ``block_scores`` (block_select.py): moba's parameter-free
q . k block means, a learned low-rank gate, or any caller's [B, H, n, n] (the oracle's mass).

Modes: "reference" (T x T masked softmax), "gather" (CPU fused SDPA on gathered blocks), "flex"
(flex_attention with a BlockMask; CUDA, CPU without gradients), "auto" (flex on CUDA, else gather).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from routemem.ops.checks import check_mode, check_qkv, checking_values, expect_same_dtype, expect_shape
from routemem.ops.gated_sparse.block_flex import flex_block_attention
from routemem.ops.gated_sparse.block_forms import gather_attention, reference_attention
from routemem.ops.gated_sparse.block_select import n_blocks, past_block_mask, select_past_blocks

BLOCK_MODES = ("reference", "gather", "flex", "auto")
BLOCK_GATINGS = ("hard", "soft")
FORMS = {"reference": reference_attention, "gather": gather_attention, "flex": flex_block_attention}


def block_routed_attention(q, k, v, block_scores, *, block_size, gating="hard", top_k_blocks=None, tau=1.0,
                           scale=None, mode="auto"):
    """q, k [B, T, H, Dk]; v [B, T, H, Dv]; block_scores [B, H, n, n] (n = ceil(T / block_size);
    entries j >= i are ignored) -> [B, T, H, Dv].

    gating        "hard" (top_k_blocks past blocks, plus the own block) | "soft" (every causal
                  block, logits += log sigmoid(score / tau) on past blocks, 0 on the own block)
    top_k_blocks  past key blocks per query block (hard only); fewer when fewer exist.
    """
    B, T, H, Dk, _ = check_qkv(q, k, v)
    if T == 0:
        raise ValueError("q has no tokens (T = 0)")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    n = n_blocks(T, block_size)
    expect_shape("block_scores", block_scores, (B, H, n, n), f"[B, H, n, n] with n = ceil(T / block_size) = {n}")
    expect_same_dtype(q, k=k, v=v, block_scores=block_scores)
    check_mode(mode, BLOCK_MODES)
    if gating not in BLOCK_GATINGS:
        raise ValueError(f"gating must be one of {BLOCK_GATINGS}, got {gating!r}")
    past = past_block_mask(n, q.device)
    if checking_values() and torch.isnan(block_scores.masked_fill(~past, 0)).any():
        raise ValueError("block_scores has NaN entries at past blocks")
    scale = Dk ** -0.5 if scale is None else float(scale)
    if mode == "auto":
        mode = "flex" if q.device.type == "cuda" else "gather"
    form = FORMS[mode]
    if gating == "soft":
        if top_k_blocks is not None:
            raise ValueError("top_k_blocks is not used with gating='soft' (it reads every causal block)")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise ValueError(f"tau must be a number > 0, got {tau!r}")
        bias = F.logsigmoid(block_scores.masked_fill(~past, 0.0) / tau)
        return form(q, k, v, block_size, scale, bias=bias)
    if tau != 1.0:
        raise ValueError("tau is not used with gating='hard'")
    if isinstance(top_k_blocks, bool) or not isinstance(top_k_blocks, int) or top_k_blocks < 0:
        raise ValueError(f"gating='hard' needs top_k_blocks, an int >= 0, got {top_k_blocks!r}")
    blocks, valid = select_past_blocks(block_scores, top_k_blocks)
    return form(q, k, v, block_size, scale, blocks=blocks, valid=valid)
