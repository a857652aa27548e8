"""``routemem reproduce all``: every study, one after another, into one output folder, then one
report of every claim (``REPORT.md``, ``report.html``).

Each study is called exactly as ``routemem reproduce <study>`` calls it. The manifest
``OUT/suite.json`` (rewritten atomically after each study) records per study its status
(complete | failed | missing), mode, a fingerprint of its setting, the equivalent single command,
wall time, timestamps, the error of a failure, and where its results.json is. A later ``all`` with
the same mode reuses a study that is complete with the same setting fingerprint, data folder and
``--compile`` and whose results.json is still there; the others run again (each study's own run
cache still reuses its
finished runs). ``force=True`` runs every study again from scratch: it deletes ``OUT/<study>/runs/``
(the study's run cache, with the ocl-baselines backbone) before the study runs, so nothing is reused.

A study that raises is recorded as failed and the next one runs; Ctrl-C stops the suite, and the
manifest keeps the studies finished before it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shlex
import shutil
import time
import traceback
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from routemem import experiments
from routemem.data.corpora import DATA_ENV
from routemem.errors import UserError
from routemem.fileio import write_text_atomic

# the order they run in: rwf after ocl-baselines, whose backbone it borrows from OUT/ocl-baselines
EXPECTED = ("apn", "palimpsa", "fast-slow", "absorption", "ocl-baselines", "rwf")
MANIFEST = "suite.json"
COMPLETE, FAILED, MISSING = "complete", "failed", "missing"
TRACEBACK_LINES = 12  # the end of a failure's traceback kept in the manifest and the report


def suite_order() -> list[str]:
    """EXPECTED, then any study routemem has that the list does not name yet (``all`` means all)."""
    return list(EXPECTED) + [name for name in experiments.STUDIES if name not in EXPECTED]


def setting_fingerprint(name: str, quick: bool) -> str | None:
    """A short hash of the study's QUICK or FULL ``Setting`` (its module's dataclass), or None when
    the module has none: then a finished study cannot be shown to match and is run again."""
    try:
        module = importlib.import_module(f"routemem.experiments.{name.replace('-', '_')}")
    except ImportError:
        return None
    setting = getattr(module, "QUICK" if quick else "FULL", None)
    if not is_dataclass(setting) or isinstance(setting, type):
        return None
    text = json.dumps(asdict(setting), sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def study_command(name: str, out: Path, quick: bool, data_dir: str | None, device: str, jobs: int,
                  threads: int | None = None, compile: bool = False) -> str:
    """The single ``routemem reproduce`` command that does what ``all`` does for this study."""
    argv = ["routemem", "reproduce", name] + (["--quick"] if quick else []) + ["--out", str(out)]
    argv += (["--data-dir", data_dir] if data_dir else []) + ["--device", str(device), "--jobs", str(jobs)]
    argv += ["--threads", str(threads)] if threads is not None else []
    argv += ["--compile"] if compile else []
    return shlex.join(argv)


def suite_command(out: Path, quick: bool, data_dir: str | None, device: str, jobs: int, force: bool,
                  threads: int | None = None, compile: bool = False) -> str:
    command = study_command("all", out, quick, data_dir, device, jobs, threads, compile)
    return command + (" --force" if force else "")


def data_folder(data_dir: str | None) -> str | None:
    """The corpora folder a study will read (--data-dir, else $ROUTEMEM_DATA): the studies choose
    their corpora by what it holds, so a study run on another folder is not reused."""
    folder = data_dir or os.environ.get(DATA_ENV)
    return os.path.abspath(os.path.expanduser(folder)) if folder else None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_manifest(out: Path) -> dict:
    """The manifest of an earlier ``all`` in ``out``, or an empty one. A file there that is not one
    is a user error (before anything runs): it is not ours to overwrite."""
    path = out / MANIFEST
    if not path.exists():
        return {"studies": {}}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a routemem suite manifest ({err}); remove it or choose another --out")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("studies"), dict):
        raise UserError(f"{path} is not a routemem suite manifest (no 'studies' mapping); remove it or choose "
                        "another --out")
    return manifest


def write_manifest(out: Path, manifest: dict) -> None:
    manifest["updated"] = now()
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2))


def reusable(entry: dict | None, mode: str, fingerprint: str | None, data: str | None, out: Path,
             compile: bool = False) -> bool:
    """A finished study of an earlier ``all`` stands for this one: same mode, setting, data folder and
    compile (an entry written before --compile existed was not compiled), its results.json there."""
    return (entry is not None and entry.get("status") == COMPLETE and entry.get("mode") == mode
            and fingerprint is not None and entry.get("fingerprint") == fingerprint and entry.get("data_dir") == data
            and bool(entry.get("compile", False)) == bool(compile) and (out / entry.get("results", "")).is_file())


def error_record(err: BaseException) -> dict:
    lines = "".join(traceback.format_exception(type(err), err, err.__traceback__)).rstrip().splitlines()
    return {"type": type(err).__name__, "message": str(err), "traceback": lines[-TRACEBACK_LINES:]}


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the studies' results")


def run_study(name: str, out: Path, quick: bool, data_dir: str | None, device: str, jobs: int,
              force: bool, threads: int | None = None, compile: bool = False) -> dict:
    """Run one study as ``routemem reproduce <name>`` would; its manifest entry, complete or failed."""
    if force:
        shutil.rmtree(out / name / "runs", ignore_errors=True)  # the study's run cache: retrain every run
    entry = {"mode": "quick" if quick else "full", "fingerprint": setting_fingerprint(name, quick),
             "data_dir": data_folder(data_dir), "compile": bool(compile),
             "command": study_command(name, out, quick, data_dir, device, jobs, threads, compile),
             "results": f"{name}/results.json", "started": now()}
    clock = time.perf_counter()
    try:
        experiments.STUDIES[name](out=out, quick=quick, data_dir=data_dir, device=device, jobs=jobs, shard=None,
                                  threads=threads, **({"compile": True} if compile else {}))
        entry["status"] = COMPLETE
    except Exception as err:  # noqa: BLE001  a failed study must not cost the others; Ctrl-C still stops the suite
        entry.update(status=FAILED, error=error_record(err))
    entry.update(seconds=time.perf_counter() - clock, finished=now())
    return entry


def run_suite(out: str | Path, quick: bool = False, data_dir: str | None = None, device: str = "auto",
              jobs: int = 1, force: bool = False, threads: int | None = None, compile: bool = False) -> dict:
    """Run (or reuse) every study into ``out`` and return the manifest (also in ``out/suite.json``).
    The reports are written by ``suite_report`` / ``suite_html`` from that manifest."""
    from routemem.experiments.shared.runner import parse_jobs, parse_threads
    from routemem.machine import resolve_device

    out, jobs = Path(out), parse_jobs(jobs)
    threads = None if threads is None else parse_threads(threads)
    resolve_device(device)  # a bad or absent device is a one-line error before anything runs
    check_out(out)
    manifest = read_manifest(out)
    out.mkdir(parents=True, exist_ok=True)
    mode = "quick" if quick else "full"
    order = suite_order()
    present = [name for name in order if name in experiments.STUDIES]
    manifest.update(order=order, mode=mode,
                    command=suite_command(out, quick, data_dir, device, jobs, force, threads, compile))
    invocation = {"started": now(), "ran": [], "reused": []}
    manifest["invocation"] = invocation
    clock = time.perf_counter()
    bar = tqdm(total=len(present), desc="suite", unit="study", dynamic_ncols=True)
    try:
        for name in order:
            if name not in experiments.STUDIES:
                manifest["studies"][name] = {"status": MISSING, "mode": mode}
                continue
            previous = manifest["studies"].get(name)
            bar.set_postfix_str(name)
            if not force and reusable(previous, mode, setting_fingerprint(name, quick), data_folder(data_dir), out,
                                      compile):
                invocation["reused"].append(name)
                tqdm.write(f"suite: {name}: complete in an earlier run with the same setting, reused")
            else:
                entry = run_study(name, out, quick, data_dir, device, jobs, force, threads, compile)
                manifest["studies"][name] = entry
                invocation["ran"].append(name)
                state = entry["status"] + (f": {entry['error']['type']}: {entry['error']['message']}"
                                           if entry["status"] == FAILED else "")
                tqdm.write(f"suite: {name}: {state} ({entry['seconds']:.0f} s)")
            write_manifest(out, manifest)
            bar.update()
    finally:
        bar.close()
    invocation.update(finished=now(), seconds=time.perf_counter() - clock)
    write_manifest(out, manifest)
    return manifest


def failed(manifest: dict) -> list[str]:
    """The studies of this suite that failed (a study no longer in the suite does not count)."""
    studies = manifest["studies"]
    return [name for name in manifest.get("order", studies) if studies.get(name, {}).get("status") == FAILED]
