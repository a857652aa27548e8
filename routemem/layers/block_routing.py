"""The block granularity of the gated_sparse mixer: query block i reads its own block and the key
blocks its gate chooses (ops/gated_sparse/block.py). ``BlockRouting`` holds the options and does the
attention of each path, the token-by-token decoding that equals it, and the statistics; the mixer
(gated_sparse.py) owns the parameters and picks the path.

Gate features per token: ``moba`` uses the attention's own q and k (scale Dk ** -0.5, no
parameters); ``learned`` and ``random`` their projections gq = A x, gk = B x (scale 1 / sqrt(r)).
A query block is represented by the mean feature of the block before it and a key block by its own
mean (block_select.py says why), so decoding can choose block i's keys at its first token.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from routemem.ops.gated_sparse import gated_attention
from routemem.ops.gated_sparse.block import block_routed_attention
from routemem.ops.gated_sparse.block_select import (
    block_attention_mass, block_concentration, block_scores, n_blocks, past_block_mask, select_past_blocks,
    selected_block_mask,
)

ORACLE_STEP = ("deploy 'oracle' at granularity 'block' chooses by the attention mass of the whole query block, "
               "which token-by-token decoding cannot know yet; decode with deploy 'gate' or 'dense'")


class BlockRouting:
    def __init__(self, block_size: int, top_k_blocks: int, form: str, tau: float):
        self.block_size, self.top_k_blocks, self.form, self.tau = block_size, top_k_blocks, form, tau

    # -- the parallel form -------------------------------------------------------------------------
    def scores(self, q_feat: torch.Tensor, k_feat: torch.Tensor) -> torch.Tensor:
        """Per-token gate features [B, T, H, r] -> block scores [B, H, n, n]."""
        return block_scores(q_feat, k_feat, self.block_size, q_feat.shape[-1] ** -0.5)

    def attend(self, path: str, q, k, v, scores: torch.Tensor | None) -> torch.Tensor:
        """q, k, v [B, T, H, Dh] -> [B, T, H, Dh] for ``path`` "dense" | "soft" | "hard" | "oracle"."""
        if path == "dense":
            return gated_attention(q, k, v)
        if path == "oracle":
            with torch.no_grad():  # a choice: integers only, nothing to differentiate
                scores = block_attention_mass(q, k, self.block_size).to(q.dtype)
            path = "hard"
        options = {"top_k_blocks": self.top_k_blocks} if path == "hard" else {"tau": self.tau}
        return block_routed_attention(q, k, v, scores, block_size=self.block_size, gating=path, mode=self.form,
                                      **options)

    # -- decoding --------------------------------------------------------------------------------
    def decode_logits(self, path: str, logits: torch.Tensor, q_feats: torch.Tensor | None,
                      k_feats: torch.Tensor | None) -> torch.Tensor:
        """One query's logits [B, H, 1, t + 1] over keys 0..t, masked (hard) or biased (soft) by its
        block's choice, which reads only features of complete earlier blocks: q_feats, k_feats
        [B, H, t + 1, r] (this token's last). Equal to the parallel form's row t."""
        if path == "oracle":
            raise ValueError(ORACLE_STEP)
        if path == "dense":
            return logits
        t, bs = logits.shape[-1] - 1, self.block_size
        i = t // bs  # this token's block; blocks 0 .. i - 1 are past and complete
        if i == 0:
            return logits
        B, H, _, r = k_feats.shape
        q_summary = q_feats[:, :, (i - 1) * bs:i * bs].mean(2)  # [B, H, r]
        k_means = k_feats[:, :, :i * bs].reshape(B, H, i, bs, r).mean(3)  # [B, H, i, r]
        s = torch.einsum("bhr,bhjr->bhj", q_summary, k_means) * r ** -0.5
        past = logits[..., :i * bs]
        if path == "soft":
            past = past + F.logsigmoid(s / self.tau).repeat_interleave(bs, -1)[:, :, None]
        else:
            order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :self.top_k_blocks]
            keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, order, True)
            past = past.masked_fill(~keep.repeat_interleave(bs, -1)[:, :, None], float("-inf"))
        return torch.cat([past, logits[..., i * bs:]], dim=-1)

    # -- statistics and accounting ----------------------------------------------------------------
    @torch.no_grad()
    def measure(self, q, k, scores: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Block concentration of the dense attention (the share of each query block's mass in its top
        1/8 of causal key blocks); with a gate, its top_k_blocks choice's overlap with the oracle's
        (F1 = share of the oracle's past blocks also chosen, over query blocks with more past blocks
        than top_k_blocks) and the rms of its past-block scores. 0-dim tensors: no device sync."""
        mass = block_attention_mass(q.detach(), k.detach(), self.block_size).float()
        stats = {"block_concentration": block_concentration(mass)}
        if scores is not None:
            n = mass.shape[-1]
            past = past_block_mask(n, mass.device)
            own = torch.eye(n, dtype=torch.bool, device=mass.device)
            picked = selected_block_mask(*select_past_blocks(scores.detach().float(), self.top_k_blocks), n) & ~own
            oracle = selected_block_mask(*select_past_blocks(mass, self.top_k_blocks), n) & ~own
            rows = slice(self.top_k_blocks + 1, None) if n > self.top_k_blocks + 1 else slice(0, n)
            overlap = (picked & oracle).sum(-1) / oracle.sum(-1).clamp_min(1)
            s = scores.detach().float()
            stats.update(gate_oracle_f1=overlap[..., rows].mean(),
                         gate_score_rms=(torch.where(past, s, 0).pow(2).sum() / (past.sum() * s[..., 0, 0].numel())
                                         .clamp_min(1)).sqrt())
        return stats

    def attended_keys(self, seq_len: int, path: str) -> float:
        """Mean keys a query reads: its block's keys up to itself, plus top_k_blocks whole past blocks
        (hard), or every causal key (soft, dense)."""
        if path != "hard":
            return (seq_len + 1) / 2
        bs = self.block_size
        return sum(t % bs + 1 + min(self.top_k_blocks, t // bs) * bs for t in range(seq_len)) / seq_len

    def gate_flops_per_token(self, seq_len: int, n_head: int, width: int) -> float:
        """Scoring every past block of every query block: 2 H r n (n - 1) / 2 per sequence."""
        n = n_blocks(seq_len, self.block_size)
        return 2.0 * n_head * width * n * (n - 1) / 2 / seq_len


def gate_feature_width(gate: str, head_dim: int, rank: int) -> int:
    return head_dim if gate == "moba" else rank


def uses_scores(gate: str, path: str) -> bool:
    return gate != "none" and path in ("soft", "hard")



