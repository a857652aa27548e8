"""The run cache: a study's finished units of work, one JSON file each, so that an interrupted study
resumes, the shards of a job array add up, and a study that grows (another seed, another learning
rate) trains only its new runs.

Each unit has a key (``run_key``): the fields of the study's setting it reads and its own place on
the study's grids (mixer, lr, seed, ...). A cached run is reused when its key is unchanged, whatever
else changed in the setting; a change to anything in its key retrains it.

A run file holds ``{"format": 2, "key", "setting", "env", "run"}``: ``setting`` is the whole study
setting of the invocation that trained it, ``env`` the machine header of where it was trained (and
``compile``: whether it trained through torch.compile). A compiled run's key has ``"compile": true``
(runner.for_execution), so it is never reused for an eager run, nor an eager run for a compiled one.
Files written before per-run keys (no ``format``: ``{"setting", "env", "run"}``) hold no key, so
they are reused only under the rule they were written with, an equal whole setting; such a file
then gets its key, and the others are retrained, with one line on stderr saying so.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path

from routemem.fileio import write_text_atomic

FORMAT = 2  # the files this module writes; files without a "format" are format 1 (no per-run key)


def json_default(value):
    """``json.dumps``' ``default``: tensor and numpy scalars as plain numbers, non-finite as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _as_json(value):
    """``value`` as a JSON round trip gives it back (tuples -> lists), so keys compare as stored."""
    return json.loads(json.dumps(value, default=json_default))


def run_key(setting, grid: tuple[str, ...] = (), **coordinates) -> dict:
    """What one run depends on: every field of ``setting`` (a dataclass or a dict: the study's
    setting, plus its data's names and sha256) except the ``grid`` fields, and the run's own
    ``coordinates`` on those grids (``mixer=..., lr=..., seed=...``).

    A grid field lists values the study runs one unit per value of (``seeds``, ``lrs``, ...): a run
    reads only its own value, so adding a value leaves the other runs' keys as they were. A field
    one unit reads whole (APN's ``arms`` and ``adapt_lrs``: a unit runs all of them) is not a grid
    field. Everything else stays in the key, read by the run or not: a spare field retrains too
    much, a missing one would reuse a run it should not."""
    fields = asdict(setting) if is_dataclass(setting) else dict(setting)
    unknown = sorted(set(grid) - set(fields))
    if unknown:  # a misspelt grid field would silently stay in every key
        raise ValueError(f"grid fields not in the setting: {', '.join(unknown)}")
    return _as_json({"setting": {k: v for k, v in fields.items() if k not in grid}, "unit": coordinates})


class RunCache:
    """Finished runs of a study, one JSON file per run under ``folder`` (named after the unit).

    ``setting`` is the whole study setting (any JSON-able description of everything that sizes the
    study): stored in each file as provenance, and the rule for a file or unit without a key. Each
    file also keeps the machine header of where its run was trained (``env``): the device is not
    part of a key, so one study may gather runs from several machines."""

    def __init__(self, folder: Path, setting: dict):
        self.folder = Path(folder)
        self.setting = _as_json(setting)
        self.reused = 0
        self.envs: dict[str, dict] = {}  # name -> machine header of the run's trainer
        self.outdated: list[str] = []  # format-1 files set aside since the last warn_outdated()

    def get(self, name: str, key: dict | None = None):
        """The cached run called ``name`` if its key is ``key``, else None. Without a key on either
        side (a unit without one, a format-1 file) the whole settings must be equal."""
        path = self.folder / f"{name}.json"
        try:
            cached = json.loads(path.read_text())
            fmt, run = cached.get("format", 1), cached["run"]
        except (OSError, ValueError, AttributeError, KeyError):
            return None  # missing or unreadable: train it
        if fmt not in (1, FORMAT):
            return None  # written by a newer routemem: its key may mean something else
        key = None if key is None else _as_json(key)
        stored = cached.get("key") if fmt == FORMAT else None
        if key is not None and stored is not None:
            if stored != key:
                return None
        elif cached.get("setting") != self.setting:
            if fmt == 1:
                self.outdated.append(name)
            return None
        elif key is not None:  # reused under the whole-setting rule: record its key for next time
            self._write(name, run, cached.get("env") or {}, key, cached.get("setting"))
        self.reused += 1
        self.envs[name] = cached.get("env") or {}
        return run

    def put(self, name: str, run, env: dict | None = None, key: dict | None = None):
        """Store ``run`` under ``key`` (None: reused only under an equal whole setting); returns it as
        a later ``get`` will (JSON types: lists, not tuples)."""
        stored = self._write(name, run, env or {}, None if key is None else _as_json(key), self.setting)
        self.envs[name] = env or {}
        return stored

    def _write(self, name: str, run, env: dict, key, setting):
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": FORMAT, "key": key, "setting": setting, "env": env, "run": run},
                          default=json_default)
        write_text_atomic(self.folder / f"{name}.json", text)
        return json.loads(text)["run"]

    def warn_outdated(self) -> None:
        """One stderr line for the format-1 files ``get`` set aside (another whole setting)."""
        if self.outdated:
            print(f"routemem: note: {len(self.outdated)} run(s) in {self.folder} were cached by an older "
                  f"routemem for another setting and have no per-run key; they will be retrained",
                  file=sys.stderr)
            self.outdated = []

    def trained_on(self) -> list[dict]:
        """The distinct machines (device, CPU, GPU, commit, threads, jobs) that trained the runs
        seen, and whether they compiled them (runs cached before ``--compile`` existed were not),
        with counts."""
        keys = ("device", "cpu", "gpu", "git_commit", "threads", "jobs")
        machines: dict[tuple, dict] = {}
        for env in self.envs.values():
            row = {**{k: env.get(k) for k in keys}, "compile": bool(env.get("compile", False))}
            machines.setdefault(tuple(row.values()), {**row, "runs": 0})["runs"] += 1
        return list(machines.values())
