"""Gated sparse attention: causal softmax attention whose keys are weighted or chosen by a gate.

The gate is a low-rank bilinear scorer per head, s_ij = (A x_i) . (B x_j) / sqrt(r), j <= i
(``gate_scores`` takes gq = A x and gk = B x). ``gated_attention`` applies it in one of four ways:

- ``"dense"``: no gate, plain causal attention (the baseline, and dense deployment);
- ``"soft"``:  logits_ij += log sigmoid(s_ij / tau), differentiable in the gate;
- ``"hard"``:  each query keeps its k best causal keys by gate score and attends over those only.
  The choice is integer indices, so the gate gets exactly zero gradient through it (the claim of
  the routing-absorption paper); ties go to the lower key index (selection.py);
- ``"mask"``:  an explicit boolean mask from the caller (oracle or random masks), intersected with
  causality.

``mode="reference"`` is one full masked softmax over T x T for every gating; ``mode="fast"`` is
SDPA for dense, soft and mask, and for hard a gather of the k kept K and V rows per query (the
attention part is O(T k) memory; the gate's own scoring and the top-k sort stay O(T^2)).
Layout [B, T, H, D] like the other ops. Block routing (query blocks choosing key blocks, the form
that is faster than dense attention) is ``block_routed_attention`` with ``block_scores`` (block.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from routemem.ops.checks import check_mode, check_qkv, checking_values, expect_same_dtype, expect_shape
from routemem.ops.gated_sparse.block import block_routed_attention
from routemem.ops.gated_sparse.block_select import block_scores
from routemem.ops.gated_sparse.fast import gathered_attention, sdpa_attention
from routemem.ops.gated_sparse.reference import masked_softmax_attention
from routemem.ops.gated_sparse.scores import attention_probs, causal_mask, gate_scores
from routemem.ops.gated_sparse.selection import (
    check_top_k,
    oracle_mask,
    random_causal_mask,
    topk_key_indices,
    topk_mask,
    topk_mask_by_rank,
)

MODES = ("reference", "fast")
GATINGS = ("dense", "soft", "hard", "mask")

__all__ = ["GATINGS", "MODES", "attention_probs", "block_routed_attention", "block_scores", "causal_mask",
           "gate_scores", "gated_attention", "oracle_mask", "random_causal_mask", "topk_key_indices", "topk_mask"]


def gated_attention(q, k, v, *, gating="dense", gate_scores=None, top_k=None, tau=1.0, mask=None,
                    scale=None, mode="fast"):
    """Causal attention with the gate applied. q, k [B, T, H, Dk]; v [B, T, H, Dv] -> [B, T, H, Dv].

    gating       "dense" | "soft" | "hard" | "mask" (module docstring).
    gate_scores  [B, H, T, T] (``gate_scores(gq, gk)``), needed by soft and hard, refused otherwise.
                 Entries above the diagonal are ignored; NaN is refused.
    top_k        keys kept per query (hard only); a query with fewer causal keys keeps them all.
    tau          soft-gate temperature > 0 (soft only).
    mask         bool, broadcastable to [B, H, T, T], True = may attend (mask only); every query
                 must keep at least one key j <= i.
    scale        logit scale, default Dk ** -0.5.
    mode         "reference" | "fast": the same function, held equal by the tests.
    """
    B, T, H, Dk, _ = check_qkv(q, k, v)
    if T == 0:
        raise ValueError("q has no tokens (T = 0)")
    expect_same_dtype(q, k=k, v=v, gate_scores=gate_scores)
    check_mode(mode, MODES)
    if gating not in GATINGS:
        raise ValueError(f"gating must be one of {GATINGS}, got {gating!r}")
    _check_gating_arguments(gating, gate_scores, top_k, tau, mask, (B, H, T, T))
    scale = Dk ** -0.5 if scale is None else float(scale)
    causal = causal_mask(T, q.device)

    if gating == "hard":
        if mode == "reference":
            return masked_softmax_attention(q, k, v, topk_mask_by_rank(gate_scores, top_k), None, scale)
        indices, valid = topk_key_indices(gate_scores, top_k)
        return gathered_attention(q, k, v, indices, valid, scale)

    bias, allowed = None, causal
    if gating == "soft":
        bias = F.logsigmoid(gate_scores / tau)
    elif gating == "mask":
        allowed = (mask & causal).expand(B, H, T, T)  # a view: names the query in any error
        _check_every_query_keeps_a_key(allowed)
    if mode == "reference":
        return masked_softmax_attention(q, k, v, allowed, bias, scale)
    if gating == "dense":
        return sdpa_attention(q, k, v, is_causal=True, scale=scale)
    if gating == "soft":
        return sdpa_attention(q, k, v, attn_mask=bias.masked_fill(~causal, float("-inf")), scale=scale)
    return sdpa_attention(q, k, v, attn_mask=allowed, scale=scale)


def _check_gating_arguments(gating, gate_scores, top_k, tau, mask, scores_shape) -> None:
    """Each gating takes its own arguments and refuses the others': a score or mask passed to the
    wrong gating would otherwise be silently ignored."""
    wanted = {"dense": (), "soft": ("gate_scores", "tau"), "hard": ("gate_scores", "top_k"),
              "mask": ("mask",)}[gating]
    given = {"gate_scores": gate_scores is not None, "top_k": top_k is not None,
             "tau": tau != 1.0, "mask": mask is not None}
    for name, is_given in given.items():
        if is_given and name not in wanted:
            raise ValueError(f"{name} is not used with gating={gating!r} (it takes {', '.join(wanted) or 'nothing'})")
    if gating in ("soft", "hard"):
        if gate_scores is None:
            raise ValueError(f"gating={gating!r} needs gate_scores [B, H, T, T] (from gate_scores(gq, gk))")
        expect_shape("gate_scores", gate_scores, scores_shape, "[B, H, T, T]: query i, key j")
        if checking_values() and torch.isnan(gate_scores).any():
            raise ValueError("gate_scores has NaN entries")
    if gating == "hard":
        if top_k is None:
            raise ValueError("gating='hard' needs top_k (keys kept per query)")
        check_top_k(top_k)
    if gating == "soft":
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise ValueError(f"tau must be a number > 0, got {tau!r}")
    if gating == "soft" and checking_values():
        causal = causal_mask(scores_shape[-1], gate_scores.device)
        dead = (gate_scores.masked_fill(~causal, float("-inf")) == float("-inf")).all(dim=-1)
        if dead.any():
            b, h, i = (int(x) for x in dead.nonzero()[0])
            raise ValueError(f"gate_scores are -inf at every key j <= i of query {i} (batch {b}, head {h}): "
                             "soft gating would give that query no key")
    if gating == "mask":
        if mask is None:
            raise ValueError("gating='mask' needs mask, bool broadcastable to [B, H, T, T]")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a bool tensor (True = may attend), got {got}")
        try:
            broadcast = torch.broadcast_shapes(mask.shape, scores_shape)
        except RuntimeError:
            broadcast = None
        if broadcast != torch.Size(scores_shape):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, not broadcastable to {scores_shape} ([B, H, T, T])")


def _check_every_query_keeps_a_key(allowed: torch.Tensor) -> None:
    if not checking_values():
        return
    empty = ~allowed.any(dim=-1)
    if empty.any():
        b, h, i = (int(x) for x in empty.nonzero()[0])
        raise ValueError(f"mask leaves query {i} (batch {b}, head {h}) no key j <= {i}; "
                         "every query needs at least one")
