"""A user's own images: ``folder:PATH`` with one sub-folder per class (e.g. ImageNet-R).

Class names are the sub-folder names, sorted; hidden entries (``.``-prefixed) are skipped. Every
``.png``, ``.jpg`` and ``.jpeg`` file (any case) in a class folder is read with matplotlib's
``imread`` (JPEG goes through PIL, which matplotlib itself installs; without it, a JPEG is a
one-line error saying so), centre-cropped to a square, resized to ``size x size`` (box average,
then bilinear: ``routemem.data.images.resize``) and converted to grayscale (ITU-R 601 luma) or RGB.
Alpha is dropped. Anything unreadable is a one-line DataError naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from routemem.data.images import ImageSet, make_imageset, resize
from routemem.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
COLORS = ("gray", "rgb")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _as_float(img: np.ndarray, path: Path) -> np.ndarray:
    """[H, W, C] float32 in [0, 1] from whatever imread returned (PNG floats, JPEG uint8)."""
    if img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    elif img.dtype == np.uint16:
        img = img.astype(np.float32) / 65535.0
    else:
        img = np.clip(img.astype(np.float32), 0.0, 1.0)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 2, 3, 4) or min(img.shape[:2]) < 1:
        raise DataError(f"image {path} has an unsupported shape {tuple(img.shape)}")
    if img.shape[2] in (2, 4):  # drop alpha
        img = img[:, :, :-1]
    return img


def read_image(path: Path, size: int, color: str) -> np.ndarray:
    """One image as float32 ``[C, size, size]`` in [0, 1] (C = 1 for gray, 3 for rgb)."""
    import matplotlib.image

    if path.suffix.lower() in (".jpg", ".jpeg"):
        try:
            import PIL  # noqa: F401  (matplotlib reads JPEG only through PIL)
        except ImportError:
            raise DataError(f"reading JPEG {path} needs Pillow (pip install pillow); PNG needs nothing") from None
    try:
        img = matplotlib.image.imread(str(path))
    except Exception as e:  # noqa: BLE001  (PIL and matplotlib raise many types for a bad file)
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot read image {path}: {why}") from None
    img = _as_float(np.asarray(img), path)
    h, w = img.shape[:2]
    s = min(h, w)  # centre crop to a square, then resize
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    if color == "gray":
        img = img.mean(axis=2, keepdims=True) if img.shape[2] == 1 else (img @ _LUMA)[:, :, None]
    elif img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return np.clip(resize(np.transpose(img, (2, 0, 1)), size), 0.0, 1.0)


def load_image_folder(root: str | Path, *, size: int = 32, color: str = "gray") -> ImageSet:
    """Every image under ``root/<class>/``; DataError for a missing or empty folder, a class
    folder with no images, or an unreadable image."""
    if color not in COLORS:
        raise DataError(f"color must be one of {', '.join(COLORS)}, got '{color}'")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"image folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"image folder path is not a directory: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"image folder {root} has no class sub-folders (expected {root}/<class>/<image>.png)")
    images, labels = [], []
    for label, d in enumerate(class_dirs):
        files = sorted(p for p in d.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"class folder {d} has no images ({', '.join(IMAGE_SUFFIXES)})")
        images.extend(read_image(f, size, color) for f in files)
        labels.extend([label] * len(files))
    return make_imageset(f"folder:{root}", np.stack(images), np.array(labels), [d.name for d in class_dirs], str(root))
