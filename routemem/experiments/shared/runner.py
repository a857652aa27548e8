"""Running a study's independent units of work where the user asked: in this process, in N worker
processes on one machine (``--jobs N``), or one shard of them for a cluster job array
(``--shard I/N``). Every finished unit goes into the study's ``RunCache`` under its key (what its
run depends on, cache.py), so the runs of several invocations (an interrupted one, the shards of a
job array, or a smaller setting of the same study) add up, and a last plain
``reproduce`` assembles the report from them.

Determinism: a unit seeds everything it draws, so where it runs does not change what it computes;
only the number of CPU threads can (float sums are split differently), which is why every run of
an execution gets the same number of threads: ``threads`` per run when given (the CLI's
``--threads``, default 1), else a fair share of this process's threads (``threads_per_job``).

Compiling (``reproduce --compile``, ``Execution.compile``): a unit whose function trains through
``compiled(model, compile)`` says so (``Unit.compiles``); under a compiling execution it is called
with ``compile=True`` and its cache key gains ``"compile": true``, so a compiled run and an eager
run never stand in for each other in the run cache. Units that do not compile (their training
loop is not ours to wrap, or they time eager code) keep their key: their runs are the same either
way. Each run's ``env`` in the cache records whether it was compiled.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import signal
import threading
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from tqdm import tqdm as std_tqdm
from tqdm.auto import tqdm

from routemem.errors import UserError
from routemem.experiments.shared.cache import RunCache
from routemem.machine import machine_header, resolve_device


@dataclass(frozen=True)
class Unit:
    """One independent piece of a study: ``fn(*args)`` returns a JSON-able record. ``fn`` is a
    module-level function, so a worker process can import it by name."""

    name: str  # the run cache's file name, unique within the study
    fn: Callable
    args: tuple
    key: dict | None = None  # what its run depends on (cache.run_key); None: the whole study setting
    compiles: bool = False  # fn takes compile=True and then trains through torch.compile (needs a key)


@dataclass(frozen=True)
class Shard:
    index: int  # 0-based, as a job array's task id usually is
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            index = count = None
        if index is None or not 0 <= index < count:
            raise UserError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4 ... 3/4), got '{text}'")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def picks(self, position: int) -> bool:
        return position % self.count == self.index


def _at_least_one(text: str | int, option: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise UserError(f"{option} must be a whole number >= 1, got '{text}'")
    return number


def parse_jobs(text: str | int) -> int:
    return _at_least_one(text, "--jobs")


def parse_threads(text: str | int) -> int:
    return _at_least_one(text, "--threads")


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run the body on ``threads`` intra-op threads (None: leave them), then restore the count."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_per_job(jobs: int, total: int | None = None) -> int:
    """A fair share of this process's CPU threads for each of ``jobs`` workers (at least one)."""
    total = torch.get_num_threads() if total is None else total
    return max(1, total // jobs)


@dataclass(frozen=True)
class Execution:
    """Where and how much of a study to run: the device, worker processes, and an optional shard."""

    device: torch.device = field(default_factory=lambda: resolve_device("auto"))
    jobs: int = 1
    shard: Shard | None = None
    threads: int | None = None  # CPU threads per run; None: a fair share of this process's
    compile: bool = False  # units that can train through torch.compile do (reproduce --compile)

    @classmethod
    def make(cls, device: str | torch.device = "auto", jobs: int | str = 1,
             shard: Shard | str | None = None, threads: int | str | None = None,
             compile: bool = False) -> Execution:
        shard = Shard.parse(shard) if isinstance(shard, str) else shard
        threads = None if threads is None else parse_threads(threads)
        return cls(resolve_device(device), parse_jobs(jobs), shard, threads, bool(compile))

    @property
    def run_threads(self) -> int:
        return self.threads or threads_per_job(self.jobs)


@dataclass
class Outcome:
    """What ``run_units`` did: the records of the units it was responsible for, by name."""

    records: dict[str, object]
    trained: int
    reused: int

    def shard_summary(self, shard: Shard, cache: RunCache) -> dict:
        """What a ``--shard`` invocation returns instead of results: no report is written."""
        return {"shard": str(shard), "trained": self.trained, "reused": self.reused,
                "runs_dir": str(cache.folder)}


def compiled(model: torch.nn.Module, compile: bool) -> torch.nn.Module:
    """What a study's training run steps through: ``torch.compile(model, fullgraph=True)`` when its
    unit was called with ``compile=True`` (the Trainer's ``compile_model``), else ``model``. Dynamo's
    cache is emptied first, so every run compiles its own model afresh: a unit that trains several
    models in turn would otherwise spend one code object's recompile budget on all of them."""
    if not compile:
        return model
    from routemem.train.trainer import compile_model

    torch._dynamo.reset()
    return compile_model(model, True)


def for_execution(unit: Unit, execution: Execution) -> Unit:
    """``unit`` as ``execution`` runs it: a unit that compiles, under a compiling execution, is
    called with ``compile=True`` and keyed with ``"compile": true``; any other unit unchanged."""
    if not (unit.compiles and execution.compile):
        return unit
    if unit.key is None:  # the whole-setting rule cannot tell a compiled run from an eager one
        raise ValueError(f"unit {unit.name} compiles, so it needs a key")
    return replace(unit, fn=functools.partial(unit.fn, compile=True), key={**unit.key, "compile": True})


def share_of(units: list[Unit], shard: Shard | None) -> list[Unit]:
    """The units one shard is responsible for: every N-th of the full ordered list, whether cached
    or not. Counting positions in the full list (not among the missing units) makes the split the
    same on every machine, whatever each one finds in the cache when it starts."""
    return units if shard is None else [u for i, u in enumerate(units) if shard.picks(i)]


def run_units(units: list[Unit], cache: RunCache, execution: Execution, label: str = "run") -> Outcome:
    """Take each unit of the execution's share from the cache, or train it (in worker processes
    when ``jobs > 1``) and store it there; an outer bar counts the share's units ("run 7/14")."""
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise ValueError("unit names must be unique")
    share = [for_execution(u, execution) for u in share_of(units, execution.shard)]
    records = {u.name: cache.get(u.name, u.key) for u in share}
    cache.warn_outdated()
    missing = [u for u in share if records[u.name] is None]
    env = {**machine_header(execution.device), "jobs": execution.jobs, "threads": execution.run_threads}
    envs = {u.name: {**env, "compile": u.compiles and execution.compile} for u in missing}  # as each was trained
    bar = tqdm(total=len(share), bar_format=label + " {n_fmt}/{total_fmt} |{bar:20}| {elapsed}<{remaining}",
               initial=len(share) - len(missing), dynamic_ncols=True)
    try:
        if execution.jobs == 1 or len(missing) <= 1:
            with torch_threads(execution.run_threads):
                for unit in missing:
                    records[unit.name] = cache.put(unit.name, unit.fn(*unit.args), envs[unit.name], unit.key)
                    bar.update()
        else:
            _in_workers(missing, cache, execution, envs, records, bar)
    finally:
        bar.close()
    return Outcome(records, trained=len(missing), reused=len(share) - len(missing))


def _in_workers(missing: list[Unit], cache: RunCache, execution: Execution, envs: dict, records: dict,
                bar) -> None:
    # spawn, not fork: a forked child inherits torch's and the kernels' thread pools (and a CUDA
    # context) in whatever state the parent's threads left them. The parent writes the cache, so
    # each file has one writer. The workers are terminated at the end: after a unit fails or
    # on Ctrl-C nothing goes on running, and the units finished so far stay cached.
    context = multiprocessing.get_context("spawn")
    workers = min(execution.jobs, len(missing))
    pool = context.Pool(workers, initializer=_start_worker, initargs=(execution.run_threads,))
    keys = {u.name: u.key for u in missing}  # the workers send back names and records
    try:
        for name, record in pool.imap_unordered(_run_unit, missing):
            records[name] = cache.put(name, record, envs[name], keys[name])
            bar.update()
        pool.close()
    finally:
        pool.terminate()  # after close(): a no-op wait; after an error or Ctrl-C: stops the workers now
        pool.join()


def _run_unit(unit: Unit) -> tuple[str, object]:
    return unit.name, unit.fn(*unit.args)


def _start_worker(threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops the workers
    torch.set_num_threads(threads)
    os.environ["ROUTEMEM_STEP_BARS"] = "0"  # the parent's outer bar only; N inner bars would interleave
    # tqdm's default lock is a multiprocessing semaphore, which a terminated worker would leak
    std_tqdm.set_lock(threading.RLock())
