"""The wheel holds what the checkout uses at run time: every kernel source and every shipped config.

Outside a source checkout the compiled CPU kernels are built from the ``.cpp`` files inside the
installed package, and ``--config charlm-quick`` reads ``routemem/configs/``; a file left out of
the wheel makes APN fall back silently or the command fail. The wheel is built from a copy of the
project, so a stale ``build/`` folder in the checkout can neither hide nor add a file.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = "routemem/ops/probe_op/probe_kernel.cpp"  # an op folder that does not exist in the project


def package_files(tree: Path, pattern: str) -> set[str]:
    return {p.relative_to(tree).as_posix() for p in (tree / "routemem").rglob(pattern)
            if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(the copied project tree, the names in the wheel built from it)."""
    pytest.importorskip("setuptools", minversion="64", reason="building the wheel offline needs setuptools >= 64")
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("not a source checkout: no pyproject.toml beside tests/")
    tree = tmp_path_factory.mktemp("project")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "routemem", tree / "routemem",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    # A kernel in a new op folder must ship without touching pyproject.toml: the rule is a glob.
    probe = tree / PROBE
    probe.parent.mkdir()
    (probe.parent / "__init__.py").write_text("")
    probe.write_text("// probe: a kernel source added later\n")
    dist = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(dist)],
                          cwd=tree, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    wheels = list(dist.glob("routemem-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as wheel:
        return tree, set(wheel.namelist())


def test_wheel_holds_every_kernel_source(built):
    tree, names = built
    sources = package_files(tree, "*.cpp")
    assert {"routemem/ops/apn/fused_kernel.cpp", "routemem/ops/metaplastic/fused_kernel.cpp", PROBE} <= sources
    assert sources - names == set(), f"kernel sources missing from the wheel: {sorted(sources - names)}"


def test_wheel_holds_every_shipped_config(built):
    tree, names = built
    configs = {p.relative_to(tree).as_posix() for p in (tree / "routemem" / "configs").glob("*.yaml")}
    assert "routemem/configs/charlm-quick.yaml" in configs
    assert configs - names == set(), f"shipped configs missing from the wheel: {sorted(configs - names)}"


def test_wheel_holds_every_module(built):
    tree, names = built
    modules = package_files(tree, "*.py")
    assert modules - names == set(), f"modules missing from the wheel: {sorted(modules - names)}"
