"""Training stack: config, optimizer and schedule, checkpoints, evaluation, logging, DDP."""

from routemem.train.config import DataConfig, RunConfig, TrainConfig
from routemem.train.evaluate import evaluate
from routemem.train.trainer import Trainer, load_model

__all__ = ["DataConfig", "RunConfig", "TrainConfig", "Trainer", "evaluate", "load_model"]
