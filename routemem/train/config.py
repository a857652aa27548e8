"""RunConfig: the model, the data and the training recipe of one ``routemem train`` run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from routemem.models.config import LMConfig

PRECISIONS = ("auto", "bf16", "fp32")
# train.compile: off, torch.compile(model, fullgraph=True), or the same with mode="reduce-overhead"
# (CUDA graphs on a GPU; on a CPU it compiles as true does). Strings other than reduce-overhead are
# refused, "true" and "false" too: YAML and key=value overrides already give true/false as booleans.
COMPILE_MODES = (False, True, "reduce-overhead")


@dataclass
class DataConfig:
    corpus: str = "pydocs"  # a name from `routemem corpora`, or file:PATH
    tokenizer: str = "byte"  # byte | char (char's vocabulary is saved with the checkpoint)
    data_dir: str | None = None  # where file corpora live; default $ROUTEMEM_DATA
    cache_dir: str | None = None  # token-array cache; default $ROUTEMEM_CACHE or ~/.cache/routemem
    seq_len: int = 0  # training window; 0 means model.max_seq_len

    def __post_init__(self):
        if self.tokenizer not in ("byte", "char"):
            raise ValueError(f"tokenizer must be byte or char, got '{self.tokenizer}'")
        if self.seq_len < 0:
            raise ValueError(f"seq_len must be >= 0, got {self.seq_len}")


@dataclass
class TrainConfig:
    batch_size: int = 32  # sequences per optimizer step, summed over processes and micro-steps
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 1000  # the schedule's length
    stop_at: int = 0  # stop early at this step (0: run to max_steps); resume later with --resume
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    log_interval: int = 50
    eval_interval: int = 250  # also writes a checkpoint
    eval_tokens: int = 65536  # tokens of val scored at each eval; 0 means the whole split
    seed: int = 0
    precision: str = "auto"  # auto (bf16 autocast where the hardware supports it) | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    # false | true | reduce-overhead: train (and evaluate) through torch.compile(model, fullgraph=True);
    # the first step (and first eval) pays the compile: 15-35 s a model on a 2-core Xeon VM the first
    # time, a few seconds from torch's on-disk cache; checkpoints hold the plain model's weights
    compile: Any = False  # checked below, so that a wrong type gets the same message as a wrong value
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self):
        positive = ("batch_size", "grad_accum", "max_steps", "log_interval", "eval_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got '{self.precision}'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got '{self.device}'")
        if self.lr <= 0 or self.min_lr < 0:
            raise ValueError("lr must be > 0 and min_lr >= 0")
        if self.threads < 0:  # torch.set_num_threads would fail with a traceback
            raise ValueError(f"threads must be >= 1, or 0 for torch's default, got {self.threads}")
        if not self.grad_clip >= 0:  # also refuses nan
            raise ValueError(f"grad_clip must be >= 0 (0 turns clipping off), got {self.grad_clip}")
        if not (isinstance(self.compile, (bool, str)) and self.compile in COMPILE_MODES):  # 1 == True: not allowed
            raise ValueError(f"compile must be false, true or reduce-overhead, got {self.compile!r}")
        if not 0 <= self.stop_at <= self.max_steps:
            raise ValueError(f"stop_at must be between 1 and max_steps={self.max_steps} (or 0: run to "
                             f"max_steps), got {self.stop_at}")


@dataclass
class RunConfig:
    model: LMConfig = field(default_factory=LMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} is longer than model.max_seq_len={self.model.max_seq_len}"
            )

    @property
    def seq_len(self) -> int:
        return self.data.seq_len or self.model.max_seq_len
