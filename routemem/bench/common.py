"""Shared benchmark plumbing: device-aware timing and memory, the row and target records every suite
reports (the shape is documented in docs/benchmarks.md), and atomic JSON output."""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from routemem.fileio import write_text_atomic

FWD, FWD_BWD = "fwd", "fwd+bwd"  # a row's "direction"
SAVED_FOR_BACKWARD = "saved_for_backward"  # memory_measure on a CPU (what peak training memory grows with)
CUDA_PEAK = "cuda_peak_allocated"  # memory_measure on a GPU: torch.cuda.max_memory_allocated, reset per call
CPU_ONLY_FUSED = "the fused C++ kernel runs on the CPU only"


def sync(device: torch.device | str = "cpu") -> None:
    """Wait for queued GPU work on ``device`` (a no-op on a CPU, where work is already done)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Wall time of one call of ``fn()``, the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1,
                   device: torch.device | str = "cpu") -> dict:
    """Median wall time of ``fn()`` on ``device`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = [seconds(fn, device) for _ in range(repeats)]
    return {"median_s": statistics.median(times), "runs_s": times}


RECOMPILE_LIMIT = 64  # graphs per code object under --compile (dynamo's default is 8)


def compile_budget(enabled: bool):
    """The context a suite runs in under ``--compile``: a suite's forms are often closures of one
    function, which dynamo counts as one code object, so their graphs (one per form and direction)
    would pass its default recompile limit of 8, and the rest would fail to compile."""
    return torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT) if enabled else contextlib.nullcontext()


def maybe_compile(fn, enabled: bool):
    """``torch.compile(fn, fullgraph=True)`` when ``enabled`` (``routemem bench --compile``), else
    ``fn``. A graph break is an error, not a silent fallback to eager, so a compiled row times
    what it says. Compile once, outside the timed calls (the warm-up call pays the compile)."""
    return torch.compile(fn, fullgraph=True) if enabled else fn


def first_call(call, device) -> tuple[float, str | None]:
    """Seconds of the first call of ``call()`` (a ``--compile`` row's compile, paid outside the timed
    calls), and None, or the one-line reason it failed: a form that does not compile (a graph break
    under fullgraph=True, an op dynamo cannot trace) becomes a skipped row, not the end of the suite."""
    try:
        return seconds(call, device), None
    except Exception as err:  # noqa: BLE001  torch.compile raises many kinds; the row says which
        return 0.0, compile_failure(err)


def compile_failure(err: BaseException) -> str:
    """``err`` as a skipped row's reason: one line, its type and the first line of its message."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    text = f"torch.compile(fullgraph=True) failed: {type(err).__name__}: {first}".rstrip(": ")
    return text if len(text) <= 240 else text[:237] + "..."


def timed_call(forward: Callable[[], object], backward: bool, clear: Iterable[torch.Tensor],
               backprop: Callable[[object], object] = torch.Tensor.backward) -> Callable[[], None]:
    """The call a row times: ``forward()`` under no_grad (fwd), or ``forward()`` then
    ``backprop(its output)`` and the grads of ``clear`` (leaves, parameters) reset to None (fwd+bwd)."""
    clear = list(clear)

    def call() -> None:
        if not backward:
            with torch.no_grad():
                forward()
            return
        backprop(forward())
        for t in clear:
            t.grad = None  # as zero_grad(set_to_none=True) between training steps

    return call


def interleaved_runs(timers: dict, rounds: int, warmup: int = 1,
                     device: torch.device | str = "cpu") -> dict[object, list[float]]:
    """``timers``: key -> (fn, repeats). Time every fn in turn, ``rounds`` times over, so drift in
    the machine's load hits all of them alike; key -> the seconds of every timed call."""
    runs: dict[object, list[float]] = {key: [] for key in timers}
    for _ in range(rounds):
        for key, (fn, repeats) in timers.items():
            runs[key] += median_seconds(fn, repeats=repeats, warmup=warmup, device=device)["runs_s"]
    return runs


def backward_memory(call: Callable[[], object], forward: Callable[[], object], exclude: Iterable[torch.Tensor],
                    backward: bool, device: torch.device | str) -> int | None:
    """A row's memory: on a GPU the peak while ``call()`` (one timed call) runs; on a CPU the bytes
    autograd keeps for backward while ``forward()`` runs (``saved_bytes``), or None for a forward
    under no_grad, which keeps nothing."""
    if torch.device(device).type == "cuda":
        return cuda_peak_bytes(call, device)
    if not backward:
        return None
    return saved_bytes(forward, exclude)


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """Peak bytes allocated on the GPU while ``fn()`` runs (the counter reset just before)."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device)


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


def memory_measure(device: torch.device) -> str:
    return CUDA_PEAK if device.type == "cuda" else SAVED_FOR_BACKWARD


def row(names: dict, direction: str, runs_s: list[float] | None = None, memory_bytes: int | None = None,
        memory: str | None = None, skipped: str | None = None) -> dict:
    """One measurement: what was measured (``names``: op, mode, shape fields), its direction, the
    median and every timed run, and the memory measured beside it. A ``skipped`` row has no numbers."""
    record = {**names, "direction": direction,
              "median_s": statistics.median(runs_s) if runs_s and not skipped else None,
              "runs_s": list(runs_s or []) if not skipped else [],
              "memory_bytes": None if skipped else memory_bytes,
              "memory_measure": None if skipped or memory_bytes is None else memory}
    if skipped:
        record["skipped"] = skipped
    return record


def find_row(rows: list[dict], **match) -> dict | None:
    """The first row whose fields equal ``match`` (a target's numerator or denominator)."""
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def target(rows: list[dict], name: str, what: str, numerator: dict, denominator: dict,
           threshold: float, comparison: str) -> dict:
    """A target on ``ratio = numerator row's median_s / denominator row's median_s``. When either row
    is missing or skipped on this machine, ``ratio`` and ``met`` are None and ``skipped`` says why."""
    assert comparison in ("<=", ">=")
    record = {"name": name, "what": what, "numerator": numerator, "denominator": denominator,
              "ratio": None, "threshold": threshold, "comparison": comparison, "met": None}
    num, den = find_row(rows, **numerator), find_row(rows, **denominator)
    missing = [(part, r) for part, r in (("numerator", num), ("denominator", den))
               if r is None or r.get("skipped")]
    if missing:
        part, r = missing[0]
        record["skipped"] = f"{part} not measured: " + (r["skipped"] if r is not None else "no such row")
        return record
    ratio = num["median_s"] / den["median_s"]
    record["ratio"] = ratio
    record["met"] = ratio <= threshold if comparison == "<=" else ratio >= threshold
    return record


def all_met(targets: list[dict]) -> bool | None:
    """Every target measured here is met; a skipped target (met None) does not count either way.
    None when no target could be measured at all."""
    judged = [t["met"] for t in targets if t["met"] is not None]
    return all(judged) if judged else None


def write_json(path: str | Path, obj: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, indent=2))
