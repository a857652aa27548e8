"""Scoring a model on a token split: loss in nats/token, perplexity, bits per token and per byte."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from routemem.data import eval_batches


def autocast_context(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, *, seq_len: int, batch_size: int, tokenizer=None,
             max_tokens: int | None = None, device: torch.device = torch.device("cpu"),
             bf16: bool = False, name: str = "split") -> dict[str, float]:
    """Mean cross-entropy over every target in contiguous windows of ``tokens`` (up to
    ``max_tokens`` targets). ``bits_per_byte`` uses the UTF-8 size of the scored text, so byte- and
    char-level models are comparable."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x, y in eval_batches(tokens, seq_len, batch_size, max_tokens=max_tokens, name=name):
            x, y = x.to(device), y.to(device)
            with autocast_context(device, bf16):
                logits = model(x)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    finally:
        model.train(was_training)
    loss = total / count
    metrics = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bits_per_token": loss / math.log(2),
               "tokens": count}
    if tokenizer is not None:
        n_bytes = len(tokenizer.decode(np.asarray(tokens[1 : count + 1])).encode("utf-8"))
        metrics["bits_per_byte"] = total / math.log(2) / max(1, n_bytes)
    return metrics
