"""One file per paper's experiment; each registers ``run(out, quick, data_dir)`` in STUDIES."""

from __future__ import annotations

from typing import Callable

STUDIES: dict[str, Callable] = {}
