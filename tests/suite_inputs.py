"""A synthetic output folder of ``routemem reproduce all`` (suite.json, results.json per study,
plots) with claims of every shape the studies produce, for the REPORT.md and report.html tests."""

from __future__ import annotations

import json
from pathlib import Path

from suite_fakes import ENV, fake_results, tiny_png

GPU_ENV = {**ENV, "device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "cuda": "13.0", "torch": "2.11.0+cu130",
           "git_commit": "ccf1510aaa"}

ALPHA_CLAIMS = [
    {"id": "base_ppl_gap", "statement": "APN is nearly as good as dense | within 10%",
     "paper": {"ours": 4.57, "baseline": 4.32, "ratio": 1.0579},
     "measured": {"ours": {"mean": 5.35, "std": 0.11, "n": 3}, "baseline": {"mean": 5.36, "std": 0.02, "n": 3},
                  "ratio": {"mean": 0.998, "std": 0.021, "n": 3}},
     "verdict": "reproduced", "why": "ratio 0.998 within 10%"},
    {"id": "odd_shapes", "description": "a claim whose measured value is a list of mixed things",
     "paper": {"ours": "exactly 0 (a property)"},
     "measured": [1.5, {"a": None, "b": float("nan")}, "text", list(range(10))],
     "verdict": "not reproduced", "why": "the opposite <b>direction</b>"},
    {"id": "pairs_only", "statement": "RwF beats L2P", "paper": {"ours": "beats all prompt methods"},
     "pairs": [{"baseline": "l2p", "metric": "a_auc", "verdict": "inconclusive", "why": "nested why",
                "ours": {"mean": 0.41, "std": 0.05, "n": 2}, "baseline_stats": {"mean": 0.4, "std": 0.06, "n": 2}}],
     "verdict": "inconclusive", "why": "0 of 1 pairs reproduced"},
    {"id": "bare_number", "statement": "A scalar measurement", "measured": 0.125, "chance": 0.0625,
     "verdict": "reproduced (by a hair)", "why": "a verdict string kept verbatim"},
]


def synthetic_suite(out: Path) -> Path:
    """alpha (complete, 4 claims, 2 plots, CPU), gpu-study (complete, on an H100), beta (failed),
    gamma (missing), delta (complete, but its results.json is gone)."""
    out.mkdir(parents=True, exist_ok=True)

    def study(name: str, results: dict | None, plots: tuple[str, ...] = ()) -> None:
        folder = out / name
        folder.mkdir(exist_ok=True)
        if results is not None:
            (folder / "results.json").write_text(json.dumps(results))
            (folder / "report.md").write_text(f"# {name}\n")
        for i, plot in enumerate(plots):
            (folder / plot).write_bytes(tiny_png(20 + i, 10, (200, 40 * i, 10)))

    alpha = fake_results("alpha", ALPHA_CLAIMS)
    alpha["runs_reused"] = 17
    alpha["data"] = {"train": "shakespeare", "shift": "warandpeace",
                     "sha256": {"shakespeare": "86c4e6aa", "warandpeace": "cea8ccb6"}}
    study("alpha", alpha, ("curves.png", "tradeoff.png"))
    gpu = fake_results("gpu-study")
    gpu["env"], gpu["data"] = GPU_ENV, {"train": "mqar (synthetic)"}
    study("gpu-study", gpu, ("ppl.png",))
    study("beta", None)
    entry = {"mode": "quick", "fingerprint": "f00d", "status": "complete", "started": "2026-11-27T10:00:00+00:00",
             "finished": "2026-11-27T10:02:18+00:00"}
    studies = {
        "alpha": {**entry, "results": "alpha/results.json", "seconds": 138.2,
                  "command": f"routemem reproduce alpha --quick --out {out} --device auto --jobs 2"},
        "gpu-study": {**entry, "results": "gpu-study/results.json", "seconds": 3725.0,
                      "command": f"routemem reproduce gpu-study --quick --out {out} --device cuda --jobs 1"},
        "beta": {**entry, "status": "failed", "results": "beta/results.json", "seconds": 4.0,
                 "command": f"routemem reproduce beta --quick --out {out} --device auto --jobs 2",
                 "error": {"type": "DataError", "message": "corpus 'x' not found",
                           "traceback": ["Traceback (most recent call last):", "  File \"beta.py\", line 3",
                                         "DataError: corpus 'x' not found"]}},
        "gamma": {"status": "missing", "mode": "quick"},
        "delta": {**entry, "results": "delta/results.json", "seconds": 1.0, "command": "routemem reproduce delta"},
    }
    manifest = {"order": ["alpha", "gpu-study", "beta", "gamma", "delta"], "mode": "quick",
                "command": f"routemem reproduce all --quick --out {out} --device auto --jobs 2",
                "updated": "2026-11-27T11:00:00+00:00", "studies": studies,
                "invocation": {"started": "2026-11-27T10:00:00+00:00", "ran": ["alpha", "beta"],
                               "reused": ["gpu-study", "delta"], "seconds": 150.0}}
    (out / "suite.json").write_text(json.dumps(manifest))
    return out
