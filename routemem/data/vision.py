"""Image sources by name, and the fixed pretraining / stream split of their classes.

Sources (``load_source(spec, ...)``):

- ``glyphs``, ``glyphs:pretrain``, ``glyphs:stream``: characters rendered from matplotlib's own
  fonts, 1261 (font, char) classes with matplotlib 3.11, rendered with random distortions and
  cached (``routemem.data.glyphs`` documents the character set, the fonts, the near-duplicate rule
  and the split: a class is a stream class iff its character's index in ``CHARSET`` is odd).
- ``digits``: scikit-learn's bundled handwritten digits (1797 real 8x8 images, 10 classes, values
  0..16), scaled to [0, 1] and upsampled bilinearly to ``size``. Needs scikit-learn
  (``pip install -e ".[experiments]"``); without it, a one-line error says so.
- ``folder:PATH``: one sub-folder per class, PNG / JPEG (``routemem.data.image_folder``).

``split_pretrain_stream(images)`` returns the two disjoint class sets of any ImageSet: the glyph
rule above for glyph sets; for other sources, the classes in a fixed permutation (seed
``CLASS_ORDER_SEED``, never the run's seed), the first half (rounded down) for pretraining.
"""

from __future__ import annotations

import os

import numpy as np

from routemem.data.glyphs import CHARSET, CLASS_ORDER_SEED, is_stream_char, load_glyphs
from routemem.data.image_folder import COLORS, load_image_folder
from routemem.data.images import ImageSet, make_imageset, resize, select_classes
from routemem.errors import DataError

SOURCES = {
    "glyphs": "characters from matplotlib's fonts, (font, char) classes; glyphs:pretrain / glyphs:stream for each half",
    "digits": "scikit-learn's bundled handwritten digits, 1797 images, 10 classes, upsampled",
    "folder:PATH": "your images, one sub-folder per class (PNG, or JPEG through Pillow)",
}


def list_sources() -> dict[str, str]:
    """Source name -> one-line description."""
    return dict(SOURCES)


def load_digits(size: int = 32) -> ImageSet:
    """scikit-learn's digits, ``[1797, 1, size, size]`` in [0, 1]."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise DataError("source 'digits' needs scikit-learn: pip install scikit-learn "
                        "(or pip install -e \".[experiments]\")") from None
    bunch = sk_load_digits()
    images = resize(bunch.images.astype(np.float32) / 16.0, size)[:, None]
    return make_imageset("digits", np.clip(images, 0.0, 1.0), bunch.target.astype(np.int64),
                         [str(int(n)) for n in bunch.target_names], "sklearn.datasets.load_digits")


def _fixed_class_order(n_classes: int) -> np.ndarray:
    return np.random.default_rng(CLASS_ORDER_SEED).permutation(n_classes)


def limit_classes(images: ImageSet, max_classes: int) -> ImageSet:
    """``max_classes`` of the classes, picked by the fixed permutation, kept in their original order."""
    if not 1 <= max_classes <= images.n_classes:
        raise DataError(f"{images.name} has {images.n_classes} classes; max_classes={max_classes} asks for more")
    if max_classes == images.n_classes:
        return images
    return select_classes(images, np.sort(_fixed_class_order(images.n_classes)[:max_classes]), images.name)


def load_source(spec: str, *, size: int = 32, seed: int = 0, cache_dir: str | os.PathLike | None = None,
                samples_per_class: int = 50, max_classes: int | None = None, color: str = "gray") -> ImageSet:
    """An ImageSet by name (module docstring).

    ``seed`` and ``samples_per_class`` shape only the rendered glyphs (distortions, count per class);
    ``cache_dir`` is where glyph renders are cached (default ``$ROUTEMEM_CACHE`` or ~/.cache/routemem);
    ``color`` (``gray`` or ``rgb``) applies to folders (glyphs and digits are grayscale: see
    ``routemem.data.images.to_rgb``); ``max_classes`` keeps that many classes (fixed choice).
    """
    if not isinstance(spec, str) or not spec:
        raise DataError(f"image source must be a non-empty name, got {spec!r}")
    if size < 8:
        raise DataError(f"image size must be at least 8 pixels, got {size}")
    if color not in COLORS:
        raise DataError(f"color must be one of {', '.join(COLORS)}, got '{color}'")
    kind, _, arg = spec.partition(":")
    if kind == "glyphs":
        return load_glyphs(arg or "all", size=size, seed=seed, samples_per_class=samples_per_class,
                           max_classes=max_classes, cache_dir=cache_dir)
    if kind == "digits" and not arg:
        images = load_digits(size)
    elif kind == "folder":
        if not arg:
            raise DataError("image source 'folder:PATH' needs a path after 'folder:'")
        images = load_image_folder(arg, size=size, color=color)
    else:
        raise DataError(f"unknown image source '{spec}' (choose from {', '.join(SOURCES)})")
    return images if max_classes is None else limit_classes(images, max_classes)


def _is_glyph_set(images: ImageSet) -> bool:
    return images.name.startswith("glyphs") and all(
        len(c.rpartition("/")[2]) == 1 and c.rpartition("/")[2] in CHARSET for c in images.class_names)


def split_pretrain_stream(images: ImageSet) -> tuple[ImageSet, ImageSet]:
    """(pretraining set, stream set): disjoint classes, each relabelled 0..k-1 (rule: module docstring)."""
    if _is_glyph_set(images):
        stream = np.array([is_stream_char(c.rpartition("/")[2]) for c in images.class_names])
        pre_ids, stream_ids = np.flatnonzero(~stream), np.flatnonzero(stream)
    else:
        order = _fixed_class_order(images.n_classes)
        half = images.n_classes // 2
        pre_ids, stream_ids = np.sort(order[:half]), np.sort(order[half:])
    if len(pre_ids) == 0 or len(stream_ids) == 0:
        raise DataError(f"{images.name} has {images.n_classes} classes: too few to split into "
                        "pretraining and stream classes")
    base = images.name.split(":")[0] if _is_glyph_set(images) else images.name
    return (select_classes(images, pre_ids, f"{base}:pretrain"), select_classes(images, stream_ids, f"{base}:stream"))
