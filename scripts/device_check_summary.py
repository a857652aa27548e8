"""Assemble the one JSON summary of ``scripts/device-check.sh`` from what its steps left in a folder.

The shell script runs each step under ``timeout`` and appends one line per step to ``steps.tsv``
(name, exit status, seconds, time limit); the pytest step writes ``pytest-cuda.xml`` (JUnit), each
bench ``bench-<suite>.json`` (and its output in ``bench-<suite>.log``), the environment step
``nvidia-smi.txt``. This reads them all and writes ``device-check.json``:

    gpu, nvidia_smi, torch, cuda, git_commit       where it ran
    pytest: passed/failed/errors/skipped, failed_ids, and the step's rc/seconds/timed_out
    benches: {suite: targets, all_targets_met, error (the log's last line when it failed), ...}
    steps: wall time and exit status of every step;  ok: no test failed and every step exited 0

Exit status: 0 when ok, 1 otherwise (a failed or errored test, no test report, or a failed step).

    python3 scripts/device_check_summary.py DIR [--suites train palimpsa apn fast-slow sparse vit kernels]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TIMEOUT_STATUSES = (124, 137)  # timeout(1): the limit passed (137: killed after the grace period)
SUITES = ("train", "palimpsa", "apn", "fast-slow", "sparse", "vit", "kernels")  # routemem.bench.SUITES (a test keeps them equal)


def read_steps(path: Path) -> list[dict]:
    """steps.tsv -> [{name, rc, seconds, timeout_s, timed_out}], in the order the steps ran."""
    steps = []
    if not path.exists():
        return steps
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        name, rc, seconds, limit = (line.split("\t") + ["", "", ""])[:4]
        rc_value = int(rc) if rc.lstrip("-").isdigit() else None
        steps.append({"name": name, "rc": rc_value, "seconds": float(seconds) if seconds else None,
                      "timeout_s": int(limit) if limit.isdigit() else None,
                      "timed_out": rc_value in TIMEOUT_STATUSES})
    return steps


def _node_id(classname: str, name: str) -> str:
    """pytest's JUnit classname ``tests.test_x`` (or ``tests.test_x.TestCls``) -> a node id."""
    parts = classname.split(".")
    if len(parts) > 1 and parts[-1].startswith("Test"):
        return "/".join(parts[:-1]) + ".py::" + parts[-1] + "::" + name
    return "/".join(parts) + ".py::" + name if classname else name


def parse_junit(path: Path) -> dict | None:
    """Counts and failing test ids from a pytest JUnit XML file; None when there is none (or it
    cannot be read: pytest was killed before writing it)."""
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed_ids, errored_ids = [], []
    for case in root.iter("testcase"):
        node = _node_id(case.get("classname", ""), case.get("name", ""))
        tags = {child.tag for child in case}
        if "failure" in tags:
            counts["failed"] += 1
            failed_ids.append(node)
        elif "error" in tags:
            counts["errors"] += 1
            errored_ids.append(node)
        elif "skipped" in tags:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "total": sum(counts.values()), "failed_ids": failed_ids, "error_ids": errored_ids}


def last_line(path: Path) -> str | None:
    """The last non-empty line of a log (a failed command's one-line error), or None."""
    if not path.exists():
        return None
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else None


def bench_summary(folder: Path, suite: str, step: dict | None) -> dict:
    """What one bench step produced: its targets and verdict from bench-<suite>.json, or why not."""
    out = {"json": f"bench-{suite}.json", **_step_fields(step)}
    path = folder / out["json"]
    result = None
    if path.exists():
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            out["error"] = f"bench-{suite}.json is not JSON: {err}"
    if isinstance(result, dict):
        out["targets"] = result.get("targets")
        out["all_targets_met"] = result.get("all_targets_met")
        header = next((result[k] for k in ("env", "machine") if isinstance(result.get(k), dict)), {})
        out["device"], out["gpu"] = header.get("device"), header.get("gpu")  # where it really ran
    elif "error" not in out:
        out["targets"], out["all_targets_met"] = None, None
        why = last_line(folder / f"bench-{suite}.log")
        if step is None:
            out["error"] = "not run"
        elif out["timed_out"]:
            out["error"] = f"timed out after {step.get('timeout_s')} s" + (f"; last output: {why}" if why else "")
        else:
            out["error"] = why or f"no bench-{suite}.json and no output (exit status {step.get('rc')})"
    return out


def _step_fields(step: dict | None) -> dict:
    if step is None:
        return {"rc": None, "seconds": None, "timed_out": False}
    return {"rc": step["rc"], "seconds": step["seconds"], "timed_out": step["timed_out"]}


def environment() -> dict:
    """torch, CUDA, the GPU torch sees, and the code's commit (routemem.machine, the shared helper)."""
    info = {"torch": None, "cuda": None, "cuda_available": False, "gpu": None, "git_commit": None}
    try:
        import torch
    except ImportError:
        return info
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if info["cuda_available"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        from routemem.machine import git_commit

        info["git_commit"] = git_commit()
    except ImportError:
        pass
    # A copy of the tree without .git (as on a lent GPU machine): the caller may say which commit.
    info["git_commit"] = info["git_commit"] or os.environ.get("ROUTEMEM_GIT_COMMIT")
    return info


def summarize(folder: Path, suites=SUITES, env: dict | None = None) -> dict:
    steps = read_steps(folder / "steps.tsv")
    by_name = {step["name"]: step for step in steps}
    tests = parse_junit(folder / "pytest-cuda.xml")
    pytest_step = by_name.get("pytest")
    pytest_part = {"junit": "pytest-cuda.xml", **_step_fields(pytest_step)}
    if tests is None:
        pytest_part["error"] = ("no test report (pytest-cuda.xml): "
                                + (last_line(folder / "pytest-cuda.log") or "pytest did not run"))
    else:
        pytest_part.update(tests)
    smi = folder / "nvidia-smi.txt"
    summary = {
        **(env if env is not None else environment()),
        "nvidia_smi": [line for line in smi.read_text().splitlines() if line.strip()] if smi.exists() else [],
        "pytest": pytest_part,
        "benches": {suite: bench_summary(folder, suite, by_name.get(f"bench-{suite}")) for suite in suites},
        "steps": steps,
        "total_seconds": round(sum(step["seconds"] or 0.0 for step in steps), 3),
    }
    summary["tests_failed"] = tests is None or tests["failed"] > 0 or tests["errors"] > 0
    summary["ok"] = not summary["tests_failed"] and all(step["rc"] == 0 for step in steps)
    return summary


def one_line(summary: dict) -> str:
    """What the script prints at the end."""
    t = summary["pytest"]
    tests = (f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped"
             if "passed" in t else t.get("error", "no tests"))
    benches = ", ".join(f"{name}: " + ("error" if b.get("error") else
                                        f"targets {'met' if b.get('all_targets_met') else 'not all met'}")
                        for name, b in summary["benches"].items())
    return (f"device-check on {summary.get('gpu') or 'no GPU'}: {tests}; {benches}; "
            f"{summary['total_seconds']:.0f} s; {'ok' if summary['ok'] else 'NOT ok'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--suites", nargs="*", default=list(SUITES))
    args = parser.parse_args(argv)
    summary = summarize(args.folder, args.suites)
    text = json.dumps(summary, indent=2) + "\n"
    try:  # the project's atomic writer when routemem is importable; a plain write otherwise
        from routemem.fileio import write_text_atomic
    except ImportError:
        (args.folder / "device-check.json").write_text(text)
    else:
        write_text_atomic(args.folder / "device-check.json", text)
    print(one_line(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
