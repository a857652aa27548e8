"""The README works as written: its Python blocks run, its `routemem` commands parse, the paths it
names exist, it points nowhere outside the project, and CI runs the test command it gives.

A Python block that needs a data file is marked by an HTML comment on the line before its fence,
``<!-- needs-data: shakespeare -->`` (several names: comma-separated); it is skipped, with the
reason, when that corpus is not available. Commands are parsed, never run: no training here.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import pytest

from routemem.cli import build_parser, resolve_config_path
from routemem.data import load_corpus
from routemem.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
NEEDS_DATA = re.compile(r"^<!--\s*needs-data:\s*([\w:.,\s-]+?)\s*-->$")
PROJECT_PATH = re.compile(r"(?<![\w./-])((?:routemem|tests|docs|scripts|\.ci)/[\w./{},-]*)")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # 1-based line of the block's first code line in the file
    code: str
    needs: tuple[str, ...] = ()


def fenced_blocks(text: str) -> list[Block]:
    """Every fenced code block with its language, and the corpora named by a needs-data marker on
    the last non-blank line before its opening fence."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        before = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        marker = NEEDS_DATA.match(before)
        needs = tuple(n.strip() for n in marker.group(1).split(",") if n.strip()) if marker else ()
        end = next((j for j in range(i + 1, len(lines)) if FENCE.match(lines[j])), None)
        assert end is not None, f"code fence opened at line {i + 1} is never closed"
        blocks.append(Block(opening.group(1).lower(), i + 2, "\n".join(lines[i + 1:end]) + "\n", needs))
        i = end + 1
    return blocks


def routemem_commands(block: Block) -> list[tuple[int, list[str]]]:
    """(line, argv after `routemem`) for each routemem command in a shell block: a line starting with
    `routemem`, a command chained with && / || / ;, or `python -m routemem` / `torchrun ... -m routemem`.
    Synopsis brackets are unwrapped, so `[--split test]` is checked as `--split test`."""
    commands = []
    for offset, line in enumerate(block.code.splitlines()):
        if "routemem" not in line:
            continue
        segment: list[str] = []
        for token in shlex.split(line, comments=True) + [";"]:
            if token not in ("&&", "||", ";", "|"):
                segment.append(token)
                continue
            argv = None
            if segment[:1] == ["routemem"]:
                argv = segment[1:]
            elif "-m" in segment[:-1] and segment[segment.index("-m") + 1] == "routemem":
                argv = segment[segment.index("-m") + 2:]
            if argv is not None:
                unwrapped = (t.lstrip("[").rstrip("]") for t in argv)
                commands.append((block.line + offset, [t for t in unwrapped if t not in ("", "...")]))
            segment = []
    return commands


def expand_braces(path: str) -> list[str]:
    """`a/{b,c}/d` -> [`a/b/d`, `a/c/d`]."""
    parts = re.split(r"\{([^}]*)\}", path)
    options = [[p] if k % 2 == 0 else p.split(",") for k, p in enumerate(parts)]
    return ["".join(choice) for choice in product(*options)]


TEXT = README.read_text(encoding="utf-8")
BLOCKS = fenced_blocks(TEXT)
PYTHON = [b for b in BLOCKS if b.lang == "python"]
COMMANDS = [c for b in BLOCKS if b.lang in ("bash", "sh", "shell", "console") for c in routemem_commands(b)]


def test_the_readme_has_python_blocks_and_commands():
    assert PYTHON and COMMANDS, "no ```python block or routemem command found: is the fence format new?"


@pytest.mark.parametrize("block", PYTHON, ids=[f"README.md:{b.line}" for b in PYTHON])
def test_python_block_runs_as_written(block, tmp_path, monkeypatch):
    for name in block.needs:
        try:
            load_corpus(name)
        except DataError as err:
            pytest.skip(f"README.md:{block.line} needs corpus '{name}': {err}")
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands in a scratch folder
    # Padded so a traceback names the README's own line numbers; a fresh namespace per block, as
    # a reader who pastes only this block into a new interpreter has.
    code = compile("\n" * (block.line - 1) + block.code, str(README), "exec")
    exec(code, {"__name__": "__main__"})


@pytest.mark.parametrize("line,argv", COMMANDS, ids=[f"README.md:{line}" for line, _ in COMMANDS])
def test_routemem_command_parses(line, argv, capsys):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:
        if stop.code == 0 and "--help" in argv:  # argparse prints the help and exits 0
            return
        pytest.fail(f"README.md:{line}: `routemem {' '.join(argv)}` does not parse: {capsys.readouterr().err}")
    if getattr(args, "config", None):
        resolve_config_path(args.config)  # a shipped config name the README gives must exist


def test_readme_points_nowhere_outside_the_project():
    outside = [line for line in TEXT.splitlines() if "../" in line or "DESIGN.md" in line]
    assert outside == [], f"README.md points outside the project (docs/architecture.md is ours): {outside}"
    for target in MARKDOWN_LINK.findall(TEXT):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor
        path = (ROOT / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"README.md links to a missing file: {target}"


def test_project_paths_named_in_the_readme_exist():
    named = {m.rstrip(".,") for m in PROJECT_PATH.findall(TEXT)}
    assert "docs/architecture.md" in named
    missing = [p for path in sorted(named) for p in expand_braces(path) if not (ROOT / p).exists()]
    assert missing == [], f"README.md names paths that do not exist: {missing}"


def test_ci_runs_the_readme_test_command():
    """The README's install-and-test line (pip install ... && pytest) is a line of .ci/run."""
    commands = [line.strip() for b in BLOCKS if b.lang == "bash" for line in b.code.splitlines()
                if "pip install" in line and "-m pytest" in line]
    assert commands, "README.md gives no install-and-test command"
    ci = {line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()}
    assert [c for c in commands if c not in ci] == [], ".ci/run does not run the README's test command"


def test_needs_data_marker_is_read_from_the_line_before_the_fence():
    text = ("<!-- needs-data: shakespeare, warandpeace -->\n\n```python\nx = 1\n```\n"
            "<!-- needs-data: shakespeare -->\nA paragraph in between.\n```python\ny = 2\n```\n"
            "```bash\nrouteMEM x\nroutemem eval --ckpt r [--split val] && python -m routemem corpora  # c\n```\n")
    first, second, shell = fenced_blocks(text)
    assert (first.lang, first.line, first.code, first.needs) == ("python", 4, "x = 1\n", ("shakespeare", "warandpeace"))
    assert second.needs == ()
    assert routemem_commands(shell) == [(13, ["eval", "--ckpt", "r", "--split", "val"]), (13, ["corpora"])]
