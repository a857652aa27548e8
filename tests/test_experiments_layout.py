"""The house of experiments/: one package per study, what they share below them in shared/, and no
study importing another (read from the source, so a new import is caught without running it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import routemem.experiments as experiments

ROOT = Path(experiments.__file__).parent
STUDY_PACKAGES = sorted(name.replace("-", "_") for name in experiments.STUDIES)
BELOW_STUDIES = "shared"  # owned by no study
ABOVE_STUDIES = "suite"  # reaches studies only through experiments.STUDIES


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, absolute names (relative imports resolved against the package)."""
    package = ".".join(("routemem", "experiments", *path.relative_to(ROOT).parent.parts))
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return found


def experiments_package_of(module: str) -> str | None:
    """``routemem.experiments.apn.claims`` -> ``apn``; None outside experiments/."""
    parts = module.split(".")
    return parts[2] if parts[:2] == ["routemem", "experiments"] and len(parts) > 2 else None


def test_every_study_is_a_package_with_a_run():
    for name in STUDY_PACKAGES:
        assert (ROOT / name / "__init__.py").is_file(), f"experiments/{name}/ is not a package"
        assert (ROOT / name / "protocol.py").is_file() and (ROOT / name / "claims.py").is_file()
        assert (ROOT / name / "report.py").is_file()
    # nothing but the lazy registry at the top: every other module lives in a folder
    assert sorted(p.name for p in ROOT.glob("*.py")) == ["__init__.py"]


@pytest.mark.parametrize("study", STUDY_PACKAGES)
def test_no_study_imports_another(study):
    for path in sorted((ROOT / study).rglob("*.py")):
        for module in imported_modules(path):
            owner = experiments_package_of(module)
            assert owner in (None, study, BELOW_STUDIES), \
                f"{path.relative_to(ROOT)} imports {module}: studies share only through experiments/{BELOW_STUDIES}/"


def test_shared_imports_no_study_and_suite_goes_through_the_registry():
    for path in sorted((ROOT / BELOW_STUDIES).rglob("*.py")):
        for module in imported_modules(path):
            assert experiments_package_of(module) in (None, BELOW_STUDIES), f"shared/{path.name} imports {module}"
    for path in sorted((ROOT / ABOVE_STUDIES).rglob("*.py")):
        for module in imported_modules(path):
            assert experiments_package_of(module) in (None, BELOW_STUDIES, ABOVE_STUDIES), \
                f"suite/{path.name} imports {module}: it reaches studies through experiments.STUDIES"


def test_the_rule_catches_a_cross_study_import(tmp_path, monkeypatch):
    """The checker itself: a file that imports another study is seen, in each import form."""
    for source in ("from routemem.experiments.apn import claims\n", "import routemem.experiments.apn.protocol\n",
                   "from routemem.experiments import apn\n", "from ..apn import protocol\n"):
        fake = ROOT / "absorption" / "fake.py"
        monkeypatch.setattr(Path, "read_text", lambda self, *a, _s=source, **k: _s)
        owners = {experiments_package_of(m) for m in imported_modules(fake)}
        assert "apn" in owners, source


def test_every_study_states_its_quick_time():
    """``reproduce --help`` prints each study's measured quick time: a new study records its own."""
    assert set(experiments.QUICK_SECONDS) == set(experiments.STUDIES)
