"""DDP: two CPU processes (gloo) under torchrun give the weights of one process with the same
global batch, and a DDP run resumes from its checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from routemem.cli import main
from routemem.train import load_model

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["data.corpus=pydocs", "model.n_layer=2", "model.d_model=32", "model.n_head=2",
        "model.max_seq_len=32", "train.batch_size=8", "train.max_steps=6", "train.warmup_steps=2",
        "train.eval_interval=3", "train.eval_tokens=256", "train.log_interval=1",
        "train.progress=false", "train.precision=fp32", "train.grad_clip=0.5"]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "routemem", "train", "--out", str(out), *ARGS, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_model(a)[0].state_dict(), load_model(b)[0].state_dict()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_two_processes_match_one_and_resume(tmp_path):
    assert main(["train", "--out", str(tmp_path / "single"), *ARGS]) == 0

    torchrun(tmp_path / "ddp")
    assert_same_weights(tmp_path / "single", tmp_path / "ddp")
    # rank 0 alone writes: one record per step, not two
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert sum('"kind": "train"' in line for line in lines) == 6

    torchrun(tmp_path / "split", "train.stop_at=3")
    torchrun(tmp_path / "split", "--resume")
    assert_same_weights(tmp_path / "single", tmp_path / "split")
