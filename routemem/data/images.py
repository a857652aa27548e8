"""Labelled image arrays (``ImageSet``) and the numpy resizing every image source shares.

An ``ImageSet`` is what every vision source returns (``routemem.data.vision.load_source``): images
float32 ``[N, C, H, W]`` in [0, 1] (C = 1 grayscale, 3 RGB), labels int64 ``[N]`` in
``0 .. n_classes - 1``, the class names, and a sha256 of the arrays that results record for
provenance. numpy only: torch is not imported here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from routemem.errors import DataError


@dataclass(frozen=True, repr=False, eq=False)
class ImageSet:
    """Images, labels and class names of one source (build it with ``make_imageset``)."""

    name: str  # e.g. "glyphs:stream", "digits", "folder:/data/imagenet-r"
    images: np.ndarray  # float32 [N, C, H, W], values in [0, 1]
    labels: np.ndarray  # int64 [N], in 0 .. len(class_names) - 1
    class_names: tuple[str, ...]
    sha256: str  # hex digest of images, labels and class names (see image_set_hash)
    source: str = ""  # where the images came from (a folder, the fonts' folder, a package)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def size(self) -> int:
        """Side of the (square) images in pixels."""
        return int(self.images.shape[-1])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:  # the arrays are megabytes: keep them out of reprs and tracebacks
        return (f"ImageSet(name={self.name!r}, n={len(self)}, classes={self.n_classes}, "
                f"shape={tuple(self.images.shape[1:])}, sha256={self.sha256[:12]}...)")


def image_set_hash(images: np.ndarray, labels: np.ndarray, class_names) -> str:
    """sha256 over the float32 image bytes, the int64 label bytes and the class names (one per line)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    h.update("\n".join(class_names).encode("utf-8"))
    return h.hexdigest()


def make_imageset(name: str, images: np.ndarray, labels: np.ndarray, class_names, source: str = "") -> ImageSet:
    """Validate shapes, dtypes and ranges, then hash; DataError names what is wrong."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    class_names = tuple(str(c) for c in class_names)
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[2] != images.shape[3]:
        raise DataError(f"{name}: images must be [N, 1 or 3, S, S], got shape {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise DataError(f"{name}: {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
    if len(images) == 0:
        raise DataError(f"{name}: no images")
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise DataError(f"{name}: labels must lie in 0..{len(class_names) - 1}")
    if not (np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0):
        raise DataError(f"{name}: image values must be finite and in [0, 1]")
    return ImageSet(name, images, labels, class_names, image_set_hash(images, labels, class_names), source)


def select_classes(images: ImageSet, class_ids, name: str) -> ImageSet:
    """The samples of ``class_ids`` only, relabelled ``0 .. k-1`` in the order given (names kept)."""
    class_ids = np.asarray(class_ids, dtype=np.int64)
    remap = np.full(images.n_classes, -1, dtype=np.int64)
    remap[class_ids] = np.arange(len(class_ids))
    keep = remap[images.labels] >= 0
    names = [images.class_names[c] for c in class_ids]
    return make_imageset(name, images.images[keep], remap[images.labels[keep]], names, images.source)


def to_rgb(images: ImageSet) -> ImageSet:
    """A grayscale set with its one channel repeated three times (for an RGB backbone); RGB unchanged."""
    if images.channels == 3:
        return images
    return make_imageset(images.name, np.repeat(images.images, 3, axis=1), images.labels,
                         images.class_names, images.source)


def _bilinear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights for one axis, pixel centres aligned (align_corners=False)."""
    x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    x = np.clip(x, 0, n_in - 1)
    lo = np.floor(x).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (x - lo).astype(np.float32)


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """``[..., H, W]`` -> ``[..., size, size]``: box-average first when shrinking by 2x or more
    (plain bilinear would alias), then bilinear with aligned pixel centres."""
    images = np.asarray(images, dtype=np.float32)
    h, w = images.shape[-2:]
    k = min(h // size, w // size)
    if k >= 2:  # integer box filter: average k x k blocks (crops at most k-1 rows / columns)
        hh, ww = (h // k) * k, (w // k) * k
        blocks = images[..., :hh, :ww].reshape(*images.shape[:-2], hh // k, k, ww // k, k)
        images = blocks.mean(axis=(-3, -1))
        h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return np.ascontiguousarray(images)
    lo, hi, t = _bilinear_axis(h, size)
    rows = images[..., lo, :] * (1 - t)[:, None] + images[..., hi, :] * t[:, None]
    lo, hi, t = _bilinear_axis(w, size)
    return np.ascontiguousarray(rows[..., lo] * (1 - t) + rows[..., hi] * t)
