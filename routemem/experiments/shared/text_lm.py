"""The byte-level language-modelling task shared by the fast-slow and absorption studies.

A ``Task`` hands a run its batches, its validation loss and a fixed validation batch (``probe``,
on which fast-slow measures the slow path's share of each mixer's output). ``cached_splits`` loads
a corpus's byte-level splits once per process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from routemem.data import ByteTokenizer, WindowSampler, load_corpus, load_splits
from routemem.errors import DataError
from routemem.train.evaluate import evaluate

PROBE_WINDOWS = 16  # validation windows the slow share is measured on (4 gave visibly noisy curves)


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
