"""REPRODUCIBILITY.md names every study and every claim id the studies can produce: the ids
written as literals in the studies' claim code (found by reading it, nothing is run) and rwf's
ablation claims (one per ablation in rwf.ABLATIONS)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from routemem.experiments import STUDIES

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "routemem" / "experiments"


def literal_claim_ids(path: Path) -> set[str]:
    """``{"id": "<literal>", ...}`` dicts, and literal arguments of any function's ``claim_id`` parameter."""
    tree = ast.parse(path.read_text())
    positions = {node.name: [a.arg for a in node.args.args].index("claim_id") for node in ast.walk(tree)
                 if isinstance(node, ast.FunctionDef) and "claim_id" in [a.arg for a in node.args.args]}
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            ids |= {v.value for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant) and k.value == "id"
                    and isinstance(v, ast.Constant) and isinstance(v.value, str)}
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in positions:
            position = positions[node.func.id]
            by_name = [k.value for k in node.keywords if k.arg == "claim_id"]
            arg = by_name[0] if by_name else (node.args[position] if len(node.args) > position else None)
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                ids.add(arg.value)
    return ids


def study_claim_ids(study: str) -> set[str]:
    module = study.replace("-", "_")
    return set().union(*(literal_claim_ids(p) for p in (EXPERIMENTS / module).glob("*.py")))


def test_every_study_has_a_section_and_its_commands():
    text = (ROOT / "REPRODUCIBILITY.md").read_text()
    sections = {part.split(":", 1)[0]: part for part in text.split("\n## ")[1:]}
    for study in STUDIES:
        assert study in sections, study
        full = [line for line in sections[study].splitlines() if line.startswith(f"routemem reproduce {study} ")]
        assert any("--quick" in line for line in full) and any("--quick" not in line for line in full), study
    assert "routemem reproduce all --quick --out results" in text


def test_every_claim_id_is_in_its_studys_section():
    from routemem.experiments.rwf import protocol as rwf
    from routemem.experiments.rwf import claims as rwf_claims

    text = (ROOT / "REPRODUCIBILITY.md").read_text()
    sections = {part.split(":", 1)[0]: part for part in text.split("\n## ")[1:]}
    for study in STUDIES:
        ids = study_claim_ids(study)
        if study == "rwf":
            ids |= {rwf_claims.ablation_claim([], rwf.arm_name(name))["id"] for name in rwf.ABLATIONS}
        assert len(ids) >= 2, (study, ids)  # the reading of the claim code found them
        missing = [claim_id for claim_id in sorted(ids) if f"| `{claim_id}` |" not in sections[study]]
        assert not missing, (study, missing)


def test_the_claim_code_reader_finds_literal_ids(tmp_path):
    source = tmp_path / "fake_claims.py"
    source.write_text('def c(runs, claim_id, x=1):\n    return {"id": claim_id}\n'
                      'def claims():\n'
                      '    return [c([], "first"), c([], claim_id="second"), {"id": "third"}, c([], x)]\n')
    assert literal_claim_ids(source) == {"first", "second", "third"}


def test_its_commands_parse():
    import shlex

    from routemem.cli import build_parser

    text = (ROOT / "REPRODUCIBILITY.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    commands = [line.split("#")[0] for block in blocks for line in block.splitlines() if line.startswith("routemem ")]
    assert len(commands) >= 2 * len(STUDIES)
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])
        assert args.study in (*STUDIES, "all"), command
