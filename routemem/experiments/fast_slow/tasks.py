"""The fast-slow study's synthetic topic task (the positive control): fresh topic sequences every
step, one fixed validation set, and the task's two reference losses. The byte-level text task is
shared with absorption (experiments/shared/text_lm.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from routemem.data.topics import (
    topic_known_loss,
    topic_one_token_loss,
    topic_sequences,
    topic_subsets,
)
from routemem.experiments.shared.text_lm import PROBE_WINDOWS, Task, device_of
from routemem.train.evaluate import autocast_context

TOPICS = "topics"  # the synthetic task's name where a corpus name goes
VAL_SEED = 10**6  # the topic task's validation sequences


def topic_task(setting, seed: int) -> Task:
    """Fresh topic sequences every step (drawn from ``seed`` and the step); one fixed validation set."""
    subsets = topic_subsets(setting.topic_vocab, setting.topic_count, setting.topic_size)

    def sequences(n: int, draw_seed: int) -> torch.Tensor:
        return torch.from_numpy(topic_sequences(n, setting.seq_len + 1, subsets, draw_seed)[0])

    val = sequences(setting.val_tokens // setting.seq_len, VAL_SEED)  # the same for every run

    def batch_at(step: int):
        batch = sequences(setting.topic_batch_size, 1_000_003 * (seed + 1) + step)
        return batch[:, :-1], batch[:, 1:]

    @torch.no_grad()
    def val_loss(model, max_tokens: int, bf16: bool) -> float:
        rows = val[: max(1, max_tokens // setting.seq_len)].to(device_of(model))
        was_training = model.training
        model.eval()
        total = 0.0
        for chunk in rows.split(setting.batch_size):
            with autocast_context(device_of(model), bf16):
                logits = model(chunk[:, :-1])
            total += F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        model.train(was_training)
        return total / (len(rows) * setting.seq_len)

    return Task(batch_at, val_loss, val[:PROBE_WINDOWS, :-1])


def topic_levels(setting) -> dict:
    """The topic task's two reference losses: the best with the topic known, and the best seeing
    only the current token (what a 1-token window allows without the slow path)."""
    subsets = topic_subsets(setting.topic_vocab, setting.topic_count, setting.topic_size)
    return {"topic_known": topic_known_loss(subsets),
            "one_token": topic_one_token_loss(subsets, setting.topic_vocab)}
