"""Fake studies and synthetic results for the ``routemem reproduce all`` tests: tiny, instant, and
shaped like the real ones (results.json with env, data hashes, claims; a PNG plot)."""

from __future__ import annotations

import json
import struct
import sys
import types
import zlib
from dataclasses import dataclass
from pathlib import Path

from routemem.experiments.suite import run as suite


def tiny_png(width: int = 24, height: int = 16, rgb: tuple[int, int, int] = (30, 120, 200)) -> bytes:
    """A valid PNG of one colour (no matplotlib: the tests stay fast)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


ENV = {"routemem": "0.1.0", "git_commit": "abc1234def", "device": "cpu", "cpu": "Fake CPU 9000", "gpu": None,
       "threads": 2, "torch": "2.13.0+cpu", "cuda": None, "python": "3.11.7"}


def fake_results(name: str, claims: list[dict] | None = None, mode: str = "quick") -> dict:
    return {"study": name, "mode": mode, "env": ENV, "execution": {"jobs": 2, "trained_on": []},
            "data": {"train": "corpus-a", "sha256": {"corpus-a": f"{name}-sha-aaaa", "corpus-b": f"{name}-sha-bbbb"}},
            "claims": claims if claims is not None else [
                {"id": f"{name.replace('-', '_')}_claim", "statement": f"{name} beats the baseline",
                 "paper": {"ours": 4.57, "baseline": 4.32},
                 "measured": {"ours": {"mean": 5.35, "std": 0.11, "n": 3},
                              "baseline": {"mean": 5.36, "std": 0.02, "n": 3}},
                 "verdict": "reproduced", "why": f"{name}: intervals disjoint"}],
            "runs": []}


@dataclass
class Setting:
    """A fake study's setting; QUICK and FULL below, as every real study module has."""

    steps: int = 10
    seeds: tuple = (0, 1)


class FakeStudies:
    """Fake studies called as ``STUDIES[name](**kwargs)``: each call is counted and its kwargs
    kept; a study named in ``failing`` raises; each gets a module with QUICK / FULL settings
    (``with_setting=False`` leaves one without)."""

    def __init__(self, monkeypatch, names: list[str], expected: list[str] | None = None,
                 failing: dict[str, Exception] | None = None, without_setting: tuple[str, ...] = ()):
        self.calls: dict[str, int] = {name: 0 for name in names}
        self.kwargs: dict[str, list[dict]] = {name: [] for name in names}
        self.failing = dict(failing or {})
        self.modules: dict[str, types.ModuleType] = {}
        studies = {name: self._study(name) for name in names}
        monkeypatch.setattr("routemem.experiments.STUDIES", studies)
        monkeypatch.setattr(suite, "EXPECTED", tuple(expected if expected is not None else names))
        for name in names:
            module = types.ModuleType(f"routemem.experiments.{name.replace('-', '_')}")
            if name not in without_setting:
                module.QUICK, module.FULL = Setting(steps=10), Setting(steps=1000)
            monkeypatch.setitem(sys.modules, module.__name__, module)
            self.modules[name] = module

    def _study(self, name: str):
        def run(**kwargs):
            self.calls[name] += 1
            self.kwargs[name].append(kwargs)
            if name in self.failing:
                raise self.failing[name]
            study_dir = Path(kwargs["out"]) / name
            study_dir.mkdir(parents=True, exist_ok=True)
            results = fake_results(name, mode="quick" if kwargs["quick"] else "full")
            (study_dir / "results.json").write_text(json.dumps(results))
            (study_dir / "report.md").write_text(f"# {name}\n")
            (study_dir / "curve.png").write_bytes(tiny_png())
            return results

        return run
