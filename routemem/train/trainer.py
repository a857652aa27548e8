"""The training loop: data -> model -> AdamW, with evals, checkpoints, logs and DDP.

One ``Trainer`` is one run directory:
    OUT/config.yaml      the resolved run config
    OUT/metrics.jsonl    one JSON object per log / eval record
    OUT/ckpt/            the latest checkpoint (see checkpoint.py)
    OUT/final.json       val and test metrics at the end, wall time, tokens/s, machine and commit
    OUT/loss.png         train and val loss against tokens seen (written at the end)
A folder holds a run once it has a checkpoint: a fresh start refuses it (``--resume`` continues
it), while a folder whose run stopped before its first checkpoint (a diverged or killed start) is
simply started over.
Batches are a pure function of (seed, step), so resuming at step s sees exactly the windows a
straight run would: with the optimizer and RNG state restored, 30 + resume + 30 steps equal 60.

``train.compile`` (true | reduce-overhead) runs the train steps and the evals through
``torch.compile(model, fullgraph=True)`` (``compile_model``); ``self.model`` stays the plain module,
so checkpoints, ``load_model`` and the layer metrics never see the compiled wrapper. Under DDP the
compiled model is what DistributedDataParallel wraps. The same run compiled or not gives the same
losses up to float rounding, so ``--resume`` may change train.compile, as it may change
train.device or train.threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

from routemem.config import from_dict, to_dict
from routemem.data import WindowSampler, build_tokenizer, load_corpus, load_splits, tokenizer_from_dict
from routemem.data.corpora import check_data_dir
from routemem.errors import CheckpointError, DataError, TrainingDiverged, UserError
from routemem.fileio import check_output_path, write_text_atomic
from routemem.machine import machine_header
from routemem.models import LMConfig, TransformerLM
from routemem.train import checkpoint as ckpt_io
from routemem.train import distributed as dist_utils
from routemem.train.config import RunConfig
from routemem.train.evaluate import autocast_context, evaluate
from routemem.train.logger import MetricsLogger, require_tensorboard
from routemem.train.optim import lr_at, make_optimizer
from routemem.train.plot import plot_loss
from routemem.train.resume import check_resume_config, check_same_corpus


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:  # CPUs with AVX512-BF16 / AMX run bf16 matmuls natively; elsewhere autocast is slower
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def compile_model(model: torch.nn.Module, setting: bool | str) -> torch.nn.Module:
    """``model`` as ``train.compile`` asks: itself (false), ``torch.compile(model, fullgraph=True)``
    (true), or that with ``mode="reduce-overhead"`` (CUDA graphs on a GPU). Compiling happens at the
    first call (seconds to a minute, docs/benchmarks.md); a graph break there is an error, not a silent
    fallback to eager. The wrapper shares the model's parameters: train it, save ``model``."""
    if setting is False:
        return model
    return torch.compile(model, fullgraph=True, mode="reduce-overhead" if setting == "reduce-overhead" else None)


def check_out_dir(out_dir: str | Path) -> Path:
    """``--out`` must be a folder, or a path where one can be made, that this user can write in:
    checked before the corpus is read or a step is taken."""
    return check_output_path(out_dir, "--out", folder=True)


def _first_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            found = _first_difference(va, vb, f"{prefix}{key}.")
            if found:
                return found
        elif va != vb:
            return f"{prefix}{key}: checkpoint has {va!r}, config has {vb!r}"
    return None


class Trainer:
    def __init__(self, config: RunConfig, out_dir: str | Path, resume: str | Path | None = None):
        self.cfg = config
        self.out_dir = check_out_dir(out_dir)
        tcfg = config.train
        check_data_dir(config.data.data_dir, "data.data_dir")
        if tcfg.threads:
            torch.set_num_threads(tcfg.threads)
        self.device = dist_utils.pick_device(tcfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist = dist_utils.setup(self.device)
        self.bf16 = tcfg.precision == "bf16" or (tcfg.precision == "auto" and bf16_supported(self.device))
        per_step = self.dist.world_size * tcfg.grad_accum
        if tcfg.batch_size % per_step:
            raise UserError(f"train.batch_size={tcfg.batch_size} is not divisible by "
                            f"world_size * grad_accum = {per_step}")

        checkpoint = self._find_checkpoint(resume)
        if checkpoint is not None:
            self._check_steps_left(int(checkpoint["state"]["step"]), resume)
        if resume is True:  # the same run, continued: only schedule-neutral keys may change
            check_resume_config(checkpoint["config"], to_dict(config), self.out_dir)
        self.corpus = load_corpus(config.data.corpus, config.data.data_dir)
        if resume is True:
            check_same_corpus(checkpoint["state"].get("corpus_sha256"), self.corpus, self.out_dir)
        if checkpoint is not None:
            self.tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])
        else:
            self.tokenizer = build_tokenizer(config.data.tokenizer, self.corpus.text)
        self.splits = load_splits(self.corpus, self.tokenizer, config.data.cache_dir)
        for split in ("val", "test"):
            if len(self.splits[split]) < 2:
                raise DataError(f"corpus '{config.data.corpus}' is too short: its {split} split has "
                                f"{len(self.splits[split])} tokens (the split is 90/5/5)")
        self.sampler = WindowSampler(self.splits["train"], config.seq_len, tcfg.seed,
                                     name=f"corpus '{config.data.corpus}' split 'train'")

        # The vocabulary comes from the tokenizer, whatever the YAML said.
        self.model_config = dataclasses.replace(config.model, vocab_size=self.tokenizer.vocab_size)
        self.cfg = dataclasses.replace(config, model=self.model_config)
        torch.manual_seed(tcfg.seed)
        self.model = TransformerLM(self.model_config).to(self.device)
        self.optimizer = make_optimizer(self.model, tcfg)
        self.step, self.tokens_seen = 0, 0
        self.lr, self.grad_norm = tcfg.lr, None  # of the last step, for logging
        self.last_val_loss = None  # shown in the progress bar
        # Seconds of the whole run (evals included) and of its optimizer steps alone, and the tokens
        # those steps trained on; saved in checkpoints, so a resumed run reports its total.
        self.wall_time_s, self.train_time_s, self.timed_tokens = 0.0, 0.0, 0
        self._fit_start, self._postfix = None, {}
        # Taken now, so final.json names the code this run started with, even if the checkout moves on.
        self.machine = machine_header(self.device) if self.dist.is_main else {}
        if checkpoint is not None:
            self._restore(checkpoint)
        # what train steps and evals call: the model, compiled when train.compile asks; under DDP the
        # compiled model is what DistributedDataParallel wraps (torch.compile of the DDP module
        # itself breaks the graph at DDP's reducer, which fullgraph=True refuses)
        self.eval_model = compile_model(self.model, tcfg.compile)
        self.ddp_model = self.eval_model
        if self.dist.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.eval_model, device_ids=device_ids)
        if tcfg.tensorboard:
            require_tensorboard()
        if self.dist.is_main:  # everything checked: only now does the run directory appear
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.out_dir / "config.yaml", yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        self.logger = MetricsLogger(self.out_dir, enabled=self.dist.is_main, tensorboard=tcfg.tensorboard)
        if resume is True:
            # A finished run's final val/test records are written again when it is resumed.
            self.logger.truncate_after(self.step, keep_evals_at_step=self.step < tcfg.max_steps)
        else:  # a new run in this folder: records of an attempt that never checkpointed go
            self.logger.restart()

    # -- set-up helpers -------------------------------------------------------------------------
    def _find_checkpoint(self, resume) -> dict | None:
        """``resume``: None (a fresh run), True (continue the run in out_dir) or another run's
        checkpoint to continue from into out_dir. A fresh start never overwrites a run."""
        own = self.out_dir / ckpt_io.CKPT_DIRNAME
        if resume is True:
            if not own.exists():
                raise CheckpointError(
                    f"no checkpoint found to resume in {self.out_dir} ({own / 'manifest.json'} does not "
                    "exist); start it afresh without --resume")
            return ckpt_io.read_checkpoint(own)
        if own.exists() or (self.out_dir / "final.json").exists():
            hint = "pass --resume to continue it" if resume is None else "--resume-from needs a new --out"
            raise UserError(f"{self.out_dir} already holds a run; {hint} or choose another --out")
        return None if resume is None else ckpt_io.read_checkpoint(resume)

    def _check_steps_left(self, step: int, resume) -> None:
        """Refuse, before anything is written, a continuation that would not take a single step: it
        would leave a folder without a checkpoint, reporting the source run's numbers as its own.
        (``--resume`` cannot change max_steps; resuming a finished run redoes its final evals.)"""
        tcfg = self.cfg.train
        if resume is not True and tcfg.max_steps <= step:
            raise UserError(f"--resume-from {resume}: its checkpoint is at step {step} and train.max_steps="
                            f"{tcfg.max_steps}, so there is nothing left to train; give train.max_steps "
                            f"larger than {step}")
        if 0 < tcfg.stop_at <= step < tcfg.max_steps:
            raise UserError(f"train.stop_at={tcfg.stop_at} is not after the checkpoint's step {step}, so "
                            f"there is nothing to train; give a later stop_at or leave it out")

    def _restore(self, checkpoint: dict) -> None:
        saved = checkpoint["config"].get("model", {})
        diff = _first_difference(saved, to_dict(self.model_config))
        if diff is not None:
            raise CheckpointError(f"cannot resume from {checkpoint['dir']}: another architecture (model.{diff})")
        ckpt_io.load_model_weights(self.model, checkpoint)
        ckpt_io.load_training_state(self.optimizer, checkpoint)
        self.step = int(checkpoint["state"]["step"])
        self.tokens_seen = int(checkpoint["state"]["tokens_seen"])
        self.wall_time_s = float(checkpoint["state"].get("wall_time_s", 0.0))
        self.train_time_s = float(checkpoint["state"].get("train_time_s", 0.0))
        self.timed_tokens = int(checkpoint["state"].get("timed_tokens", 0))

    def save(self) -> None:
        if self.dist.is_main:
            ckpt_io.save_checkpoint(
                self.out_dir, model=self.model, optimizer=self.optimizer, config=to_dict(self.cfg),
                tokenizer=self.tokenizer.to_dict(), step=self.step, tokens_seen=self.tokens_seen,
                extra={"corpus_sha256": self.corpus.sha256, "wall_time_s": self._wall_time(),
                       "train_time_s": self.train_time_s, "timed_tokens": self.timed_tokens},
            )
        if self.dist.enabled:
            torch.distributed.barrier()

    # -- the loop -------------------------------------------------------------------------------
    def train_step(self) -> float:
        """One optimizer step (all micro-steps); returns the mean loss over the global batch."""
        tcfg = self.cfg.train
        lr = lr_at(self.step, tcfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(tcfg.grad_accum):
            x, y = self.sampler.get_batch(self.step, tcfg.batch_size, rank=self.dist.rank,
                                          world_size=self.dist.world_size, micro=micro, n_micro=tcfg.grad_accum)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = micro == tcfg.grad_accum - 1
            sync = self.ddp_model.no_sync() if (self.dist.enabled and not last) else contextlib.nullcontext()
            with sync:
                with autocast_context(self.device, self.bf16):
                    _, loss = self.ddp_model(x, y)
                (loss / tcfg.grad_accum).backward()
            loss_sum += loss.detach()
        mean_loss = dist_utils.all_reduce_mean(loss_sum / tcfg.grad_accum, self.dist).item()
        if not math.isfinite(mean_loss):
            self.optimizer.zero_grad(set_to_none=True)
            # Steps count from 1 as in metrics.jsonl: this was step self.step + 1 (self.step are done).
            ckpt_dir = self.out_dir / ckpt_io.CKPT_DIRNAME
            kept = (f"the last good checkpoint is kept in {ckpt_dir}" if ckpt_dir.exists() else
                    "no checkpoint was written yet, so the same command starts it afresh")
            raise TrainingDiverged(f"loss is {mean_loss} at step {self.step + 1}; stopped: {kept}")
        if tcfg.grad_clip > 0:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tcfg.grad_clip)
        else:
            self.grad_norm = None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += tcfg.batch_size * self.cfg.seq_len
        self.lr = lr
        return mean_loss

    def evaluate(self, split: str, max_tokens: int | None = None) -> dict:
        return evaluate(self.eval_model, self.splits[split], seq_len=self.cfg.seq_len,
                        batch_size=max(1, self.cfg.train.batch_size // self.cfg.train.grad_accum),
                        tokenizer=self.tokenizer, max_tokens=max_tokens, device=self.device,
                        bf16=self.bf16, name=f"corpus '{self.cfg.data.corpus}' split '{split}'")

    def _log_eval(self, split: str, max_tokens: int | None) -> dict:
        metrics = self.evaluate(split, max_tokens)
        # "tokens" is the run's position (tokens trained on), as in train records; the split's
        # scored tokens go under their own name instead of overwriting it.
        self.logger.log({"kind": split, "step": self.step, **metrics, "tokens": self.tokens_seen,
                         "tokens_scored": metrics["tokens"]})
        return metrics

    def _wall_time(self) -> float:
        return self.wall_time_s + (time.perf_counter() - self._fit_start if self._fit_start else 0.0)

    def fit(self) -> dict:
        """Train to ``max_steps`` (or ``stop_at``), evaluating and checkpointing on the way.

        Returns step, tokens, wall_time_s, tokens_per_s and, once ``max_steps`` is reached, the
        val and test metrics (also in final.json, with the machine header; loss.png beside it)."""
        tcfg = self.cfg.train
        self._fit_start = time.perf_counter()
        end = min(tcfg.max_steps, tcfg.stop_at) if tcfg.stop_at else tcfg.max_steps
        progress = None
        if tcfg.progress and self.dist.is_main:
            from tqdm import tqdm

            progress = tqdm(total=end, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        self.model.train()
        window_start, window_tokens, window_loss, window_steps = time.perf_counter(), 0, 0.0, 0
        try:
            while self.step < end:
                step_start = time.perf_counter()
                loss = self.train_step()
                self.train_time_s += time.perf_counter() - step_start
                self.timed_tokens += tcfg.batch_size * self.cfg.seq_len
                window_tokens += tcfg.batch_size * self.cfg.seq_len
                window_loss += loss
                window_steps += 1
                if progress is not None:
                    progress.update(1)
                if self.step % tcfg.log_interval == 0 or self.step == end:
                    elapsed = time.perf_counter() - window_start
                    record = {"kind": "train", "step": self.step, "tokens": self.tokens_seen,
                              "loss": window_loss / window_steps, "lr": self.lr,
                              "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
                    if self.grad_norm is not None:
                        record["grad_norm"] = float(self.grad_norm)
                    record.update(self.model.layer_metrics())
                    self.logger.log(record)
                    if progress is not None:
                        self._show_progress(progress, record)
                    window_start, window_tokens, window_loss, window_steps = time.perf_counter(), 0, 0.0, 0
                if self.step == tcfg.max_steps:
                    self.save()  # the full val and test evals below are this step's only evals
                elif self.step % tcfg.eval_interval == 0 or self.step == end:
                    self.last_val_loss = self._log_eval("val", tcfg.eval_tokens or None)["loss"]
                    if progress is not None:
                        self._show_progress(progress, None)
                    self.save()
        finally:
            if progress is not None:
                progress.close()
        result = {"step": self.step, "tokens": self.tokens_seen}
        if self.step >= tcfg.max_steps:
            result["val"] = self._log_eval("val", None)
            result["test"] = self._log_eval("test", None)
        result["wall_time_s"] = self._wall_time()
        result["tokens_per_s"] = self.timed_tokens / self.train_time_s if self.train_time_s else 0.0
        if self.step >= tcfg.max_steps and self.dist.is_main:
            self._write_final(result)
        self.wall_time_s, self._fit_start = self._wall_time(), None
        return result

    def _show_progress(self, progress, record: dict | None) -> None:
        """Train loss and tokens/s of the last log window, with the latest val loss beside them."""
        if record is not None:
            self._postfix = {"loss": f"{record['loss']:.3f}", "tok_s": f"{record['tokens_per_s']:.0f}"}
        postfix = dict(self._postfix)
        if self.last_val_loss is not None:
            postfix["val"] = f"{self.last_val_loss:.3f}"
        progress.set_postfix(postfix)

    def _write_final(self, result: dict) -> None:
        header = self.machine
        write_text_atomic(self.out_dir / "final.json", json.dumps(
            {**result, "corpus": self.corpus.name, "corpus_sha256": self.corpus.sha256,
             "num_params": self.model.num_params(),
             "num_params_non_embedding": self.model.num_params(include_embeddings=False),
             "compile": self.cfg.train.compile, "git_commit": header["git_commit"], "machine": header},
            indent=2))
        plot_loss(self.logger.records(), self.out_dir / "loss.png",
                  title=f"{self.corpus.name}: {self.model.num_params():,} parameters")

    def close(self) -> None:
        self.logger.close()
        dist_utils.teardown(self.dist)


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer, run config dict) from a run directory or its ``ckpt/``."""
    checkpoint = ckpt_io.read_checkpoint(path)
    model_config = from_dict(LMConfig, checkpoint["config"].get("model", {}), prefix="model.")
    model = TransformerLM(model_config)
    ckpt_io.load_model_weights(model, checkpoint)
    return model.to(device).eval(), tokenizer_from_dict(checkpoint["tokenizer"]), checkpoint["config"]
