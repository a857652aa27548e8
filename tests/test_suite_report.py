"""REPORT.md of ``routemem reproduce all``, built from a synthetic output folder: every claim in
the first table with the paper's number, ours (mean ± std, n), the verdict verbatim, the why and
its links; each study's section; the environment, corpora hashes, commands and wall times; claims
of unusual shapes rendered without a crash."""

from __future__ import annotations

import re

import pytest
from suite_inputs import ALPHA_CLAIMS, synthetic_suite

from routemem.experiments.suite.data import claim_text, duration, gather, hashes, render
from routemem.experiments.suite.report import build_report, summary_lines, write_report


@pytest.fixture
def report(tmp_path) -> str:
    out = synthetic_suite(tmp_path / "all")
    path = write_report(out)
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["REPORT.md", "suite.json"]  # no temp file left
    return path.read_text()


def github_slug(heading: str) -> str:
    """The anchor GitHub (and most markdown renderers) give a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def claims_rows(report: str) -> list[str]:
    table = report.split("## Claims", 1)[1].split("\n## ", 1)[0]
    return [line for line in table.splitlines() if line.startswith("| [")]


def test_the_claims_table_comes_first_with_a_row_per_claim(report):
    assert report.index("## Claims") < report.index("## Study:")
    rows = claims_rows(report)
    assert len(rows) == len(ALPHA_CLAIMS) + 1  # alpha's claims and gpu-study's one
    assert [re.search(r"\*\*(\w+)\*\*", row).group(1) for row in rows] == \
        [c["id"] for c in ALPHA_CLAIMS] + ["gpu_study_claim"]


def test_every_field_of_a_claim_is_rendered(report):
    row = claims_rows(report)[0]
    for text in ("[alpha](#study-alpha)", "**base_ppl_gap**: APN is nearly as good as dense \\| within 10%",
                 "ours: 4.57; baseline: 4.32; ratio: 1.058",  # the paper's numbers
                 "ours: 5.35 ± 0.11 (n=3); baseline: 5.36 ± 0.02 (n=3); ratio: 0.998 ± 0.021 (n=3)",
                 "**reproduced**", "ratio 0.998 within 10%", "[section](#study-alpha)", "[report](alpha/report.md)"):
        assert text in row, text


def test_verdict_strings_are_kept_verbatim(report):
    verdicts = [re.findall(r"\| \*\*([^*]+)\*\* \|", row)[-1] for row in claims_rows(report)]
    assert verdicts == [c["verdict"] for c in ALPHA_CLAIMS] + ["reproduced"]
    assert "- verdicts: 2 reproduced, 1 not reproduced, 1 inconclusive" not in report  # counted verbatim:
    assert "- verdicts: 1 reproduced, 1 not reproduced, 1 inconclusive, 1 reproduced (by a hair)" in report


def test_claims_of_unusual_shapes_render(report):
    rows = claims_rows(report)
    assert "a claim whose measured value is a list of mixed things" in rows[1]  # no statement: the description
    assert "[1.5; a: —, b: —; text; [0; 1; 2; 3; 4; 5; 6; 7, … (10 in all)]]" in rows[1]
    assert "| pairs: [baseline: l2p, metric: a_auc, verdict: inconclusive, ours: 0.41 ± 0.05 (n=2), " \
           "baseline_stats: 0.4 ± 0.06 (n=2)] |" in rows[2]  # no "measured" field: what the claim has instead
    assert "nested why" not in rows[2]  # a comparison's why repeats its numbers: the claim's why has a column
    assert "measured: 0.125; chance: 0.0625" in rows[3] and "| **reproduced (by a hair)** |" in rows[3]


def test_links_reach_the_study_sections(report):
    headings = [line[len("## Study: "):] for line in report.splitlines() if line.startswith("## Study: ")]
    assert headings == ["alpha", "gpu-study", "beta", "gamma", "delta"]
    slugs = {github_slug("Study: " + name) for name in headings}
    assert set(re.findall(r"\]\(#([\w-]+)\)", report)) <= slugs
    assert "study-gpu-study" in slugs


def test_each_study_section_has_its_counts_command_wall_time_status_and_plots(report):
    alpha = report.split("## Study: alpha", 1)[1].split("\n## ", 1)[0]
    for text in ("- status: complete", "fingerprint f00d", "2 min 18 s", "started 2026-11-27T10:00:00+00:00",
                 "reproduce alpha --quick --out", "--jobs 2", "![curves](alpha/curves.png)",
                 "![tradeoff](alpha/tradeoff.png)", "[alpha/report.md](alpha/report.md)"):
        assert text in alpha, text
    assert "reused from an earlier run" in report.split("## Study: gpu-study", 1)[1].split("\n## ", 1)[0]
    beta = report.split("## Study: beta", 1)[1].split("\n## ", 1)[0]
    assert "- status: failed" in beta and "**Failed**: DataError: corpus 'x' not found" in beta
    assert '  File "beta.py", line 3' in beta and "verdicts" not in beta
    assert "missing (this version of routemem has no such study)" in report.split("## Study: gamma", 1)[1]
    assert "results.json unreadable" in report.split("## Study: delta", 1)[1].split("\n## ", 1)[0]


def test_environment_hashes_commands_and_wall_times(report):
    env = report.split("## Environment", 1)[1].split("\n## ", 1)[0]
    for text in ("| alpha | cpu | Fake CPU 9000 | — | 2 | 2.13.0+cpu |", "abc1234def",
                 "| gpu-study | cuda |", "NVIDIA H100 80GB HBM3", "2.11.0+cu130", "ccf1510aaa"):
        assert text in env, text
    assert "| 2 | 17 | Fake CPU 9000 (cpu, 2 threads), 2 worker processes |" in env  # jobs, runs reused, trained on
    assert "| NVIDIA H100 80GB HBM3 (cuda, 2 threads), 2 worker processes |" in env
    corpora = report.split("## Corpora", 1)[1].split("\n## ", 1)[0]
    assert "| alpha | shakespeare | `86c4e6aa` |" in corpora and "| alpha | warandpeace | `cea8ccb6` |" in corpora
    assert "| gpu-study | (none recorded) | — |" in corpora
    commands = report.split("## Commands and wall time", 1)[1]
    for text in ("routemem reproduce alpha --quick", "| 2 min 18 s |", "routemem reproduce gpu-study", "| 1 h 02 min |",
                 "| beta | failed |", "Total of the studies' wall times: 1 h 04 min",
                 "took 2 min 30 s: ran alpha, beta; reused gpu-study, delta", "routemem reproduce all --quick"):
        assert text in commands, text
    assert "gamma" not in commands


def test_summary_lines_name_each_study_and_its_state(tmp_path):
    lines = summary_lines(synthetic_suite(tmp_path))
    assert lines[0] == "alpha      complete: 1 reproduced, 1 not reproduced, 1 inconclusive, 1 reproduced (by a hair)"
    assert lines[2] == "beta       failed: DataError: corpus 'x' not found"
    assert lines[3].startswith("gamma      missing")


def test_a_study_the_suite_has_not_reached_is_not_called_missing(tmp_path):
    (tmp_path / "suite.json").write_text('{"studies": {}, "order": ["later"]}')
    report = build_report(gather(tmp_path))
    assert "- status: not run yet" in report and "missing" not in report


def test_an_empty_suite_says_so(tmp_path):
    (tmp_path / "suite.json").write_text('{"studies": {}, "order": []}')
    assert "there are no claims yet" in build_report(gather(tmp_path))


@pytest.mark.parametrize("value, text", [
    ({"mean": 1.0, "std": 0.5, "n": 2}, "1 ± 0.5 (n=2)"),
    ({"mean": 2.0, "n": 1}, "2 (n=1)"),
    ({"mean": float("nan"), "std": 0.0, "n": 0}, "— ± 0 (n=0)"),
    ([{"mean": 1.0, "std": 0.0, "n": 3}, None], "[1 ± 0 (n=3); —]"),
    ({"a": {"b": [True, 3]}}, "a: b: [True; 3]"),
    (0.000123456, "0.0001235"),
    ("text", "text"),
])
def test_render_any_value(value, text):
    assert render(value) == text


def test_claim_text_of_a_bare_claim():
    assert claim_text({}) == {"id": "", "statement": "", "paper": "", "ours": "", "verdict": "", "why": ""}
    assert claim_text({"measured": {"mean": 1.0, "std": 0.0, "n": 2}})["ours"] == "1 ± 0 (n=2)"


def test_hashes_are_found_wherever_the_data_block_keeps_them():
    data = {"sha256": {"a": "1"}, "streams": {"glyphs": {"images_sha256": "2"}}, "corpus_sha256": "3", "n": 5}
    assert hashes(data) == [("a", "1"), ("streams.glyphs.images_sha256", "2"), ("corpus_sha256", "3")]


@pytest.mark.parametrize("seconds, text", [(0.4, "0 s"), (59, "59 s"), (138.2, "2 min 18 s"), (3725, "1 h 02 min"),
                                           (None, "—")])
def test_duration(seconds, text):
    assert duration(seconds) == text
