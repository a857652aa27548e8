"""What ``--resume`` may change: a resumed run must stay the run its checkpoint belongs to.

A run is its model, its data and its optimisation recipe (learning-rate schedule, batch, seed,
optimizer settings): change any of those and the result is neither the old run nor a clean new
one, so ``--resume`` refuses it and names the key. What may change is where and how the same
computation runs and what gets logged on the way, listed in ``RESUME_SAFE_KEYS``:

- ``train.stop_at``: where this invocation stops (the schedule is set by ``train.max_steps``).
- ``train.log_interval``, ``train.eval_interval``, ``train.eval_tokens``: how often and how much
  is measured and checkpointed; batches are a function of (seed, step), so the weights do not change.
- ``train.progress``, ``train.tensorboard``: what is shown and logged.
- ``train.device``, ``train.precision``, ``train.threads``, ``train.grad_accum``, ``train.compile``:
  the hardware and how the same global batch is computed on it (equal up to rounding).
- ``data.data_dir``, ``data.cache_dir``: where the same corpus and its token cache live (the
  corpus's sha256 is checked separately, so a different file under the same name is refused).

``train.max_steps`` is not safe: it sets the cosine schedule. To train longer, start a new run
from the checkpoint: ``routemem train --resume-from OLD --out NEW train.max_steps=...``.
"""

from __future__ import annotations

from typing import Any

from routemem.errors import CheckpointError

RESUME_SAFE_KEYS = frozenset({
    "train.stop_at", "train.log_interval", "train.eval_interval", "train.eval_tokens",
    "train.progress", "train.tensorboard",
    "train.device", "train.precision", "train.threads", "train.grad_accum", "train.compile",
    "data.data_dir", "data.cache_dir",
})


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_keys(saved: dict, current: dict, sections: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint value, config value) for every key of ``sections`` that differs. Keys the
    checkpoint lacks are skipped: it was written before they existed, under their defaults."""
    old = _flatten({s: saved.get(s, {}) for s in sections})
    new = _flatten({s: current.get(s, {}) for s in sections})
    return [(key, old[key], new.get(key)) for key in sorted(old) if old[key] != new.get(key)]


def check_resume_config(saved: dict, current: dict, run_dir) -> None:
    """Refuse a resume whose data or training recipe differs from the checkpoint's (model keys are
    checked where the weights are loaded, as "another architecture")."""
    for key, old, new in changed_keys(saved, current, ("data", "train")):
        if key in RESUME_SAFE_KEYS:
            continue
        hint = ("; to train longer, start a new run from it with --resume-from and a new --out"
                if key == "train.max_steps" else "")
        raise CheckpointError(
            f"cannot resume {run_dir} with {key}={new!r}: the run was trained with {key}={old!r}, and "
            f"--resume only changes {', '.join(sorted(RESUME_SAFE_KEYS))}{hint}")


def check_same_corpus(saved_sha256: str | None, corpus, run_dir) -> None:
    if saved_sha256 is not None and saved_sha256 != corpus.sha256:
        raise CheckpointError(
            f"cannot resume {run_dir}: corpus '{corpus.name}' is not the text the run was trained on "
            f"(sha256 {corpus.sha256[:12]}..., the checkpoint has {saved_sha256[:12]}...)")
