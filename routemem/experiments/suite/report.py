"""``OUT/REPORT.md`` of ``routemem reproduce all``: every claim of every study in one table first,
then one section per study (verdict counts, command, wall time, status or error, plots), then the
environment, the corpora hashes and the commands with their wall times. Built from
``OUT/suite.json`` and each study's results.json, so it can be rebuilt at any time."""

from __future__ import annotations

from pathlib import Path

from routemem.experiments.suite.run import FAILED, MISSING
from routemem.experiments.suite.data import (
    ENV_COLUMNS,
    StudyView,
    SuiteView,
    claim_text,
    counts_text,
    duration,
    env_row,
    gather,
    hashes,
    status_text,
    total_seconds,
)
from routemem.fileio import write_text_atomic

REPORT = "REPORT.md"


def cell(text: str) -> str:
    """Text safe inside a markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows])


def claims_table(suite: SuiteView) -> str:
    rows = []
    for study, claim in suite.claims:
        text = claim_text(claim)
        rows.append([f"[{study.name}](#{study.anchor})", f"**{text['id']}**: {text['statement']}", text["paper"],
                     text["ours"], f"**{text['verdict']}**", text["why"],
                     f"[section](#{study.anchor}) · [report]({study.name}/report.md)"])
    if not rows:
        return "No study has finished, so there are no claims yet."
    return table(["study", "claim", "paper", "ours", "verdict", "why", "details"], rows)


def study_section(study: StudyView, manifest: dict) -> str:
    entry = study.entry
    lines = [f"## Study: {study.name}", "", f"- status: {status_text(study, manifest)}"]
    if study.status == MISSING:
        return "\n".join(lines)
    fingerprint = entry.get("fingerprint") or "— (no Setting)"
    lines += [f"- mode: {entry.get('mode', '—')}, setting fingerprint {fingerprint}, data folder "
              f"{entry.get('data_dir') or '—'}",
              f"- wall time: {duration(entry.get('seconds'))} (started {entry.get('started', '—')}, "
              f"finished {entry.get('finished', '—')})"]
    if study.results:
        lines += [f"- verdicts: {counts_text(study.claims)}",
                  f"- its report: [{study.name}/report.md]({study.name}/report.md), results: "
                  f"[{study.name}/results.json]({study.name}/results.json)"]
    lines += ["", "Command:", "", "```bash", entry.get("command", ""), "```"]
    if study.status == FAILED:
        error = entry.get("error") or {}
        lines += ["", f"**Failed**: {error.get('type', '?')}: {error.get('message', '')}", "", "```text",
                  *error.get("traceback", []), "```"]
    if study.plots:
        lines += [""] + [f"![{Path(plot).stem}]({plot})" for plot in study.plots]
    return "\n".join(lines)


def environment(suite: SuiteView) -> str:
    done = [s for s in suite.studies if s.results]
    if not done:
        return "No results to take the environment from."
    header = ["study", *ENV_COLUMNS]
    return table(header, [[s.name, *env_row(s).values()] for s in done])


def corpora(suite: SuiteView) -> str:
    rows = []
    for study in suite.studies:
        if study.results:
            found = hashes(study.results.get("data") or {})
            rows += [[study.name, name, f"`{digest}`"] for name, digest in found] or \
                [[study.name, "(none recorded)", "—"]]
    return table(["study", "data", "sha256"], rows) if rows else "No results to take the corpora from."


def commands(suite: SuiteView) -> str:
    rows = [[s.name, s.status, f"`{s.entry.get('command', '—')}`", duration(s.entry.get("seconds"))]
            for s in suite.studies if s.status != MISSING]
    invocation = suite.manifest.get("invocation") or {}
    ran, reused = (", ".join(invocation.get(key) or []) or "none" for key in ("ran", "reused"))
    return "\n".join([
        table(["study", "status", "command", "wall time"], rows), "",
        f"Total of the studies' wall times: {duration(total_seconds(suite))}. This invocation "
        f"(`{suite.manifest.get('command', '')}`) took {duration(invocation.get('seconds'))}: "
        f"ran {ran}; reused {reused}."])


def build_report(suite: SuiteView) -> str:
    studies = suite.studies
    count = {status: [s.name for s in studies if s.status == status] for status in ("complete", FAILED, MISSING)}
    summary = "; ".join(f"{status}: {', '.join(names)}" for status, names in count.items() if names)
    parts = [
        "# routemem: every claim of every study",
        "",
        (f"Mode: {suite.manifest.get('mode', '—')}. Command: `{suite.manifest.get('command', '')}`. "
        f"Updated {suite.manifest.get('updated', '—')}."),
        "",
        (f"Studies: {summary}. Verdicts: {counts_text([c for _, c in suite.claims])}. "
        "Absolute numbers differ from the papers (the models are tiny); directions and ratios are "
        "what the verdict rules test. `report.html` beside this file is the same report as one page."),
        "",
        "## Claims",
        "",
        claims_table(suite),
        "",
        *[study_section(study, suite.manifest) + "\n" for study in studies],
        "## Environment",
        "",
        environment(suite),
        "",
        "## Corpora",
        "",
        corpora(suite),
        "",
        "## Commands and wall time",
        "",
        commands(suite),
        "",
    ]
    return "\n".join(parts)


def write_report(out: str | Path) -> Path:
    path = Path(out) / REPORT
    write_text_atomic(path, build_report(gather(out)))
    return path


def summary_lines(out: str | Path) -> list[str]:
    """What ``routemem reproduce all`` prints at the end: one line per study."""
    suite = gather(out)
    width = max(len(s.name) for s in suite.studies) if suite.studies else 0
    lines = []
    for study in suite.studies:
        detail = counts_text(study.claims) if study.results else ""
        if study.status == FAILED:
            error = study.entry.get("error") or {}
            detail = f"{error.get('type', '?')}: {error.get('message', '')}"
        lines.append(f"{study.name:<{width}}  {status_text(study, suite.manifest)}" + (f": {detail}" if detail else ""))
    return lines
