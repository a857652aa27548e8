"""Checkpoints: ``DIR/ckpt/`` holding safetensors for tensors and JSON for everything else.

Files: model.safetensors (weights), state.safetensors (optimizer tensors, RNG state),
state.json (step, tokens seen, optimizer hyper-parameters), config.json (the run config),
tokenizer.json, manifest.json (sha256 of every other file, written last).
A checkpoint is written to a temporary folder beside ``ckpt/`` and renamed into place, so a crash
never leaves a half-written checkpoint; loading verifies the manifest, so a truncated or corrupted
file is reported by name instead of loading garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from routemem.errors import CheckpointError
from routemem.fileio import make_public

CKPT_DIRNAME = "ckpt"
FORMAT_VERSION = 1


def resolve_ckpt_dir(path: str | Path) -> Path:
    """Accept a run directory (holding ``ckpt/``) or the ``ckpt/`` folder itself."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    if (path / CKPT_DIRNAME / "manifest.json").is_file():
        return path / CKPT_DIRNAME
    # Name the one file we looked for last: PATH/ckpt/manifest.json, or PATH/manifest.json when
    # PATH already is a ckpt/ folder (never PATH/ckpt/ckpt/...).
    expected = path / "manifest.json" if path.name == CKPT_DIRNAME else path / CKPT_DIRNAME / "manifest.json"
    raise CheckpointError(f"no checkpoint found at {path} ({expected} does not exist)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without duplicate storage (tied weights are saved once, under their first name)."""
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.stride()) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().cpu().contiguous()
    return out


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors (``opt.<param>.<key>``) and JSON-able rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, slots in state["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: str | Path, *, model, optimizer, config: dict, tokenizer: dict,
                    step: int, tokens_seen: int, extra: dict | None = None) -> Path:
    """Write ``run_dir/ckpt`` atomically; returns its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / CKPT_DIRNAME
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-tmp-", dir=run_dir))
    try:
        make_public(tmp, folder=True)  # mkdtemp makes it 0700; the run's other folders are 0755
        save_file(_model_tensors(model), str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        opt_tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            opt_tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_file(opt_tensors, str(tmp / "state.safetensors"))
        _write_json(tmp / "state.json", {"step": step, "tokens_seen": tokens_seen, "optimizer": opt_meta,
                                         **(extra or {})})
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "tokenizer.json", tokenizer)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        _write_json(tmp / "manifest.json", {"format": FORMAT_VERSION, "step": step, "files": files})
        for file in tmp.iterdir():  # safetensors writes its files 0600; give them the usual mode
            make_public(file)
        old = run_dir / ".ckpt-old"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint file is corrupt (not valid JSON): {path}") from None


def read_checkpoint(path: str | Path) -> dict:
    """Verify and read a checkpoint's JSON parts; tensors are loaded by ``load_*`` on demand."""
    ckpt = resolve_ckpt_dir(path)
    manifest = _read_json(ckpt / "manifest.json")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {ckpt} has an unknown format (expected format {FORMAT_VERSION})")
    for name, digest in manifest["files"].items():
        file = ckpt / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file missing: {file}")
        if _sha256(file) != digest:
            raise CheckpointError(f"checkpoint file is truncated or corrupt (checksum mismatch): {file}")
    return {
        "dir": ckpt,
        "config": _read_json(ckpt / "config.json"),
        "tokenizer": _read_json(ckpt / "tokenizer.json"),
        "state": _read_json(ckpt / "state.json"),
    }


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint file is corrupt: {file} ({err})") from None


def load_model_weights(model: torch.nn.Module, ckpt: dict) -> None:
    tensors = _load_tensors(ckpt["dir"] / "model.safetensors")
    expected = _model_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {ckpt['dir']} does not fit this model: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"checkpoint {ckpt['dir']}: {name} has shape {tuple(tensor.shape)}, "
                f"model expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(tensors, strict=False)  # strict=False: tied duplicates were not saved


def load_training_state(optimizer: torch.optim.Optimizer, ckpt: dict) -> None:
    tensors = _load_tensors(ckpt["dir"] / "state.safetensors")
    _restore_optimizer(optimizer, tensors, ckpt["state"]["optimizer"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
