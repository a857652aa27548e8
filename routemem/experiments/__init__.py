"""One folder per paper's study, each a package whose ``run(out, quick, data_dir, device, jobs,
shard)`` is what ``routemem reproduce <study>`` calls; ``shared/`` holds what studies share and
``suite/`` runs them all. Studies import matplotlib and train models, so ``STUDIES`` loads a
study's package only when it is run; ``ABOUT`` is what ``routemem reproduce --help`` lists."""

from __future__ import annotations

import importlib
from typing import Callable


def _lazy(module: str) -> Callable:
    def run(**kwargs):
        return importlib.import_module(f"routemem.experiments.{module}").run(**kwargs)

    run.__name__ = f"run_{module}"
    return run


STUDIES: dict[str, Callable] = {"apn": _lazy("apn"), "palimpsa": _lazy("palimpsa"), "fast-slow": _lazy("fast_slow"),
                                 "absorption": _lazy("absorption"), "ocl-baselines": _lazy("ocl_baselines")}
STUDIES["rwf"] = _lazy("rwf")  # issue 14
ABOUT: dict[str, str] = {
    "absorption": "Routing absorption: learned vs random sparse-attention gates, zero gradient through hard top-k, "
                  "distilled gates, mask randomisation, attention concentration, APN's router",
    "apn": "Attractor Patch Networks: near-dense perplexity, less forgetting when adapted to a new domain",
    "fast-slow": "Fast-slow coupled attention: neutral at 500k tokens, cost near dense, a positive control, "
                 "the theorem numerically",
    "ocl-baselines": "Online class-incremental baselines on a small ViT (linear probe, fine-tuning, replay, L2P, "
                     "DualPrompt, CODA-Prompt): the reference table for RwF",
    "palimpsa": "Palimpsa (metaplastic attention) against GLA, Mamba2 and others on associative recall (MQAR)",
    "rwf": "Routing without Forgetting against the OCL baselines (glyphs, digits, few-shot, Si-Blurry), "
           "its ablations and retrieval diagnostics",
}
# the quick setting's wall time in seconds, one thread (the default), measured 2026-12-07 on the
# project's 2-core VM (Intel Xeon): on an idle machine, and beside one busy 2-thread process
# (README, "Threads, and a busy CPU"); ``routemem reproduce --help`` prints them
QUICK_SECONDS: dict[str, tuple[int, int]] = {
    "apn": (231, 253), "palimpsa": (276, 286), "fast-slow": (303, 347), "absorption": (155, 170),
    "ocl-baselines": (142, 156), "rwf": (141, 175),
}

