"""Small C++ kernels for the CPU, compiled on first use and called through ctypes.

Some ops are bound by memory traffic when written as PyTorch ops (every intermediate is another pass
over memory); a plain loop in C++ keeps the working set in cache. This module builds such a kernel
from the ``.cpp`` file beside the op with the system compiler (``$CXX``, else ``c++``) into
``$ROUTEMEM_CACHE`` (default ~/.cache/routemem), keyed by source, flags and CPU, and loads it with
ctypes. There is no build step at install time and no torch headers (a kernel compiles in about a
second); without a compiler, ``available()`` is False and the ops' PyTorch forms remain.

Kernels take raw pointers and a range of independent rows; ``on_threads`` runs disjoint ranges on
``torch.get_num_threads()`` Python threads (ctypes releases the GIL during the call).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from routemem.fileio import atomic_path

FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC"]
SUFFIX = {torch.float32: "f32", torch.float64: "f64"}  # each kernel exports both precisions
POINTER, INT64, DOUBLE, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int


def _cpu_model() -> str:
    """-march=native code is only valid on the CPU that built it: part of the cache key."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(source: Path, compiler: str) -> Path:
    """Compile ``source`` into the cache (once per source, flags, CPU and compiler); its path."""
    key = hashlib.sha256(b"\0".join([source.read_bytes(), " ".join(FLAGS).encode(),
                                     _cpu_model().encode(), compiler.encode()])).hexdigest()[:16]
    folder = Path(os.environ.get("ROUTEMEM_CACHE", Path.home() / ".cache" / "routemem")) / "kernels"
    library = folder / f"{source.stem}-{key}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    # Built beside the target, then renamed: a concurrent or killed build never leaves half a file.
    # The library gets 0755 less the umask, as the compiler's own output would, so a shared cache
    # can load it for every user (the temp file it is built over was owner-only).
    with atomic_path(library, executable=True) as tmp:
        done = subprocess.run([compiler, *FLAGS, str(source), "-o", str(tmp)], capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {source.name}:\n{done.stderr.strip()}")
    return library


_loaded: dict[tuple, ctypes.CDLL | RuntimeError] = {}  # a failed build is remembered too


def load(source: Path, signatures: tuple[tuple[str, tuple], ...]) -> ctypes.CDLL:
    """The compiled ``source`` with ``argtypes`` set for each (function name, argtypes) pair.
    Raises RuntimeError when there is no compiler or the build fails; the outcome is kept for the
    process, so a machine without a working compiler pays for one failed attempt, not one per call."""
    key = (source, signatures)
    if key not in _loaded:
        try:
            _loaded[key] = _load(source, signatures)
        except (RuntimeError, OSError) as err:
            _loaded[key] = RuntimeError(f"cannot build {source.name}: {err}")
    if isinstance(_loaded[key], RuntimeError):
        raise _loaded[key]
    return _loaded[key]


def forget_builds() -> None:
    """Drop what ``load`` remembers (tests that change $CXX or $ROUTEMEM_CACHE use it)."""
    _loaded.clear()


def _load(source: Path, signatures) -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set $CXX)")
    library = ctypes.CDLL(str(build(source, compiler)))
    for name, argtypes in signatures:
        function = getattr(library, name)
        function.argtypes, function.restype = list(argtypes), None
    return library


def available(source: Path, signatures: tuple) -> bool:
    try:
        load(source, signatures)
        return True
    except RuntimeError:
        return False


@torch.compiler.assume_constant_result
def _available_constant(kernel: "Kernel") -> bool:
    return available(kernel.source, kernel.signatures)


class Kernel:
    """The functions ``{prefix}_{name}_{f32|f64}`` of one C++ source file, built on first use.
    ``signatures``: name -> ctypes argtypes (the same for both precisions)."""

    def __init__(self, source: Path, prefix: str, signatures: dict[str, list]):
        self.source, self.prefix = source, prefix
        self.signatures = tuple((f"{prefix}_{name}_{suffix}", tuple(argtypes))
                                for suffix in SUFFIX.values() for name, argtypes in signatures.items())

    def available(self) -> bool:
        """Whether the kernel compiled and loaded on this machine. A constant to torch.compile: it
        builds (file system calls dynamo cannot trace) once, at trace time, and never changes."""
        return _available_constant(self)

    def applies_to(self, x: torch.Tensor) -> bool:
        """Whether it can run on tensors like ``x`` (what ``mode="auto"`` asks)."""
        return x.device.type == "cpu" and x.dtype in SUFFIX and self.available()

    def function(self, name: str, dtype: torch.dtype):
        return getattr(load(self.source, self.signatures), f"{self.prefix}_{name}_{SUFFIX[dtype]}")


def pointer(x: torch.Tensor | None):
    return None if x is None else x.data_ptr()


def worker_count(rows: int) -> int:
    """Threads a kernel over ``rows`` independent rows runs on: torch's thread count, at most rows."""
    return max(1, min(torch.get_num_threads(), rows))


@functools.cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """One long-lived pool per thread count and process. Starting threads on every call cost more
    than the kernel at small sizes (they compete with torch's own threads while those spin down);
    the pid keeps a forked child (a DataLoader worker) from waiting on its parent's threads."""
    return ThreadPoolExecutor(workers, thread_name_prefix="routemem-kernel")


def on_threads(call, rows: int, workers: int) -> None:
    """Run ``call(worker, begin, end)`` for ``workers`` disjoint ranges of ``rows``, each on its
    own thread (``worker`` indexes per-thread partial sums where a kernel keeps them)."""
    bounds = [rows * w // workers for w in range(workers + 1)]
    if workers == 1:
        call(0, 0, rows)
        return
    list(_pool(workers, os.getpid()).map(call, range(workers), bounds[:-1], bounds[1:]))
