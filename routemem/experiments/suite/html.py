"""``OUT/report.html`` of ``routemem reproduce all``: the same report as REPORT.md on one page
that needs nothing else (CSS inline, plots as base64 ``data:`` URIs, no URL outside the folder),
with the claims table first and each verdict coloured. Every text is escaped.

A small inline script marks, once the page has loaded, each image with ``data-rendered="yes"``
or ``"no"`` (its natural width) and the body with ``data-images="<rendered>/<all>"``, so a
headless browser's DOM dump shows whether the plots rendered."""

from __future__ import annotations

import base64
from html import escape
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
    verdict_class,
)
from routemem.fileio import write_text_atomic

PAGE = "report.html"

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; padding: 0 1em; color: #1d1d1f; }
table { border-collapse: collapse; margin: 0.8em 0 1.6em; width: 100%; }
th, td { border: 1px solid #c8c8cc; padding: 0.35em 0.5em; text-align: left; vertical-align: top; }
th { background: #eef0f3; }
td.ours, td.paper { font-size: 0.9em; }
table.claims td:nth-child(2) { min-width: 14em; }
table.claims td.paper { min-width: 10em; }
table.claims td.ours { min-width: 18em; }
.verdict { font-weight: 600; white-space: nowrap; }
.v-ok { background: #d8f5dc; color: #0b5d1e; }
.v-bad { background: #fbdada; color: #8a1111; }
.v-unsure { background: #fdf1c7; color: #6b4e00; }
.v-other { background: #e7e7ea; }
.legend span { padding: 0.1em 0.5em; margin-right: 0.5em; border-radius: 3px; }
pre { background: #f5f5f7; padding: 0.6em; overflow-x: auto; white-space: pre-wrap; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; }
figure img { max-width: 640px; border: 1px solid #ddd; }
code { font-size: 0.92em; }
"""

SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images), rendered = 0;
  images.forEach(function (img) {
    var ok = img.complete && img.naturalWidth > 0;
    img.setAttribute("data-rendered", ok ? "yes" : "no");
    if (ok) { rendered += 1; }
  });
  document.body.setAttribute("data-images", rendered + "/" + images.length);
});
"""


def e(text) -> str:
    return escape(str(text), quote=True)


def html_table(header: list[str], rows: list[str], css: str = "") -> str:
    """``rows`` are ready-made ``<tr>`` strings (their cells escaped by the caller)."""
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    return f'<table class="{e(css)}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def td(text, css: str = "") -> str:
    return f'<td class="{e(css)}">{e(text)}</td>' if css else f"<td>{e(text)}</td>"


def claims_table(suite: SuiteView) -> str:
    rows = []
    for study, claim in suite.claims:
        text = claim_text(claim)
        verdict = f"verdict v-{verdict_class(text['verdict'])}"
        rows.append(
            f'<tr class="claim"><td><a href="#{e(study.anchor)}">{e(study.name)}</a></td>'
            f"<td><b>{e(text['id'])}</b>: {e(text['statement'])}</td>{td(text['paper'], 'paper')}"
            f"{td(text['ours'], 'ours')}{td(text['verdict'], verdict)}{td(text['why'])}"
            f'<td><a href="#{e(study.anchor)}">section</a> · <a href="{e(study.name)}/report.md">report</a></td></tr>')
    if not rows:
        rows = ['<tr><td colspan="7">No study has finished, so there are no claims yet.</td></tr>']
    return html_table(["study", "claim", "paper", "ours", "verdict", "why", "details"], rows, "claims")


def image(out: Path, plot: str) -> str:
    try:
        data = base64.b64encode((out / plot).read_bytes()).decode("ascii")
    except OSError:
        return f"<p>(plot {e(plot)} could not be read)</p>"
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{e(Path(plot).stem)}">'
            f"<figcaption>{e(plot)}</figcaption></figure>")


def study_section(suite: SuiteView, study: StudyView) -> str:
    entry = study.entry
    parts = [f'<section id="{e(study.anchor)}"><h2>Study: {e(study.name)}</h2>',
             f"<p>Status: {e(status_text(study, suite.manifest))}</p>"]
    if study.status != MISSING:
        done = (f" Verdicts: {e(counts_text(study.claims))}. Its report: <a href=\"{e(study.name)}/report.md\">"
                f"{e(study.name)}/report.md</a>." if study.results else "")
        parts += [
            (f"<p>Mode: {e(entry.get('mode', '—'))}, setting fingerprint "
            f"{e(entry.get('fingerprint') or '— (no Setting)')}. Wall time: {e(duration(entry.get('seconds')))} "
            f"(started {e(entry.get('started', '—'))}, finished {e(entry.get('finished', '—'))}).{done}</p>"),
            f"<pre>{e(entry.get('command', ''))}</pre>"]
    if study.status == FAILED:
        error = entry.get("error") or {}
        parts += [f"<p class=\"verdict v-bad\">Failed: {e(error.get('type', '?'))}: {e(error.get('message', ''))}</p>",
                  f"<pre>{e(chr(10).join(error.get('traceback', [])))}</pre>"]
    parts += [image(suite.out, plot) for plot in study.plots]
    return "\n".join(parts + ["</section>"])


def environment(suite: SuiteView) -> str:
    rows = ["<tr>" + td(s.name) + "".join(td(v) for v in env_row(s).values()) + "</tr>"
            for s in suite.studies if s.results]
    return html_table(["study", *ENV_COLUMNS], rows, "env")


def corpora(suite: SuiteView) -> str:
    rows = []
    for study in suite.studies:
        if study.results:
            found = hashes(study.results.get("data") or {}) or [("(none recorded)", "—")]
            rows += [f"<tr>{td(study.name)}{td(name)}<td><code>{e(digest)}</code></td></tr>" for name, digest in found]
    return html_table(["study", "data", "sha256"], rows, "corpora")


def commands(suite: SuiteView) -> str:
    rows = [f"<tr>{td(s.name)}{td(s.status)}<td><code>{e(s.entry.get('command', '—'))}</code></td>"
            f"{td(duration(s.entry.get('seconds')))}</tr>" for s in suite.studies if s.status != MISSING]
    invocation = suite.manifest.get("invocation") or {}
    return html_table(["study", "status", "command", "wall time"], rows, "commands") + (
        f"<p>Total of the studies' wall times: {e(duration(total_seconds(suite)))}. This invocation "
        f"(<code>{e(suite.manifest.get('command', ''))}</code>) took {e(duration(invocation.get('seconds')))}: "
        f"ran {e(', '.join(invocation.get('ran') or []) or 'none')}; "
        f"reused {e(', '.join(invocation.get('reused') or []) or 'none')}.</p>")


def build_page(suite: SuiteView) -> str:
    manifest = suite.manifest
    by_status = {}
    for study in suite.studies:
        by_status.setdefault(study.status, []).append(study.name)
    summary = "; ".join(f"{status}: {', '.join(names)}" for status, names in by_status.items())
    legend = "".join(f'<span class="v-{verdict_class(v)}">{e(v)}</span>'
                     for v in ("reproduced", "not reproduced", "inconclusive"))
    body = [
        "<h1>routemem: every claim of every study</h1>",
        (f"<p>Mode: {e(manifest.get('mode', '—'))}. Command: <code>{e(manifest.get('command', ''))}</code>. "
        f"Updated {e(manifest.get('updated', '—'))}.</p>"),
        (f"<p>Studies: {e(summary)}. Verdicts: {e(counts_text([c for _, c in suite.claims]))}. Absolute numbers "
        "differ from the papers (the models are tiny); directions and ratios are what the verdict rules test.</p>"),
        f'<p class="legend">{legend}</p>',
        "<h2>Claims</h2>", claims_table(suite),
        *[study_section(suite, study) for study in suite.studies],
        "<h2>Environment</h2>", environment(suite),
        "<h2>Corpora</h2>", corpora(suite),
        "<h2>Commands and wall time</h2>", commands(suite),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>routemem: every claim of every study</title>"
            f"<style>{STYLE}</style></head>\n<body data-images=\"pending\">\n" + "\n".join(body) +
            f"\n<script>{SCRIPT}</script>\n</body></html>\n")


def write_page(out: str | Path) -> Path:
    path = Path(out) / PAGE
    write_text_atomic(path, build_page(gather(out)))
    return path
