"""The attention_mask rule for routemem's mixers: padding only at the end of a sequence.

Our mixers read every earlier token (a recurrent state absorbs it; no mask is applied), so a pad
before a real token would change that token's output. Pads after the last real token change
nothing before them: a right-padded batch is exact where the mask is 1 (its labels at pads are
the caller's to set to -100, as transformers' collators do).
"""

from __future__ import annotations

import torch


def check_right_padded(attention_mask: torch.Tensor | None) -> None:
    """Refuse a 2D mask with a 0 before a 1 in some row (left padding, or generate() continuing a
    right-padded prompt) with a one-line ValueError."""
    if attention_mask is None:
        return
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, seq_len] of 0/1, got shape {tuple(attention_mask.shape)}")
    real = attention_mask.bool()
    bad_rows = (~real[:, :-1] & real[:, 1:]).any(dim=1).nonzero().flatten().tolist()
    if bad_rows:
        raise ValueError(
            f"attention_mask has a 0 before a 1 in row {bad_rows[0]} (left padding, or generate() on a "
            "right-padded batch): routemem's mixers read every earlier token, so padding is supported "
            "only after a sequence's last real token; pad on the right, and generate from unpadded prompts")
