"""Image sources: rendered glyphs (shapes, determinism, cache, the fixed split), digits, image folders,
and the one-line errors for bad input."""

import sys

import matplotlib.image
import numpy as np
import pytest

from routemem.data import (
    glyphs,
    load_source,
    make_imageset,
    split_pretrain_stream,
    to_rgb,
)
from routemem.data.images import resize
from routemem.errors import DataError

SMALL = {"max_classes": 6, "samples_per_class": 4}


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_glyphs_shapes_ranges_and_names(cache):
    s = load_source("glyphs:stream", cache_dir=cache, **SMALL)
    assert s.images.shape == (24, 1, 32, 32) and s.images.dtype == np.float32
    assert s.labels.dtype == np.int64 and np.bincount(s.labels).tolist() == [4] * 6
    assert 0.0 <= s.images.min() and s.images.max() <= 1.0
    assert s.images.reshape(24, -1).max(1).min() > 0.5  # every sample has ink
    for name in s.class_names:
        font, _, char = name.rpartition("/")
        assert glyphs.is_stream_char(char) and (glyphs.fonts_dir() / f"{font}.ttf").exists()
    assert len(s.sha256) == 64
    assert load_source("glyphs", size=16, cache_dir=cache, **SMALL).images.shape == (24, 1, 16, 16)


def test_glyph_class_list_drops_missing_excluded_and_near_duplicate_glyphs():
    classes = glyphs.glyph_classes()
    assert len(classes) > 500  # hundreds of (font, char) classes
    fonts = {f for f, _ in classes}
    assert not fonts & glyphs.EXCLUDED_FONTS
    assert "STIXSizOneSymReg.ttf" not in fonts  # has no ASCII letters at all
    # cmss10 draws 'I' and 'l' alike at 32 px: at most one of them is kept
    assert not {("cmss10.ttf", "I"), ("cmss10.ttf", "l")} <= set(classes)
    # no two kept classes (here: two fonts' worth) are closer than the duplicate threshold
    canvas = glyphs._Canvas(32)
    some = [c for c in classes if c[0] in ("cmss10.ttf", "DejaVuSans.ttf")]
    x = np.stack([canvas.draw(glyphs._outline(*c), glyphs._placement(glyphs._outline(*c), 32)).ravel()
                  for c in some]).astype(np.float64)
    dist = np.abs(x[:, None] - x[None]).sum(-1) / (x.sum(1)[:, None] + x.sum(1)[None])
    assert dist[np.triu_indices(len(some), 1)].min() >= glyphs.DUPLICATE_DISTANCE
    # 'o' and 'O' keep their sizes (no stretching to the frame), so both survive
    assert ("DejaVuSans.ttf", "o") in classes and ("DejaVuSans.ttf", "O") in classes


def test_pretrain_and_stream_classes_are_disjoint_and_cover_everything():
    pre, stream = glyphs.select_glyph_classes("pretrain"), glyphs.select_glyph_classes("stream")
    assert not set(pre) & set(stream)
    assert set(pre) | set(stream) == set(glyphs.glyph_classes())
    assert {c for _, c in pre}.isdisjoint({c for _, c in stream})  # no stream character in any font
    assert {c for _, c in stream} == set(glyphs.CHARSET[1::2])  # the documented rule: odd positions
    full = load_source("glyphs", cache_dir=None, samples_per_class=1, max_classes=40, seed=1)
    a, b = split_pretrain_stream(full)
    assert a.name == "glyphs:pretrain" and b.name == "glyphs:stream"
    assert not set(a.class_names) & set(b.class_names)
    assert set(a.class_names) | set(b.class_names) == set(full.class_names)
    assert all(glyphs.is_stream_char(n[-1]) for n in b.class_names)
    assert len(a) + len(b) == len(full)


def test_other_sources_split_half_and_half_with_a_fixed_rule():
    images = make_imageset("toy", np.zeros((10, 1, 8, 8)), np.arange(10), [f"k{i}" for i in range(10)])
    a1, b1 = split_pretrain_stream(images)
    a2, _ = split_pretrain_stream(images)
    assert a1.n_classes == b1.n_classes == 5 and not set(a1.class_names) & set(b1.class_names)
    assert a1.class_names == a2.class_names
    assert a1.labels.tolist() == list(range(5))  # relabelled 0..k-1


def test_glyphs_are_deterministic_per_seed(tmp_path):
    a = load_source("glyphs:pretrain", seed=3, cache_dir=tmp_path / "a", **SMALL)
    b = load_source("glyphs:pretrain", seed=3, cache_dir=tmp_path / "b", **SMALL)  # rendered again
    c = load_source("glyphs:pretrain", seed=4, cache_dir=tmp_path / "a", **SMALL)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.sha256 == b.sha256 and a.class_names == c.class_names
    assert not np.array_equal(a.images, c.images) and a.sha256 != c.sha256


def test_a_class_renders_the_same_whatever_else_is_rendered():
    pair = glyphs.select_glyph_classes("stream")[:2]
    both = glyphs.render_glyphs(pair, 3, 32, seed=0)
    alone = glyphs.render_glyphs(pair[1:], 3, 32, seed=0)
    np.testing.assert_array_equal(both[3:], alone)


def test_second_load_reads_the_cache_and_renders_nothing(cache, monkeypatch):
    first = load_source("glyphs:stream", cache_dir=cache, **SMALL)
    assert [p.name.startswith("glyphs-") and p.suffix == ".npz" for p in cache.iterdir()] == [True]

    def no_rendering(*args, **kwargs):
        raise AssertionError("rendered although the cache holds this set")

    monkeypatch.setattr(glyphs, "render_glyphs", no_rendering)
    second = load_source("glyphs:stream", cache_dir=cache, **SMALL)
    assert second.sha256 == first.sha256 and second.class_names == first.class_names
    with pytest.raises(AssertionError, match="rendered"):  # the patch bites on a miss
        load_source("glyphs:stream", cache_dir=cache, seed=9, **SMALL)


def test_a_corrupt_cache_file_is_rendered_again(cache):
    first = load_source("glyphs:stream", cache_dir=cache, **SMALL)
    (path,) = cache.iterdir()
    path.write_bytes(b"not an npz")
    assert load_source("glyphs:stream", cache_dir=cache, **SMALL).sha256 == first.sha256


def test_to_rgb_repeats_the_channel(cache):
    s = load_source("glyphs:stream", cache_dir=cache, **SMALL)
    rgb = to_rgb(s)
    assert rgb.images.shape == (24, 3, 32, 32)
    np.testing.assert_array_equal(rgb.images[:, 2], s.images[:, 0])


def test_resize_keeps_a_constant_image_constant_and_averages_when_shrinking():
    np.testing.assert_allclose(resize(np.full((2, 8, 8), 0.3), 32), 0.3, atol=1e-6)
    dots = np.zeros((96, 96), dtype=np.float32)
    dots[::3, ::3] = 1.0  # one lit pixel per 3x3 block: bilinear alone samples between dots and reads 0
    np.testing.assert_allclose(resize(dots, 32), 1 / 9, atol=1e-6)


def test_digits(monkeypatch):
    pytest.importorskip("sklearn")
    d = load_source("digits", size=16)
    assert d.images.shape == (1797, 1, 16, 16) and d.n_classes == 10
    assert d.images.min() == 0.0 and 0.9 < d.images.max() <= 1.0
    assert d.class_names == tuple(str(i) for i in range(10))


def test_digits_without_scikit_learn_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(DataError, match="needs scikit-learn"):
        load_source("digits")


def write_png(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(path, rgb)


def test_image_folder_gray_and_rgb(tmp_path):
    red = np.zeros((40, 60, 3)); red[..., 0] = 1.0
    white = np.ones((20, 20, 3))
    write_png(tmp_path / "b_white" / "1.png", white)
    write_png(tmp_path / "a_red" / "x.png", red)
    write_png(tmp_path / "a_red" / "y.PNG", red)
    (tmp_path / "a_red" / "notes.txt").write_text("ignored")
    gray = load_source(f"folder:{tmp_path}", size=8)
    assert gray.class_names == ("a_red", "b_white") and gray.labels.tolist() == [0, 0, 1]
    assert gray.images.shape == (3, 1, 8, 8)
    np.testing.assert_allclose(gray.images[0], 0.299, atol=1e-3)  # luma of pure red
    np.testing.assert_allclose(gray.images[2], 1.0, atol=1e-6)
    rgb = load_source(f"folder:{tmp_path}", size=8, color="rgb")
    assert rgb.images.shape == (3, 3, 8, 8)
    np.testing.assert_allclose(rgb.images[0].mean(axis=(1, 2)), [1.0, 0.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("make, spec, words", [
    (lambda p: None, "nosuchsource", "unknown image source 'nosuchsource'"),
    (lambda p: None, "glyphs:everything", "unknown glyph split 'everything'"),
    (lambda p: None, "folder:", "needs a path"),
    (lambda p: None, "folder:{p}/missing", "image folder not found"),
    (lambda p: None, "folder:{p}", "has no class sub-folders"),
    (lambda p: (p / "cat").mkdir(), "folder:{p}", "class folder .*cat has no images"),
    (lambda p: (p / "cat").mkdir() or (p / "cat" / "broken.png").write_bytes(b"garbage"),
     "folder:{p}", "cannot read image .*broken.png"),
])
def test_bad_sources_are_one_line_errors(tmp_path, make, spec, words):
    make(tmp_path)
    with pytest.raises(DataError, match=words) as e:
        load_source(spec.format(p=tmp_path))
    assert "\n" not in str(e.value)


def test_jpeg_without_pillow_says_so(tmp_path, monkeypatch):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.jpg").write_bytes(b"\xff\xd8\xff")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DataError, match="JPEG .*a.jpg needs Pillow"):
        load_source(f"folder:{tmp_path}")


def test_too_many_classes_asked_is_an_error(cache):
    with pytest.raises(DataError, match="asks for more"):
        load_source("glyphs:stream", cache_dir=cache, max_classes=100_000, samples_per_class=1)
