"""A unit of work that reports where it ran (imported by name in the spawned workers of
test_reproduce_cli.py, so it must live in a module, not in the test)."""

import os

import torch


def where_am_i(tag: str) -> dict:
    return {"tag": tag, "pid": os.getpid(), "threads": torch.get_num_threads(),
            "step_bars": os.environ.get("ROUTEMEM_STEP_BARS")}
