"""What the fast-slow study's runs train on: byte-level text, or synthetic topic sequences.

A ``Task`` hands a run its batches, its validation loss and a fixed validation batch on which the
slow path's share of each mixer's output is measured.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from routemem.data import ByteTokenizer, WindowSampler, load_corpus, load_splits
from routemem.data.topics import (
    topic_known_loss,
    topic_one_token_loss,
    topic_sequences,
    topic_subsets,
)
from routemem.errors import DataError
from routemem.train.evaluate import autocast_context, evaluate

TOPICS = "topics"  # the synthetic task's name where a corpus name goes
PROBE_WINDOWS = 16  # validation windows the slow share is measured on (4 gave visibly noisy curves)
VAL_SEED = 10**6  # the topic task's validation sequences


@dataclass
class Task:
    """``batch_at(step)`` -> (inputs, targets) on the CPU; ``val_loss(model, max_tokens, bf16)``;
    ``probe``: validation inputs [PROBE_WINDOWS, seq_len] for the slow share."""

    batch_at: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    val_loss: Callable[[torch.nn.Module, int, bool], float]
    probe: torch.Tensor


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def default_corpus(data_dir: str | None) -> str:
    """The paper's corpus when the data folder has it, else the built-in one (runs anywhere)."""
    try:
        load_corpus("shakespeare", data_dir)
    except DataError:
        return "pydocs"
    return "shakespeare"


@functools.lru_cache(maxsize=2)
def cached_splits(corpus: str, data_dir: str | None) -> dict:
    """Byte-level train/val/test splits, once per process (a worker runs several units)."""
    loaded = load_corpus(corpus, data_dir)
    return {"splits": load_splits(loaded, ByteTokenizer()), "sha256": loaded.sha256}


def text_task(setting, corpus: str, data_dir: str | None, seed: int) -> Task:
    """Random windows of ``corpus``'s train split (the sampler's order fixed by ``seed``)."""
    data = cached_splits(corpus, data_dir)["splits"]
    sampler = WindowSampler(data["train"], setting.seq_len, seed=seed, name="train")

    def val_loss(model, max_tokens: int, bf16: bool) -> float:
        return evaluate(model, data["val"], seq_len=setting.seq_len, batch_size=setting.batch_size,
                        max_tokens=max_tokens, device=device_of(model), bf16=bf16)["loss"]

    probe = torch.as_tensor(np.asarray(data["val"][: setting.seq_len * PROBE_WINDOWS], dtype=np.int64))
    return Task(lambda step: sampler.get_batch(step, setting.batch_size), val_loss, probe.view(PROBE_WINDOWS, -1))


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
