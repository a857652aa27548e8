"""What every study shares: the environment header, mean/std summaries, the verdict rule for a
directional claim, writing results.json / report.md atomically (DESIGN.md's results format), and
the per-run cache that lets a long study resume after an interruption."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Callable

import torch

from routemem.fileio import write_text_atomic
from routemem.machine import machine_header

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


def env_header(device: torch.device | str = "cpu") -> dict:
    return machine_header(device)


def summarize(values: list[float]) -> dict:
    """mean, sample std (0 for a single value) and n."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values) if values else math.nan, "std": std, "n": len(values)}


def directional_verdict(ours: dict, baseline: dict, higher_is_better: bool = True) -> tuple[str, str]:
    """The rule for "ours beats baseline": reproduced when the means differ in the paper's direction
    and the mean +- std intervals do not overlap; not reproduced when they differ the other way
    without overlap; inconclusive otherwise, and always with fewer than two seeds per side."""
    if min(ours["n"], baseline["n"]) < 2:
        return INCONCLUSIVE, f"n={min(ours['n'], baseline['n'])} seed(s): one seed cannot separate an effect from noise"
    sign = 1.0 if higher_is_better else -1.0
    gap = sign * (ours["mean"] - baseline["mean"])
    spread = ours["std"] + baseline["std"]
    text = f"{ours['mean']:.3f}+-{ours['std']:.3f} vs {baseline['mean']:.3f}+-{baseline['std']:.3f}"
    if gap > spread:
        return REPRODUCED, f"{text}: in the paper's direction, intervals disjoint"
    if -gap > spread:
        return NOT_REPRODUCED, f"{text}: against the paper's direction, intervals disjoint"
    return INCONCLUSIVE, f"{text}: intervals overlap"


def combine_verdicts(verdicts: list[str]) -> str:
    """A claim made of several comparisons holds only if all do; one contrary result refutes it."""
    if any(v == NOT_REPRODUCED for v in verdicts):
        return NOT_REPRODUCED
    if verdicts and all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    return INCONCLUSIVE


def best_per_seed(runs: list[dict], arms, seeds, score: Callable[[dict], float],
                  higher_is_better: bool = True) -> dict[str, list[dict]]:
    """For each arm and seed, the run with the best validation ``score(run)`` among those that
    finished (have a "val" entry): the learning-rate choice of a grid search."""
    pick = max if higher_is_better else min
    chosen: dict[str, list[dict]] = {arm: [] for arm in arms}
    for arm in arms:
        for seed in seeds:
            done = [r for r in runs if r["arm"] == arm and r["seed"] == seed and "val" in r]
            if done:
                chosen[arm].append(pick(done, key=score))
    return chosen


def write_outputs(study_dir: Path, results: dict, report: str) -> None:
    study_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(study_dir / "results.json", json.dumps(results, indent=2, default=_jsonable))
    write_text_atomic(study_dir / "report.md", report)


class RunCache:
    """Finished runs of a study, one JSON file per run under ``folder``, so that an interrupted
    study resumes where it stopped instead of starting over (the full studies take hours on a CPU).

    A file is reused only if it was written for the same ``setting`` (any JSON-able description of
    everything that sizes the run); otherwise the run is trained again and the file replaced."""

    def __init__(self, folder: Path, setting: dict):
        self.folder = Path(folder)
        self.setting = json.loads(json.dumps(setting, default=_jsonable))  # tuples -> lists
        self.reused = 0

    def get_or_run(self, name: str, train: Callable[[], dict]) -> dict:
        path = self.folder / f"{name}.json"
        try:
            cached = json.loads(path.read_text())
            if cached.get("setting") == self.setting:
                self.reused += 1
                return cached["run"]
        except (OSError, ValueError, AttributeError, KeyError):
            pass  # missing or unreadable: train it
        run = train()
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"setting": self.setting, "run": run}, default=_jsonable))
        return run


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(x):
        return f"{x:.3f}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
