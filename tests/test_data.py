"""Tests of routemem.data: tokenizers, corpora, splits and cache, samplers."""

import os

import numpy as np
import pytest
import torch

from routemem.data import (
    SPLITS,
    ByteTokenizer,
    CharTokenizer,
    WindowSampler,
    build_tokenizer,
    eval_batches,
    list_corpora,
    load_corpus,
    load_splits,
    split_bounds,
    tokenizer_from_dict,
)
from routemem.data.corpora import Corpus, make_corpus
from routemem.errors import DataError

TEXT = "Hello, wörld! ünïcödé → 漢字 🙂\nsecond line\ttab"


# --- tokenizers ---------------------------------------------------------------------------


def test_byte_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids.dtype == np.uint16
    assert len(ids) == len(TEXT.encode("utf-8"))
    assert int(ids.max()) < tok.vocab_size == 256
    assert tok.decode(ids) == TEXT
    assert tok.decode(torch.from_numpy(ids.astype(np.int64))) == TEXT


def test_byte_decode_replaces_cut_multibyte():
    tok = ByteTokenizer()
    ids = tok.encode("é")[:1]  # first byte of a two-byte sequence
    assert tok.decode(ids) == "\ufffd"


def test_char_round_trip_and_vocab():
    tok = CharTokenizer.from_text(TEXT)
    assert tok.vocab_size == 1 + len(set(TEXT))
    assert tok.chars == "".join(sorted(set(TEXT)))
    ids = tok.encode(TEXT)
    assert ids.dtype == np.uint16
    assert ids.min() >= 1  # every character was seen when fitting
    assert tok.decode(ids) == TEXT


def test_char_unknown_maps_to_zero():
    tok = CharTokenizer.from_text("abc")
    ids = tok.encode("abzc\U0010ffff!")
    assert ids.tolist() == [1, 2, 0, 3, 0, 0]
    assert tok.decode(ids) == "ab\ufffdc\ufffd\ufffd"


def test_unknown_chars_names_each_unseen_character_once():
    tok = CharTokenizer.from_text("abc ")
    assert tok.unknown_chars("a \u20ac b \u00e9\u20ac\U0001F600") == "\u00e9\u20ac\U0001F600"
    assert tok.unknown_chars("cab ") == "" and tok.unknown_chars("") == ""
    assert ByteTokenizer().unknown_chars("\u20ac") == ""  # bytes represent any text


def test_decode_rejects_out_of_vocab():
    with pytest.raises(DataError, match="outside"):
        CharTokenizer.from_text("ab").decode([5])


@pytest.mark.parametrize("kind", ["byte", "char"])
def test_tokenizer_dict_round_trip(kind):
    tok = build_tokenizer(kind, TEXT)
    d = tok.to_dict()
    assert d["kind"] == kind
    again = tokenizer_from_dict(d)
    assert again.vocab_size == tok.vocab_size
    np.testing.assert_array_equal(again.encode(TEXT + "?"), tok.encode(TEXT + "?"))


def test_unknown_tokenizer_kind():
    with pytest.raises(DataError, match="bpe"):
        build_tokenizer("bpe", "x")
    with pytest.raises(DataError, match="bpe"):
        tokenizer_from_dict({"kind": "bpe"})


# --- corpora ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pycode():
    return load_corpus("pycode")


def test_pydocs_deterministic():
    a, b = load_corpus("pydocs"), load_corpus("pydocs")
    assert a.sha256 == b.sha256 and len(a.text) > 10_000
    assert "for" in a.text


def test_pycode_deterministic_and_excludes_tests(pycode):
    assert load_corpus("pycode").sha256 == pycode.sha256
    assert 0 < len(pycode.text) <= 8_000_000
    headers = [line[len("# file: "):] for line in pycode.text.splitlines() if line.startswith("# file: ")]
    assert headers and headers == sorted(headers)
    for path in headers:
        parts = path.split("/")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts[:-1]), path
        assert not parts[-1].startswith("test_"), path


def test_unknown_corpus_lists_known():
    with pytest.raises(DataError, match="pydocs.*shakespeare"):
        load_corpus("nope")


def test_missing_data_dir_mentions_env(monkeypatch):
    monkeypatch.delenv("ROUTEMEM_DATA", raising=False)
    with pytest.raises(DataError, match="ROUTEMEM_DATA"):
        load_corpus("shakespeare")


def test_missing_file_in_data_dir_names_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTEMEM_DATA", str(tmp_path))
    with pytest.raises(DataError, match="tinyshakespeare.txt") as err:
        load_corpus("shakespeare")
    assert str(tmp_path) in str(err.value)


def test_data_dir_argument_wins_over_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTEMEM_DATA", str(tmp_path / "elsewhere"))
    (tmp_path / "warandpeace.txt").write_text("Well, Prince, so Genoa and Lucca...\n", encoding="utf-8")
    corpus = load_corpus("warandpeace", data_dir=str(tmp_path))
    assert corpus.text.startswith("Well")
    assert corpus.source == str(tmp_path / "warandpeace.txt")


def test_file_corpus(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text(TEXT, encoding="utf-8")
    corpus = load_corpus(f"file:{path}")
    assert isinstance(corpus, Corpus)
    assert corpus.text == TEXT
    assert corpus.sha256 == make_corpus("x", TEXT, "").sha256
    assert corpus.source == str(path)


def test_file_corpus_missing_names_path(tmp_path):
    path = tmp_path / "absent.txt"
    with pytest.raises(DataError, match="absent.txt"):
        load_corpus(f"file:{path}")


@pytest.mark.parametrize("content", [b"", b"  \n\t\n"])
def test_empty_corpus(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match="empty"):
        load_corpus(f"file:{path}")


def test_non_utf8_names_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait".encode("utf-8") + b" na\xefve")
    with pytest.raises(DataError, match="byte offset 16") as err:
        load_corpus(f"file:{path}")
    assert "latin1.txt" in str(err.value)


def test_list_corpora(monkeypatch, tmp_path):
    monkeypatch.delenv("ROUTEMEM_DATA", raising=False)
    (tmp_path / "tinyshakespeare.txt").write_text("First Citizen:\n", encoding="utf-8")
    rows = {row["name"]: row for row in list_corpora(data_dir=str(tmp_path))}
    assert set(rows) == {"pydocs", "pycode", "shakespeare", "warandpeace"}
    assert rows["pydocs"]["available"] and rows["pydocs"]["chars"] > 0
    assert rows["shakespeare"]["available"] and rows["shakespeare"]["bytes"] == 15
    assert not rows["warandpeace"]["available"] and rows["warandpeace"]["chars"] is None
    assert "warandpeace.txt" in rows["warandpeace"]["reason"]


def _shared_data_dir():
    """$ROUTEMEM_DATA: the folder with the file corpora (CI sets it; the project ships no data)."""
    return os.environ.get("ROUTEMEM_DATA") or None


def test_shakespeare_loads():
    data_dir = _shared_data_dir()
    if data_dir is None or not os.path.isfile(os.path.join(data_dir, "tinyshakespeare.txt")):
        pytest.skip("tinyshakespeare.txt not found: set ROUTEMEM_DATA to the folder that holds it")
    corpus = load_corpus("shakespeare", data_dir=data_dir)
    assert corpus.text.startswith("First Citizen")
    assert len(corpus.text) > 1_000_000


# --- splits and cache ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7, 20, 1000, 123_457])
def test_split_bounds_cover_without_overlap(n):
    bounds = split_bounds(n)
    assert tuple(bounds) == SPLITS
    assert bounds["train"][0] == 0 and bounds["test"][1] == n
    assert bounds["train"][1] == bounds["val"][0] and bounds["val"][1] == bounds["test"][0]
    assert all(a <= b for a, b in bounds.values())
    if n == 1000:
        assert [b - a for a, b in bounds.values()] == [900, 50, 50]


def test_load_splits_cache(tmp_path):
    corpus = load_corpus("pydocs")
    tok = build_tokenizer("char", corpus.text)
    first = load_splits(corpus, tok, cache_dir=str(tmp_path))
    files = list(tmp_path.glob("tokens-*.npy"))
    assert len(files) == 1 and corpus.sha256[:16] in files[0].name
    assert not list(tmp_path.glob("*.tmp"))
    second = load_splits(corpus, tok, cache_dir=str(tmp_path))
    assert isinstance(second["train"], np.memmap)  # served from the cache file
    for split in SPLITS:
        np.testing.assert_array_equal(first[split], second[split])
    whole = np.concatenate([second[s] for s in SPLITS])
    np.testing.assert_array_equal(whole, tok.encode(corpus.text))
    # Another tokenizer gets its own file.
    load_splits(corpus, ByteTokenizer(), cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("tokens-*.npy"))) == 2


def test_load_splits_unwritable_cache_falls_back(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")  # a file where the cache dir should be: makedirs fails
    corpus = make_corpus("tiny", "abcdefghij" * 10, "test")
    splits = load_splits(corpus, ByteTokenizer(), cache_dir=str(blocker / "cache"))
    assert sum(len(v) for v in splits.values()) == 100


def test_load_splits_default_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTEMEM_CACHE", str(tmp_path))
    load_splits(make_corpus("tiny", "hello world", "test"), ByteTokenizer())
    assert len(list(tmp_path.glob("tokens-*.npy"))) == 1


# --- samplers -----------------------------------------------------------------------------


@pytest.fixture
def tokens():
    return np.arange(1000, dtype=np.uint16)  # token value == position: windows are easy to check


def test_sampler_deterministic_per_step(tokens):
    a, b = WindowSampler(tokens, 16, seed=3), WindowSampler(tokens, 16, seed=3)
    np.testing.assert_array_equal(a.global_batch(5, 8), b.global_batch(5, 8))
    assert not np.array_equal(a.global_batch(5, 8), a.global_batch(6, 8))
    assert not np.array_equal(a.global_batch(5, 8), WindowSampler(tokens, 16, seed=4).global_batch(5, 8))
    x1, y1 = a.get_batch(5, 8)
    x2, y2 = b.get_batch(5, 8)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_sampler_windows_and_shift(tokens):
    sampler = WindowSampler(tokens, 16, seed=0)
    x, y = sampler.get_batch(0, 8)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)  # tokens are positions, so each window is contiguous
    assert int(y.max()) < len(tokens)
    starts = sampler.global_batch(0, 8)
    np.testing.assert_array_equal(x[:, 0].numpy(), starts)


def test_sampler_can_reach_last_window():
    sampler = WindowSampler(np.arange(5, dtype=np.uint16), 4, seed=0)  # exactly one window
    x, y = sampler.get_batch(0, 2)
    assert x.tolist() == [[0, 1, 2, 3]] * 2 and y.tolist() == [[1, 2, 3, 4]] * 2


@pytest.mark.parametrize("world_size,n_micro", [(2, 1), (4, 2), (1, 3)])
def test_union_over_ranks_is_global_batch(tokens, world_size, n_micro):
    sampler = WindowSampler(tokens, 8, seed=1)
    batch_size = 12 * world_size * n_micro // np.gcd(12, world_size * n_micro)
    full_x, full_y = sampler.get_batch(7, batch_size)
    pieces, per_rank = [], {}
    for micro in range(n_micro):
        for rank in range(world_size):
            x, y = sampler.get_batch(7, batch_size, rank=rank, world_size=world_size,
                                     micro=micro, n_micro=n_micro)
            assert x.shape == (batch_size // (world_size * n_micro), 8)
            assert torch.equal(y[:, :-1], x[:, 1:])
            pieces.append(x)
            per_rank.setdefault(rank, []).append(x)
    together = torch.cat(pieces)
    assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, full_x.tolist()))
    if world_size > 1:
        assert not torch.equal(torch.cat(per_rank[0]), torch.cat(per_rank[1]))


def test_batch_not_divisible(tokens):
    with pytest.raises(DataError, match="divisible"):
        WindowSampler(tokens, 8, seed=0).get_batch(0, 10, world_size=4)


def test_short_corpus_error():
    with pytest.raises(DataError, match="corpus 'x' split 'train' has 8 tokens.*9"):
        WindowSampler(np.arange(8, dtype=np.uint16), 8, seed=0, name="corpus 'x' split 'train'")


@pytest.mark.parametrize("n,seq_len,batch_size,max_tokens", [
    (1000, 16, 4, None), (17, 16, 4, None), (101, 10, 3, None), (50, 7, 2, 20), (2, 5, 1, None),
])
def test_eval_batches_cover_each_target_once(n, seq_len, batch_size, max_tokens):
    tokens = np.arange(n, dtype=np.uint16)
    targets = []
    for x, y in eval_batches(tokens, seq_len, batch_size, max_tokens=max_tokens):
        assert x.dtype == torch.int64 and x.shape == y.shape and x.shape[0] <= batch_size
        assert x.shape[1] <= seq_len
        assert torch.equal(y, x + 1)
        targets.extend(y.flatten().tolist())
    expected = n - 1 if max_tokens is None else min(n - 1, max_tokens)
    assert targets == list(range(1, expected + 1))


def test_eval_batches_too_short():
    with pytest.raises(DataError, match="1 tokens"):
        list(eval_batches(np.arange(1, dtype=np.uint16), 8, 2))
