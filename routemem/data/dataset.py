"""Token splits, their on-disk cache, and the samplers that cut them into batches.

Arrays stay numpy until the last step; torch is imported lazily (only ``torch.from_numpy``)
so that listing or encoding corpora does not pay for importing torch.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from routemem.data.corpora import Corpus
from routemem.errors import DataError
from routemem.fileio import atomic_path

SPLITS = ("train", "val", "test")
CACHE_ENV = "ROUTEMEM_CACHE"


def _to_torch(a: np.ndarray):
    import torch  # lazy: see module docstring

    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))


def split_bounds(n_tokens: int) -> dict[str, tuple[int, int]]:
    """Half-open ``[start, end)`` ranges: first 90% train, next 5% val, last 5% test.

    Splitting by position (not by shuffled windows) keeps val/test text unseen in training.
    """
    a, b = n_tokens * 90 // 100, n_tokens * 95 // 100
    return {"train": (0, a), "val": (a, b), "test": (b, n_tokens)}


def default_cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "routemem")


def cache_path(corpus: Corpus, tokenizer, cache_dir: str) -> str:
    """Cache file for this exact text and tokenizer (any change to either gives a new name)."""
    tok_json = json.dumps(tokenizer.to_dict(), sort_keys=True, ensure_ascii=True)
    tok_hash = hashlib.sha256(tok_json.encode("ascii")).hexdigest()
    return os.path.join(cache_dir, f"tokens-{corpus.sha256[:16]}-{tok_hash[:12]}.npy")


def _read_cache(path: str) -> np.ndarray | None:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None  # absent or unreadable: re-encode and overwrite
    return arr if arr.ndim == 1 and arr.size > 0 and arr.dtype == np.uint16 else None


def _write_cache(path: str, tokens: np.ndarray) -> None:
    """Write atomically (temp file + rename) so readers never see a partial file, with the mode
    any file gets (a shared cache is readable by all who share it); never raise."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.save(str) adds .npy
            np.save(f, tokens)
    except OSError:
        pass  # an unwritable cache only costs re-encoding next time; it is no reason to stop training


def load_splits(corpus: Corpus, tokenizer, cache_dir: str | None = None) -> dict[str, np.ndarray]:
    """The corpus encoded once (cached as .npy), cut into train/val/test views."""
    path = cache_path(corpus, tokenizer, cache_dir or default_cache_dir())
    tokens = _read_cache(path)
    if tokens is None:
        tokens = tokenizer.encode(corpus.text)
        _write_cache(path, tokens)
    return {split: tokens[a:b] for split, (a, b) in split_bounds(len(tokens)).items()}


class WindowSampler:
    """Random training windows of ``seq_len + 1`` tokens, drawn statelessly per step.

    Each step's windows come from ``default_rng([seed, step])``, so a run resumed at step s
    draws exactly what an uninterrupted run would, with no sampler state to checkpoint.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, name: str = "token array"):
        """``name`` labels errors, e.g. ``"corpus 'shakespeare' split 'train'"``."""
        if seq_len < 1:
            raise DataError(f"seq_len must be at least 1, got {seq_len}")
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"{name} has {len(tokens)} tokens, shorter than one window of seq_len+1 = {seq_len + 1}"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.name = name
        self.n_starts = len(tokens) - seq_len  # valid starts: 0 .. len - seq_len - 1

    def global_batch(self, step: int, batch_size: int) -> np.ndarray:
        """Start offsets of all ``batch_size`` windows of this step (same on every rank)."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, self.n_starts, size=batch_size)

    def get_batch(self, step: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                  micro: int = 0, n_micro: int = 1):
        """This rank's share ``(x, y)`` of the step's global batch, int64 ``[b, seq_len]``.

        The global batch is cut into ``world_size * n_micro`` contiguous slices; slice
        ``micro * world_size + rank`` is this call's, so all slices together are the global batch.
        """
        parts = world_size * n_micro
        if batch_size % parts:
            raise DataError(
                f"batch_size {batch_size} is not divisible by world_size*n_micro = {world_size}*{n_micro}"
            )
        if not (0 <= rank < world_size and 0 <= micro < n_micro):
            raise ValueError(f"rank {rank}/{world_size} or micro {micro}/{n_micro} out of range")
        b = batch_size // parts
        k = micro * world_size + rank
        starts = self.global_batch(step, batch_size)[k * b:(k + 1) * b]
        windows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]
        return _to_torch(windows[:, :-1]), _to_torch(windows[:, 1:])


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int | None = None,
                 name: str = "token array"):
    """Yield ``(x, y)`` over contiguous, non-overlapping windows from the start of ``tokens``.

    Every target token (up to ``max_tokens``) is predicted exactly once, so summing the loss
    over all batches and dividing by the target count gives the exact per-token loss. Full
    windows come ``batch_size`` at a time; a final shorter window comes alone as ``[1, L]``.
    """
    if len(tokens) < 2:
        raise DataError(f"{name} has {len(tokens)} tokens; evaluation needs at least 2")
    if seq_len < 1 or batch_size < 1:
        raise DataError(f"seq_len and batch_size must be at least 1, got {seq_len} and {batch_size}")
    n_targets = len(tokens) - 1
    if max_tokens is not None:
        if max_tokens < 1:
            raise DataError(f"max_tokens must be at least 1, got {max_tokens}")
        n_targets = min(n_targets, max_tokens)
    n_full = n_targets // seq_len
    offsets = np.arange(seq_len + 1)
    for first in range(0, n_full, batch_size):
        starts = np.arange(first, min(first + batch_size, n_full)) * seq_len
        windows = tokens[starts[:, None] + offsets]
        yield _to_torch(windows[:, :-1]), _to_torch(windows[:, 1:])
    rest = n_targets - n_full * seq_len
    if rest:
        window = np.asarray(tokens[n_full * seq_len:n_full * seq_len + rest + 1])[None, :]
        yield _to_torch(window[:, :-1]), _to_torch(window[:, 1:])
