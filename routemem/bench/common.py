"""Shared benchmark plumbing: the machine header (routemem.machine), a median timer, atomic JSON output."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from routemem.fileio import write_text_atomic
from routemem.machine import machine_header  # noqa: F401  (re-exported: every suite's header)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
    """Median wall time of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "runs_s": times}


def saved_bytes(forward: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of distinct storages autograd keeps for backward while ``forward()`` runs (what
    peak training memory grows with), the storages of ``exclude`` (inputs, parameters) left out."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values())


def write_json(path: str | Path, obj: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, indent=2))
