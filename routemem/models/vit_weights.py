"""VisionTransformer weights as safetensors in the common ViT key layout (the one timm's ``vit_*``
checkpoints use), so a file from there (e.g. a ViT-B/16 on disk) loads, and ours load there.

Key mapping (D = d_model, N = n_patches, C = in_chans, p = patch_size, F = mlp_hidden,
K = n_classes; ``i`` = 0 .. n_layer - 1; all Linear weights are [out, in]):

    file key                          shape          VisionTransformer parameter
    cls_token                         [1, 1, D]      cls_token
    pos_embed                         [1, 1 + N, D]  pos_embed (CLS position first)
    patch_embed.proj.weight / .bias   [D, C, p, p]   patch_embed.proj (Conv2d, stride p)
    blocks.i.norm1.weight / .bias     [D]            blocks.i.norm1
    blocks.i.attn.qkv.weight / .bias  [3D, D]        blocks.i.attn.qkv
    blocks.i.attn.proj.weight / .bias [D, D]         blocks.i.attn.out
    blocks.i.norm2.weight / .bias     [D]            blocks.i.norm2
    blocks.i.mlp.fc1.weight / .bias   [F, D]         blocks.i.mlp.up
    blocks.i.mlp.fc2.weight / .bias   [D, F]         blocks.i.mlp.down
    norm.weight / .bias               [D]            norm
    head.weight / .bias               [K, D]         head (optional in a file: see load_vit)

The fused qkv rows are [q; k; v], each D rows split into heads of D / n_head consecutive rows:
the attention layer's ``split_qkv`` views the projection as [B, T, 3, H, Dh], the same order.

The config is read from the file's metadata when we wrote it (``save_vit``); otherwise it is
inferred from the shapes: D, C, p from patch_embed.proj.weight, N (a square) from pos_embed,
n_layer from the block indices, F from fc1, K from the head, and n_head from the width of the
standard ViT sizes unless given (``STANDARD_N_HEAD``: the head dimension is not always 64; ViT-H,
g and G have 16 heads). Another width needs ``n_head=``. Norm eps defaults to 1e-6, as ViTs use.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from routemem.errors import CheckpointError, ConfigError
from routemem.fileio import make_public
from routemem.models.vit import VisionTransformer, ViTConfig

CONFIG_METADATA_KEY = "routemem.vit_config"
# d_model -> n_head of the standard ViT sizes (as timm's vit_* models define them). The head
# dimension is not always 64: H, g and G have 16 heads of 80, 88 and 104. Widths whose head count
# differs between model families stay out (1536: DINOv2's ViT-g/14 has 24 heads, other giants 16).
STANDARD_N_HEAD = {
    192: 3,  # Ti
    384: 6,  # S
    768: 12,  # B
    1024: 16,  # L
    1280: 16,  # H
    1408: 16,  # g
    1664: 16,  # G
}
# our parameter name fragment -> the file's (only these differ; everything else is the same name)
_RENAMES = ((".attn.out.", ".attn.proj."), (".mlp.up.", ".mlp.fc1."), (".mlp.down.", ".mlp.fc2."))
_HEAD_KEYS = ("head.weight", "head.bias")


def to_file_key(name: str) -> str:
    for ours, theirs in _RENAMES:
        name = name.replace(ours, theirs)
    return name


def to_model_key(key: str) -> str:
    for ours, theirs in _RENAMES:
        key = key.replace(theirs, ours)
    return key


def vit_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The model's tensors under the file's key names (CPU, contiguous, detached)."""
    return {to_file_key(name): t.detach().cpu().contiguous() for name, t in model.state_dict().items()}


def save_vit(model: VisionTransformer, path: str | Path) -> Path:
    """Write ``model`` to ``path`` (safetensors, common ViT layout, config in the metadata),
    atomically: a temp file beside it, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(asdict(model.config))}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(vit_state_dict(model), tmp, metadata=metadata)
        make_public(tmp)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _open(path: Path):
    if not path.is_file():
        raise CheckpointError(f"ViT weights not found: {path}")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"ViT weights are not a readable safetensors file: {path} ({err})") from None


def _shape(shapes: dict, key: str, path: Path, dims: int) -> tuple:
    if key not in shapes:
        raise CheckpointError(f"{path}: missing key '{key}' (expected the common ViT layout; see routemem/models/vit_weights.py)")
    if len(shapes[key]) != dims:
        raise CheckpointError(f"{path}: key '{key}' has shape {shapes[key]}, expected {dims} dimensions")
    return shapes[key]


def _infer_config(shapes: dict, metadata: dict, path: Path, overrides: dict) -> ViTConfig:
    """The config from our metadata, else from the tensor shapes; ``overrides`` win."""
    names = {f.name for f in fields(ViTConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown ViT config field(s) {unknown} (fields: {', '.join(sorted(names))})")
    if CONFIG_METADATA_KEY in metadata:
        try:
            stored = json.loads(metadata[CONFIG_METADATA_KEY])
            return ViTConfig(**{k: v for k, v in stored.items() if k in names} | overrides)
        except (json.JSONDecodeError, TypeError) as err:
            raise CheckpointError(f"{path}: unreadable ViT config in the metadata ({err})") from None
    D, C, p, p2 = _shape(shapes, "patch_embed.proj.weight", path, 4)
    if p != p2:
        raise CheckpointError(f"{path}: patch_embed.proj.weight has non-square patches {shapes['patch_embed.proj.weight']}")
    n_pos = _shape(shapes, "pos_embed", path, 3)[1]
    grid = math.isqrt(max(n_pos - 1, 0))
    if n_pos < 2 or grid * grid != n_pos - 1:
        raise CheckpointError(f"{path}: pos_embed has {n_pos} positions, expected 1 (CLS) + a square number of patches")
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise CheckpointError(f"{path}: missing key 'blocks.0.attn.qkv.weight' (no transformer blocks in the file)")
    inferred = {"image_size": grid * p, "patch_size": p, "in_chans": C, "d_model": D, "n_layer": max(blocks) + 1,
                "mlp_hidden": _shape(shapes, "blocks.0.mlp.fc1.weight", path, 2)[0]}
    if "head.weight" in shapes:
        inferred["n_classes"] = shapes["head.weight"][0]
    elif "n_classes" not in overrides:
        raise ConfigError(f"{path} has no head (head.weight): pass n_classes")
    if "n_head" not in overrides:
        if D not in STANDARD_N_HEAD:
            raise CheckpointError(f"{path}: the file does not record n_head and d_model={D} is not a standard "
                                  f"ViT width ({', '.join(map(str, STANDARD_N_HEAD))}): pass n_head=<heads>")
        inferred["n_head"] = STANDARD_N_HEAD[D]
    return ViTConfig(**(inferred | overrides))


def read_vit_config(path: str | Path, **overrides) -> ViTConfig:
    """The ViTConfig of a weights file (see the module docstring); ``overrides`` are ViTConfig fields."""
    path = Path(path)
    with _open(path) as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        return _infer_config(shapes, f.metadata() or {}, path, overrides)


def load_vit(path: str | Path, config: ViTConfig | None = None, *, strict_head: bool = False,
             **overrides) -> VisionTransformer:
    """A VisionTransformer (float32, CPU) with the weights of ``path``.

    ``config``: check the file against it; by default it is read or inferred from the file, with
    ``overrides`` (ViTConfig fields, e.g. ``n_classes=200``, ``n_head=12``) applied. Every key of
    the layout must be there with its shape, and no other key (CheckpointError naming the key).
    The head: with ``strict_head=True`` it must be in the file with n_classes rows; by default a
    head that is missing or has another number of classes is left freshly initialised (loading
    ImageNet weights for a 200-class stream: ``load_vit(path, n_classes=200)``)."""
    path = Path(path)
    with _open(path) as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        if config is None:
            config = _infer_config(shapes, f.metadata() or {}, path, overrides)
        elif overrides:
            raise ConfigError("load_vit: give a config or overrides, not both")
        model = VisionTransformer(config)
        expected = {k: tuple(t.shape) for k, t in vit_state_dict(model).items()}
        missing = [k for k in expected if k not in shapes and k not in _HEAD_KEYS]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{path}: missing key '{missing[0]}'{more} (expected the common ViT layout; "
                                  "see routemem/models/vit_weights.py)")
        unexpected = [k for k in shapes if k not in expected]
        if unexpected:
            more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
            raise CheckpointError(f"{path}: unexpected key '{unexpected[0]}'{more}, not part of the ViT layout")
        for key, shape in expected.items():
            if key in shapes and key not in _HEAD_KEYS and shapes[key] != shape:
                raise CheckpointError(f"{path}: key '{key}' has shape {shapes[key]}, the config expects {shape}")
        load_head = _check_head(shapes, expected, path, strict_head)
        tensors = {to_model_key(k): f.get_tensor(k) for k in shapes if load_head or k not in _HEAD_KEYS}
    model.load_state_dict(tensors, strict=load_head)  # without the head: it keeps its fresh init
    return model


def _check_head(shapes: dict, expected: dict, path: Path, strict: bool) -> bool:
    """Whether the file's head is loaded; raises if it is malformed, or absent / other-sized when strict."""
    present = [k for k in _HEAD_KEYS if k in shapes]
    if len(present) == 1:
        missing = next(k for k in _HEAD_KEYS if k not in shapes)
        raise CheckpointError(f"{path}: missing key '{missing}' (the file has '{present[0]}')")
    if not present:
        if strict:
            raise CheckpointError(f"{path}: missing key 'head.weight' (strict_head=True)")
        return False
    weight, bias = shapes["head.weight"], shapes["head.bias"]
    if len(weight) != 2 or weight[1] != expected["head.weight"][1] or bias != weight[:1]:
        raise CheckpointError(f"{path}: key 'head.weight' / 'head.bias' have shapes {shapes['head.weight']} / {bias}, "
                              f"expected (n_classes, {expected['head.weight'][1]}) / (n_classes,)")
    if weight != expected["head.weight"]:
        if strict:
            raise CheckpointError(f"{path}: key 'head.weight' has shape {weight}, the config expects "
                                  f"{expected['head.weight']} (strict_head=True)")
        return False
    return True
