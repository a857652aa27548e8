"""A routemem training checkpoint to a transformers folder (``save_pretrained``) and back.

The transformers folder holds config.json, model.safetensors and ``routemem_run.json``: the run's
config, its tokenizer, step and tokens seen, which transformers has no place for and the way back
needs. Weights go both ways bit for bit. The optimizer's moments do not travel: a checkpoint made
from a transformers folder evaluates and samples as the original, and ``--resume-from`` on it
restarts AdamW's moments at zero (at the saved step of the schedule).

Both directions write into a temporary folder beside the output and rename it into place, so a
failure leaves no half-written output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from routemem.config import from_dict, to_dict
from routemem.errors import UserError
from routemem.fileio import make_public
from routemem.integrations.hf.config import RoutememConfig
from routemem.integrations.hf.model import RoutememForCausalLM
from routemem.models import LMConfig, TransformerLM
from routemem.train import checkpoint as ckpt_io
from routemem.train.config import TrainConfig
from routemem.train.optim import make_optimizer

RUN_FILE = "routemem_run.json"


def export_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    """Write the routemem checkpoint ``ckpt`` (a run folder or its ckpt/) as a transformers folder
    ``out`` (missing or empty); returns ``out``."""
    checkpoint = ckpt_io.read_checkpoint(ckpt)
    lm = TransformerLM(from_dict(LMConfig, checkpoint["config"].get("model", {}), prefix="model."))
    ckpt_io.load_model_weights(lm, checkpoint)
    model = RoutememForCausalLM(RoutememConfig.from_lm_config(lm.config))
    model.model.load_state_dict(lm.state_dict())
    run = {"config": checkpoint["config"], "tokenizer": checkpoint["tokenizer"],
           "step": checkpoint["state"]["step"], "tokens_seen": checkpoint["state"]["tokens_seen"]}

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        (folder / RUN_FILE).write_text(json.dumps(run, indent=2, sort_keys=True))

    return _write_folder(Path(out), write)


def import_checkpoint(folder: str | Path, out: str | Path) -> Path:
    """Write the transformers folder ``folder`` (made by ``export_checkpoint``, perhaps trained on
    since) as a routemem run folder ``out`` holding ckpt/; returns ``out``."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a transformers model folder ({folder / 'config.json'} does not exist)")
    if not (folder / RUN_FILE).is_file():
        raise UserError(f"{folder} has no {RUN_FILE} (its tokenizer and run config): only a folder written by "
                        "`routemem export-hf` converts back")
    run = json.loads((folder / RUN_FILE).read_text())
    try:
        model = RoutememForCausalLM.from_pretrained(folder)
    except (OSError, ValueError) as err:  # a missing or corrupt weights file, a config of another model
        raise UserError(f"cannot load {folder}: {str(err).splitlines()[0]}") from None
    lm = model.model
    config = {**run["config"], "model": to_dict(lm.config)}  # the weights' architecture wins
    optimizer = make_optimizer(lm, from_dict(TrainConfig, config.get("train", {}), prefix="train."))

    def write(run_dir: Path) -> None:
        ckpt_io.save_checkpoint(run_dir, model=lm, optimizer=optimizer, config=config, tokenizer=run["tokenizer"],
                                step=run["step"], tokens_seen=run["tokens_seen"])

    return _write_folder(Path(out), write)


def _write_folder(out: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a fresh folder beside ``out``, then rename it to ``out``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; choose a new one")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        for path in (tmp, *tmp.rglob("*")):  # mkdtemp and safetensors make owner-only modes
            make_public(path, folder=path.is_dir())
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
