"""Run logging: one JSON object per line in ``metrics.jsonl``, optionally TensorBoard too."""

from __future__ import annotations

import json
from pathlib import Path

from routemem.errors import ConfigError
from routemem.fileio import write_text_atomic


def require_tensorboard():
    """TensorBoard's SummaryWriter, or a ConfigError if the optional package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.tensorboard=true needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter


class MetricsLogger:
    """Appends records to ``run_dir/metrics.jsonl``; a no-op on ranks other than 0."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = False):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            self.tb = require_tensorboard()(str(Path(run_dir) / "tb"))

    def truncate_after(self, step: int, keep_evals_at_step: bool = True) -> None:
        """On resume, drop records a crashed run wrote after its last checkpoint (and, unless
        ``keep_evals_at_step``, the val/test records at ``step`` itself, which are about to be redone)."""
        if not (self.enabled and self.path.exists()):
            return

        def kept(record: dict) -> bool:
            at = record.get("step", 0)
            if at == step and not keep_evals_at_step:
                return record.get("kind") == "train"
            return at <= step

        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records() if kept(r)))

    def records(self) -> list[dict]:
        """Every record written so far (none when this process does not log)."""
        if not (self.enabled and self.path.exists()):
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def restart(self) -> None:
        """A new run in this folder: forget the records of an earlier attempt that never checkpointed."""
        if self.enabled and self.path.exists():
            write_text_atomic(self.path, "")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = record.get("kind", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "kind"):
                    self.tb.add_scalar(f"{prefix}/{key}", value, record.get("step", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
