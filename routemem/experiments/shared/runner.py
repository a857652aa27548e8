"""Running a study's independent units of work where the user asked: in this process, in N worker
processes on one machine (``--jobs N``), or one shard of them for a cluster job array
(``--shard I/N``). Every finished unit goes into the study's ``RunCache``, so the runs of several
invocations (an interrupted one, or the shards of a job array) add up, and a last plain
``reproduce`` assembles the report from them.

Determinism: a unit seeds everything it draws, so where it runs does not change what it computes;
only the number of CPU threads can (float sums are split differently), which is why ``--jobs N``
gives each worker the same share of threads (see ``threads_per_job``).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm as std_tqdm
from tqdm.auto import tqdm

from routemem.errors import UserError
from routemem.experiments.shared.common import RunCache
from routemem.machine import machine_header, resolve_device


@dataclass(frozen=True)
class Unit:
    """One independent piece of a study: ``fn(*args)`` returns a JSON-able record. ``fn`` is a
    module-level function, so a worker process can import it by name."""

    name: str  # the run cache's file name, unique within the study
    fn: Callable
    args: tuple


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


def parse_jobs(text: str | int) -> int:
    try:
        jobs = int(text)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise UserError(f"--jobs must be a whole number >= 1, got '{text}'")
    return jobs


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

    @classmethod
    def make(cls, device: str | torch.device = "auto", jobs: int | str = 1,
             shard: Shard | str | None = None) -> Execution:
        shard = Shard.parse(shard) if isinstance(shard, str) else shard
        return cls(resolve_device(device), parse_jobs(jobs), shard)


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
    share = share_of(units, execution.shard)
    records = {u.name: cache.get(u.name) for u in share}
    missing = [u for u in share if records[u.name] is None]
    env = {**machine_header(execution.device), "jobs": execution.jobs}
    bar = tqdm(total=len(share), bar_format=label + " {n_fmt}/{total_fmt} |{bar:20}| {elapsed}<{remaining}",
               initial=len(share) - len(missing), dynamic_ncols=True)
    try:
        if execution.jobs == 1 or len(missing) <= 1:
            for unit in missing:
                records[unit.name] = cache.put(unit.name, unit.fn(*unit.args), env)
                bar.update()
        else:
            _in_workers(missing, cache, execution, {**env, "threads": threads_per_job(execution.jobs)},
                        records, bar)
    finally:
        bar.close()
    return Outcome(records, trained=len(missing), reused=len(share) - len(missing))


def _in_workers(missing: list[Unit], cache: RunCache, execution: Execution, env: dict, records: dict,
                bar) -> None:
    # spawn, not fork: a forked child inherits torch's and the kernels' thread pools (and a CUDA
    # context) in whatever state the parent's threads left them. The parent writes the cache, so
    # each file has one writer. The workers are terminated at the end: after a unit fails or
    # on Ctrl-C nothing goes on running, and the units finished so far stay cached.
    context = multiprocessing.get_context("spawn")
    workers = min(execution.jobs, len(missing))
    pool = context.Pool(workers, initializer=_start_worker, initargs=(threads_per_job(execution.jobs),))
    try:
        for name, record in pool.imap_unordered(_run_unit, missing):
            records[name] = cache.put(name, record, env)
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
