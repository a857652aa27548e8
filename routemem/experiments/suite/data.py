"""What the suite's reports show, gathered once for both (``suite_report``: markdown,
``suite_html``: the page): each study's manifest entry and results.json, and every claim's fields
rendered as text.

Claims have different shapes across studies ("paper" and "measured" hold numbers, strings,
mean/std/n summaries, lists, nested arms; rwf's head-to-head claims carry "pairs" instead of
"measured"), so values are rendered generically: a summary as ``mean ± std (n=N)``, a mapping as
``key: value`` pairs, a list in brackets. Verdict strings are kept verbatim.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from routemem.experiments.shared.common import where_trained
from routemem.experiments.suite.run import (
    COMPLETE,
    FAILED,
    MISSING,
    read_manifest,
    suite_order,
)

CLAIM_KEYS = ("id", "statement", "description", "verdict", "why", "paper")  # everything else is "ours"
ENV_KEYS = ("device", "cpu", "gpu", "threads", "torch", "cuda", "python", "routemem", "git_commit")
ENV_COLUMNS = (*ENV_KEYS, "jobs", "runs reused", "trained on")
LIST_SHOWN = 8  # longer lists show their first items and a count


@dataclass
class StudyView:
    name: str
    entry: dict
    results: dict | None = None  # a complete study's results.json
    problem: str | None = None  # why a complete study has no readable results.json
    plots: list[str] = field(default_factory=list)  # PNG paths relative to the output folder

    @property
    def status(self) -> str:
        return self.entry.get("status", MISSING)

    @property
    def anchor(self) -> str:
        """The id of the study's section; markdown renderers derive it from "Study: <name>"."""
        return f"study-{self.name}"

    @property
    def claims(self) -> list[dict]:
        return (self.results or {}).get("claims") or []


@dataclass
class SuiteView:
    out: Path
    manifest: dict
    studies: list[StudyView]

    @property
    def claims(self) -> list[tuple[StudyView, dict]]:
        return [(study, claim) for study in self.studies for claim in study.claims]


def gather(out: str | Path) -> SuiteView:
    out = Path(out)
    manifest = read_manifest(out)
    order = manifest.get("order") or suite_order()
    studies = []
    for name in order:
        # no entry yet: the suite was stopped (or is still running) before this study
        view = StudyView(name, manifest["studies"].get(name) or {"status": "not run yet"})
        if view.status == COMPLETE:
            try:
                view.results = json.loads((out / view.entry.get("results", f"{name}/results.json")).read_text())
            except (OSError, ValueError) as err:
                view.problem = f"results.json unreadable: {err}"
            view.plots = sorted(p.relative_to(out).as_posix() for p in (out / name).glob("*.png"))
        studies.append(view)
    return SuiteView(out, manifest, studies)


# --- values as text ----------------------------------------------------------------------------


def is_summary(value) -> bool:
    return isinstance(value, dict) and "mean" in value and "n" in value


def number(value) -> str:
    if isinstance(value, (bool, int)):
        return str(value)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.4g}"


def render(value) -> str:
    """Any JSON value as one line of text."""
    if is_summary(value):
        std = value.get("std")
        spread = f" ± {number(std)}" if std is not None else ""
        return f"{number(value['mean'])}{spread} (n={value['n']})"
    if isinstance(value, dict):
        return ", ".join(f"{key}: {render(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        shown = [render(item) for item in value[:LIST_SHOWN]]
        more = f", … ({len(value)} in all)" if len(value) > LIST_SHOWN else ""
        return "[" + "; ".join(shown) + more + "]"
    if isinstance(value, (int, float)) or value is None:
        return number(value)
    return str(value)


def render_fields(fields) -> str:
    """A claim's "paper" or "ours" mapping: one ``key: value`` per field, joined by "; "; a lone
    "ours" shows its value alone."""
    if not isinstance(fields, dict) or is_summary(fields):
        return render(fields)
    if list(fields) == ["ours"]:
        return render(fields["ours"])
    return "; ".join(f"{key}: {render(value)}" for key, value in fields.items())


def without_why(value):
    """``value`` less any nested "why": a claim's own why has its own column, and the studies'
    per-comparison whys repeat the numbers already shown."""
    if isinstance(value, dict):
        return {key: without_why(item) for key, item in value.items() if key != "why"}
    if isinstance(value, list):
        return [without_why(item) for item in value]
    return value


def claim_text(claim: dict) -> dict:
    """The claims table's cells for one claim (strings; a missing field is empty)."""
    extra = {key: without_why(value) for key, value in claim.items() if key not in CLAIM_KEYS}
    measured = extra.pop("measured", None)
    if isinstance(measured, dict) and not is_summary(measured):
        ours = {**measured, **extra}
    elif measured is None:
        ours = extra or None
    else:
        ours = {"measured": measured, **extra} if extra else measured
    return {"id": str(claim.get("id", "")), "statement": str(claim.get("statement") or claim.get("description") or ""),
            "paper": render_fields(claim.get("paper")) if claim.get("paper") is not None else "",
            "ours": render_fields(ours) if ours is not None else "",
            "verdict": str(claim.get("verdict", "")), "why": str(claim.get("why", ""))}


def verdict_counts(claims: list[dict]) -> list[tuple[str, int]]:
    """(verdict, count) in the order the verdicts first appear; the strings verbatim."""
    return list(Counter(str(c.get("verdict", "")) for c in claims).items())


def counts_text(claims: list[dict]) -> str:
    return ", ".join(f"{n} {verdict}" for verdict, n in verdict_counts(claims)) or "no claims"


def verdict_class(verdict: str) -> str:
    """A CSS-safe name for a verdict's colour."""
    known = {"reproduced": "ok", "not reproduced": "bad", "inconclusive": "unsure"}
    return known.get(verdict.strip().lower(), "other")


def duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "—"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def status_text(study: StudyView, manifest: dict) -> str:
    reused = study.name in manifest.get("invocation", {}).get("reused", [])
    if study.status == MISSING:
        return "missing (this version of routemem has no such study)"
    text = study.status + (" (reused from an earlier run: same mode and setting)" if reused else "")
    return text + (f"; {study.problem}" if study.problem else "")


def env_row(study: StudyView) -> dict:
    """The ENV_COLUMNS of a study's results: its machine header, worker processes, the runs its run
    cache already held, and where its runs were trained (study reports' "on ..." phrase)."""
    results = study.results or {}
    env = results.get("env") or {}
    row = {key: env.get(key) for key in ENV_KEYS}
    row["jobs"] = (results.get("execution") or {}).get("jobs")
    row["runs reused"] = results.get("runs_reused")
    try:
        row["trained on"] = where_trained(results)
    except (KeyError, TypeError, AttributeError):  # an older or partial header
        row["trained on"] = None
    return {key: "—" if value is None else str(value) for key, value in row.items()}


def hashes(data, path: str = "") -> list[tuple[str, str]]:
    """Every (name, sha256) in a results.json "data" block, wherever a key names sha256."""
    found = []
    if isinstance(data, dict):
        for key, value in data.items():
            where = f"{path}.{key}" if path else str(key)
            if "sha256" in str(key) and isinstance(value, dict):
                found += [(str(name), str(digest)) for name, digest in value.items() if isinstance(digest, str)]
            elif "sha256" in str(key) and isinstance(value, str):
                found.append((where, value))
            else:
                found += hashes(value, where)
    return found


def total_seconds(suite: SuiteView) -> float:
    return sum(s.entry.get("seconds") or 0.0 for s in suite.studies if s.status in (COMPLETE, FAILED))
