"""Benchmark suites for ``routemem bench <suite>``: each returns a JSON-able dict with a machine
header and ratios against a baseline measured in the same process."""

from __future__ import annotations

from typing import Callable

from routemem.bench import apn as _apn
from routemem.bench import palimpsa as _palimpsa
from routemem.bench import train as _train
from routemem.bench.common import machine_header, write_json

SUITES: dict[str, Callable[..., dict]] = {"train": _train.run, "palimpsa": _palimpsa.run, "apn": _apn.run}


def run_suite(name: str, quick: bool = False, out: str | None = None) -> dict:
    result = {"suite": name, "env": machine_header(), **SUITES[name](quick=quick)}
    if out:
        write_json(out, result)
    return result
