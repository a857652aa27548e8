"""Where a run happened: the device a user asked for, and the provenance every result records.

``resolve_device`` turns ``auto | cpu | cuda`` into a ``torch.device`` (a one-line ``UserError`` when
CUDA is asked for and absent). ``machine_header`` is the header that results.json, bench JSON and
final.json share: device, CPU model, GPU name, torch and CUDA versions, and the code's git commit.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

import torch

import routemem
from routemem.errors import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` is cuda when a GPU is visible, else cpu."""
    if isinstance(name, torch.device):
        return name
    if name not in DEVICE_CHOICES:
        raise UserError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got '{name}'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but torch sees no CUDA GPU "
                        f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    return torch.device(name)


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux; ``platform`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the routemem source tree in use, with ``+dirty`` when it has uncommitted changes;
    None for an installed wheel (no git checkout around the package). ``$ROUTEMEM_GIT_COMMIT``, when
    set, wins: a tree copied to another machine may carry a stale .git, or none."""
    if os.environ.get("ROUTEMEM_GIT_COMMIT"):
        return os.environ["ROUTEMEM_GIT_COMMIT"]
    root = Path(routemem.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def machine_header(device: torch.device | str | None = None) -> dict:
    """What every results file records about where it was measured."""
    device = torch.device(device) if device is not None else resolve_device("auto")
    gpu = None
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    return {
        "routemem": routemem.__version__,
        "git_commit": git_commit(),
        "device": device.type,
        "cpu": cpu_model(),
        "gpu": gpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
