"""RoutememCache: TransformerLM's step() state, carried by transformers' generate() as its cache.

transformers 5 hands whatever the model returns as ``outputs.cache`` back to the next forward (and
only asks a cache it did not make for ``get_seq_length()``), so this is a plain object, not a
``transformers.Cache`` subclass: a KV cache's layer API (update, crop, reorder) has no meaning for
a recurrent state.
"""

from __future__ import annotations

import torch

from routemem.models.transformer import TransformerLM


class RoutememCache:
    """The per-layer mixer states of ``TransformerLM.step`` and the tokens they have read.

    The tokens (at most ``max_seq_len`` of them) are kept for the one moment the state has to be
    rebuilt: when the position reaches ``max_seq_len``, the state restarts from the last half
    window of tokens, as ``TransformerLM.generate`` does, so decoding runs past the window and both
    generate the same tokens."""

    is_compileable = False  # read by generate() to decide on torch.compile and deferred stops
    is_croppable = False

    def __init__(self):
        self.state: dict | None = None  # TransformerLM.init_cache() once the first token is read
        self.tokens: torch.Tensor | None = None  # [B, <= max_seq_len]
        self.seen = 0  # tokens read since the start, whatever the rebuilds

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    @torch.no_grad()
    def read(self, lm: TransformerLM, input_ids: torch.Tensor) -> torch.Tensor:
        """Advance the state over ``input_ids`` [B, T]; returns the logits after each token [B, T, V]."""
        window = lm.config.max_seq_len
        if self.state is None and input_ids.shape[1] > window:
            raise ValueError(f"prompt of {input_ids.shape[1]} tokens exceeds max_seq_len={window}")
        logits = []
        for token in input_ids.unbind(dim=1):
            history = token[:, None] if self.tokens is None else torch.cat([self.tokens, token[:, None]], dim=1)
            if self.state is not None and self.state["pos"] >= window:
                self.state = None  # the window is full: restart from its last half, this token included
                for past in history[:, -max(1, window // 2):].unbind(dim=1):
                    step_logits, self.state = lm.step(past, self.state)
            else:
                step_logits, self.state = lm.step(token, self.state)
            self.tokens = history[:, -window:]
            self.seen += 1
            logits.append(step_logits)
        return torch.stack(logits, dim=1)
