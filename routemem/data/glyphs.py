"""Glyphs: an image-classification source built from the fonts matplotlib ships, so it runs anywhere.

Classes
    A class is one (font, character) pair, named ``"<font file stem>/<char>"`` (``"cmr10/g"``).
    Characters: ``CHARSET`` = the 62 ASCII alphanumerics ``0-9 A-Z a-z`` (punctuation is left out:
    most of it is a dot or a bar in every font). Fonts: every ``*.ttf`` in matplotlib's
    ``fonts/ttf`` folder, in sorted file-name order, except ``EXCLUDED_FONTS`` (math-symbol and
    placeholder fonts whose ASCII code points draw symbols or boxes, not letters). A (font, char)
    the font has no glyph for is dropped (with the matplotlib 3.11 fonts that leaves 22 fonts:
    DejaVu Sans / Sans Mono / Serif in 4 styles each, STIXGeneral in 4, and cmb10, cmmi10, cmr10,
    cmss10, cmti10, cmtt10), and so is any glyph whose clean render has no ink.

Near-duplicates
    Some pairs draw the same shape ('l' and 'I' in a sans font, a Display variant equal to its base
    font). Each class's clean 32x32 render is compared with every earlier class's (classes in font
    order, then CHARSET order); if ``sum|a - b| / (sum a + sum b)`` is below ``DUPLICATE_DISTANCE``
    the later class is dropped. Size and baseline are kept in the render (a glyph is not stretched
    to fill the frame), so 'o' / 'O', 'x' / 'X' and 'O' / '0' stay apart where the font draws them
    apart. Styles of one family (regular / bold / oblique) are distinct classes: the distortions
    below are kept smaller than the differences between them (shear at most 0.12, stroke change
    under a pixel), but they remain the hardest pairs. With the matplotlib 3.11 fonts: 1364
    (font, char) pairs, none empty, 103 dropped as near-duplicates, 1261 classes (629 pretraining,
    632 stream).

Samples
    Every sample of a class is the glyph's outline (matplotlib ``TextPath``) drawn by Agg at the
    requested size: em = 0.68 of the frame, baseline fixed, centred horizontally; then a random
    affine map about the centre (rotation +-10 degrees, scale x exp(U(-0.12, 0.12)), horizontal
    shear U(-0.12, 0.12), shift +-1.5 px at 32 px), a stroke-width change (the outline stroked
    with ink to thicken, or with background to thin, by U(-0.4, 0.6) px at 32 px), ink contrast
    U(0.75, 1) and Gaussian noise with sigma U(0, 0.08), clipped to [0, 1] and stored as uint8 / 255.
    Ink is 1, background 0. Each class draws from its own generator, seeded by (seed, class name),
    so a class's samples do not depend on which other classes are rendered with it.

Pretraining / stream split (fixed)
    A class belongs to the stream set if its character's index in ``CHARSET`` is odd
    (``1 3 5 7 9 B D F ... Z b d ... z``), else to the pretraining set (``0 2 4 6 8 A C ... Y a c ... y``).
    Splitting by character means a backbone pretrained on ``glyphs:pretrain`` has never seen any
    stream character in any font, while both halves mix digits, capitals and small letters.

Cache
    Rendered sets are saved as ``glyphs-<key>.npz`` under the cache folder (``cache_dir``, else
    ``$ROUTEMEM_CACHE``, else ~/.cache/routemem), written to a temp file then renamed. The key hashes
    the request, ``GLYPHS_VERSION``, the font files' bytes and the FreeType version, so a change to
    any of them renders afresh; the second identical load reads the file and renders nothing.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np

from routemem.data.images import ImageSet, make_imageset
from routemem.errors import DataError
from routemem.fileio import write_bytes_atomic

GLYPHS_VERSION = 1  # bump when rendering changes: it is part of the cache key
CHARSET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
EXCLUDED_FONTS = frozenset({"cmex10.ttf", "cmsy10.ttf", "LastResortHE-Regular.ttf"})
DUPLICATE_DISTANCE = 0.05
GLYPH_SPLITS = ("all", "pretrain", "stream")
CLASS_ORDER_SEED = 20261127  # fixed: which classes `max_classes` keeps never depends on the run's seed

EM_SHARE = 0.68  # em height / frame side
ROTATION_DEG = 10.0
LOG_SCALE = 0.12
SHEAR = 0.12
SHIFT_PX = 1.5  # at 32 px; scaled with the frame
STROKE_PX = (-0.4, 0.6)  # at 32 px; negative thins
CONTRAST = (0.75, 1.0)
NOISE_SIGMA = 0.08


def fonts_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def font_files() -> list[Path]:
    """The fonts used, sorted by file name (see the module docstring)."""
    return [p for p in sorted(fonts_dir().glob("*.ttf")) if p.name not in EXCLUDED_FONTS]


def is_stream_char(char: str) -> bool:
    """The fixed split rule: odd index in CHARSET -> stream class, even -> pretraining class."""
    return CHARSET.index(char) % 2 == 1


def _class_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


@functools.cache
def _outline(font: str, char: str):
    """The character's outline in em units, baseline at y = 0 (cached: parsing fonts is the slow part)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath

    return TextPath((0, 0), char, size=1.0, prop=FontProperties(fname=str(fonts_dir() / font)))


def _has_glyph(font: Path, chars: str) -> list[bool]:
    from matplotlib.ft2font import FT2Font

    face = FT2Font(str(font))
    return [face.get_char_index(ord(c)) != 0 for c in chars]


class _Canvas:
    """One Agg canvas reused for every draw (making a renderer costs more than drawing a glyph)."""

    def __init__(self, size: int):
        from matplotlib.backends.backend_agg import RendererAgg

        self.size = size
        self.renderer = RendererAgg(size, size, 72)  # 72 dpi: one point is one pixel
        self.gc = self.renderer.new_gc()
        self.gc.set_antialiased(True)

    def draw(self, path, transform, stroke_px: float = 0.0) -> np.ndarray:
        """Ink coverage in [0, 1], ``[size, size]``, row 0 at the top."""
        r, gc = self.renderer, self.gc
        r.clear()  # white, transparent
        gc.set_foreground((0, 0, 0, 1))
        gc.set_linewidth(max(stroke_px, 0.0))
        r.draw_path(gc, path, transform, (0, 0, 0, 1))  # fill in black (and thicken if stroke > 0)
        if stroke_px < 0:  # thin: stroke the outline in the background colour
            gc.set_foreground((1, 1, 1, 1))
            gc.set_linewidth(-stroke_px)
            r.draw_path(gc, path, transform, None)
        return 1.0 - np.asarray(r.buffer_rgba())[..., 0].astype(np.float32) / 255.0


def _x_range(path) -> tuple[float, float]:
    """Horizontal extent of the outline's points (control points included: cheap, and the same
    for every sample of a class, which is all centring needs)."""
    from matplotlib.path import Path as MplPath

    drawn = path.codes != MplPath.CLOSEPOLY if path.codes is not None else slice(None)
    xs = path.vertices[drawn, 0]
    return float(xs.min()), float(xs.max())


def _placement(path, size: int):
    """Em scaled to EM_SHARE of the frame, ink centred horizontally, the em box centred vertically."""
    from matplotlib.transforms import Affine2D

    em = EM_SHARE * size
    x_lo, x_hi = _x_range(path)
    x0 = size / 2 - em * (x_lo + x_hi) / 2
    baseline = size / 2 - em * 0.275  # the em box (descender -0.25 .. ascender 0.8) centred
    return Affine2D().scale(em).translate(x0, baseline)


def _distortion(rng: np.random.Generator, size: int):
    from matplotlib.transforms import Affine2D

    c = size / 2
    px = size / 32
    return (Affine2D().translate(-c, -c)
            .skew(math.atan(rng.uniform(-SHEAR, SHEAR)), 0)
            .scale(math.exp(rng.uniform(-LOG_SCALE, LOG_SCALE)))
            .rotate_deg(rng.uniform(-ROTATION_DEG, ROTATION_DEG))
            .translate(c + rng.uniform(-SHIFT_PX, SHIFT_PX) * px, c + rng.uniform(-SHIFT_PX, SHIFT_PX) * px))


def glyph_classes() -> list[tuple[str, str]]:
    """Every kept (font file name, char), in font then CHARSET order: missing, empty and
    near-duplicate glyphs dropped (module docstring)."""
    return list(_glyph_classes())


@functools.lru_cache(maxsize=1)
def _glyph_classes() -> tuple[tuple[str, str], ...]:
    fonts = font_files()
    if not fonts:
        raise DataError(f"source 'glyphs' found no fonts in {fonts_dir()}")
    canvas = _Canvas(32)
    kept, renders = [], []
    with warnings.catch_warnings():  # missing glyphs are checked first; keep FreeType quiet anyway
        warnings.simplefilter("ignore")
        for font in fonts:
            for char, ok in zip(CHARSET, _has_glyph(font, CHARSET)):
                if not ok:
                    continue
                path = _outline(font.name, char)
                img = canvas.draw(path, _placement(path, 32)).ravel()
                if img.sum() < 1.0:  # less than one pixel of ink: an empty render
                    continue
                kept.append((font.name, char))
                renders.append(img)
    x = np.stack(renders).astype(np.float64)
    mass = x.sum(1)
    # Candidates first: for values in [0, 1], |d| >= d^2, so a pair whose squared L2 distance (one
    # matrix product for all pairs) is already past the threshold cannot be a duplicate in L1.
    sq = (x * x).sum(1)
    l2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T) / (mass[:, None] + mass[None, :])
    keep = np.ones(len(kept), dtype=bool)
    for i in range(1, len(kept)):  # drop i if it is near an earlier kept class
        earlier = np.flatnonzero(keep[:i] & (l2[i, :i] < DUPLICATE_DISTANCE + 1e-9))
        if len(earlier):
            dist = np.abs(x[earlier] - x[i]).sum(1) / (mass[earlier] + mass[i])
            keep[i] = dist.min() >= DUPLICATE_DISTANCE
    return tuple(c for c, k in zip(kept, keep) if k)


def class_name(font: str, char: str) -> str:
    return f"{Path(font).stem}/{char}"


def select_glyph_classes(split: str = "all", max_classes: int | None = None) -> list[tuple[str, str]]:
    """The classes of a split; ``max_classes`` keeps that many, chosen by a fixed permutation
    (CLASS_ORDER_SEED), in the order of the full list."""
    if split not in GLYPH_SPLITS:
        raise DataError(f"unknown glyph split '{split}' (choose from {', '.join(GLYPH_SPLITS)})")
    classes = [c for c in glyph_classes() if split == "all" or is_stream_char(c[1]) == (split == "stream")]
    if max_classes is not None:
        if not 1 <= max_classes <= len(classes):
            raise DataError(f"glyphs:{split} has {len(classes)} classes; max_classes={max_classes} asks for more")
        pick = np.sort(np.random.default_rng(CLASS_ORDER_SEED).permutation(len(classes))[:max_classes])
        classes = [classes[i] for i in pick]
    return classes


def render_glyphs(classes, samples_per_class: int, size: int, seed: int) -> np.ndarray:
    """uint8 ``[len(classes) * samples_per_class, 1, size, size]``, class-major (distortions: module docstring)."""
    canvas = _Canvas(size)
    px = size / 32
    out = np.empty((len(classes), samples_per_class, size, size), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, (font, char) in enumerate(classes):
            rng = np.random.default_rng([seed, _class_key(class_name(font, char))])
            path = _outline(font, char)
            place = _placement(path, size)
            for s in range(samples_per_class):
                stroke = rng.uniform(*STROKE_PX) * px
                out[k, s] = canvas.draw(path, place + _distortion(rng, size), stroke)
            contrast = rng.uniform(*CONTRAST, size=(samples_per_class, 1, 1))
            sigma = rng.uniform(0, NOISE_SIGMA, size=(samples_per_class, 1, 1))
            out[k] = out[k] * contrast + sigma * rng.standard_normal(out[k].shape, dtype=np.float32)
    u8 = np.rint(np.clip(out, 0.0, 1.0) * 255).astype(np.uint8)
    return u8.reshape(-1, 1, size, size)


def _cache_key(split: str, max_classes, samples_per_class: int, size: int, seed: int) -> str:
    from matplotlib.ft2font import __freetype_version__

    fonts = hashlib.sha256()
    for p in font_files():
        fonts.update(p.name.encode() + b"\0" + p.read_bytes())
    request = {"version": GLYPHS_VERSION, "split": split, "max_classes": max_classes, "n": samples_per_class,
               "size": size, "seed": seed, "charset": CHARSET, "fonts": fonts.hexdigest(),
               "freetype": __freetype_version__, "duplicate": DUPLICATE_DISTANCE}
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:20]


def _read_cache(path: Path):
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["images"], z["labels"], [str(c) for c in z["class_names"]]
    except (OSError, ValueError, KeyError):
        return None  # absent or unreadable: render again and overwrite


def _write_cache(path: Path, images, labels, names) -> None:
    """Never raises: an unwritable cache only costs rendering again next time."""
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=labels, class_names=np.array(names))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, buf.getvalue())
    except OSError:
        pass


def load_glyphs(split: str = "all", *, size: int = 32, seed: int = 0, samples_per_class: int = 50,
                max_classes: int | None = None, cache_dir: str | os.PathLike | None = None) -> ImageSet:
    """The glyph set of ``split`` (``all``, ``pretrain``, ``stream``), rendered or read from the cache."""
    from routemem.data.dataset import default_cache_dir

    if split not in GLYPH_SPLITS:
        raise DataError(f"unknown glyph split '{split}' (choose from {', '.join(GLYPH_SPLITS)})")
    if samples_per_class < 1 or size < 8:
        raise DataError(f"glyphs need samples_per_class >= 1 and size >= 8, got {samples_per_class} and {size}")
    path = Path(cache_dir or default_cache_dir()) / f"glyphs-{_cache_key(split, max_classes, samples_per_class, size, seed)}.npz"
    cached = _read_cache(path)
    if cached is not None:
        u8, labels, names = cached
    else:
        classes = select_glyph_classes(split, max_classes)
        u8 = render_glyphs(classes, samples_per_class, size, seed)
        labels = np.repeat(np.arange(len(classes), dtype=np.int64), samples_per_class)
        names = [class_name(f, c) for f, c in classes]
        _write_cache(path, u8, labels, names)
    images = u8.astype(np.float32) / np.float32(255.0)
    return make_imageset(f"glyphs:{split}" if split != "all" else "glyphs", images, labels, names, str(fonts_dir()))
