"""Tests of routemem.data.mqar: MQAR and its overwrite variant, re-derived by scanning each row."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routemem.data.mqar import (
    _distinct,
    multiquery_ar,
    multiquery_ar_overwrite,
    recall_accuracy,
)
from routemem.errors import DataError

IGNORE = -100


def check_rows(inputs, labels, vocab_size, num_kv_pairs, num_rebound=0, kinds=None):
    """Re-derive every label from the row's own context; assert the whole MQAR layout."""
    n, seq_len = inputs.shape
    kv, context = num_kv_pairs, 2 * (num_kv_pairs + num_rebound)
    half = vocab_size // 2
    for i in range(n):
        x, y = inputs[i], labels[i]
        keys, values = x[0 : 2 * kv : 2], x[1:context:2]
        rebound = x[2 * kv : context : 2]
        assert ((keys >= 1) & (keys < half)).all()
        assert ((values >= half) & (values < vocab_size)).all()
        assert len(set(keys.tolist())) == kv
        assert len(set(values.tolist())) == kv + num_rebound
        assert len(set(rebound.tolist())) == num_rebound and set(rebound.tolist()) <= set(keys.tolist())
        binding = {}
        for j in range(0, context, 2):  # scan in order: the latest binding wins
            binding[int(x[j])] = int(x[j + 1])
        t = np.flatnonzero(y != IGNORE)
        assert len(t) == kv
        assert (t >= context).all() and ((t - context) % 2 == 0).all()
        assert sorted(x[t].tolist()) == sorted(keys.tolist())  # each key queried once, at t itself
        assert [binding[int(k)] for k in x[t]] == y[t].tolist()
        if kinds is not None:
            assert (kinds[i][y == IGNORE] == 0).all()
            expected = [2 if k in set(rebound.tolist()) else 1 for k in x[t].tolist()]
            assert kinds[i][t].tolist() == expected


def query_gaps(labels, context):
    """Gap index (0-based) of every labelled position."""
    _, t = np.nonzero(labels != IGNORE)
    return (t - context) // 2


# --- multiquery_ar -------------------------------------------------------------------------


def test_shapes_and_dtypes():
    x, y = multiquery_ar(vocab_size=100, seq_len=64, num_kv_pairs=8, num_examples=5)
    assert x.shape == y.shape == (5, 64)
    assert x.dtype == y.dtype == np.int64
    x, y, k = multiquery_ar_overwrite(100, 64, 8, 3, 5)
    assert x.shape == y.shape == k.shape == (5, 64)
    assert k.dtype == np.int8


@pytest.mark.parametrize(
    "vocab_size, seq_len, num_kv_pairs",
    [(100, 64, 8), (8192, 256, 16), (130, 128, 32), (10, 8, 2)],  # (130, 128, 32): every gap used
)
def test_layout_and_labels(vocab_size, seq_len, num_kv_pairs):
    x, y = multiquery_ar(vocab_size, seq_len, num_kv_pairs, num_examples=40, seed=3)
    check_rows(x, y, vocab_size, num_kv_pairs)


def test_label_sits_on_query_key_not_on_the_answer_slot():
    # Shifted for next-token prediction: labels[t] is the target for inputs[t]. The value is not
    # written after the query (as in zoology), so the next input is noise, not the answer.
    x, y = multiquery_ar(200, 128, 8, num_examples=400, power_a=1.0, seed=1)  # power_a=1: uniform
    rows, t = np.nonzero(y != IGNORE)
    assert (x[rows, t] < 100).all()  # a key sits at every labelled position
    assert (y[:, -1] == IGNORE).all()  # the last input's target lies beyond the sequence
    assert (t == 128 - 2).any()  # ... but the last even slot of the query region is used
    assert np.mean(x[rows, t + 1] == y[rows, t]) < 0.05


def test_filler_is_uniform_noise():
    vocab_size, context = 1000, 16
    x, y = multiquery_ar(vocab_size, 256, 8, num_examples=200, seed=0)
    filler = np.ones_like(x, dtype=bool)
    filler[:, :context] = False
    filler[y != IGNORE] = False
    noise = x[filler]
    assert abs(noise.mean() - (vocab_size - 1) / 2) < 10
    assert noise.min() < 10 and noise.max() > vocab_size - 10
    assert np.mean(noise >= vocab_size // 2) == pytest.approx(0.5, abs=0.02)  # values too, not only keys


def test_deterministic_per_seed():
    a = multiquery_ar(500, 128, 16, 20, seed=7)
    b = multiquery_ar(500, 128, 16, 20, seed=7)
    c = multiquery_ar(500, 128, 16, 20, seed=8)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_first_key_gap_follows_power_law():
    # The first context key gets the first draw, whose law is exactly p_i ∝ i^(power_a - 1).
    seq_len, kv, n = 64, 4, 20000
    space = (seq_len - 2 * kv) // 2
    for power_a in (0.01, 0.5, 3.0):
        x, y = multiquery_ar(200, seq_len, kv, n, power_a=power_a, seed=0)
        rows, t = np.nonzero((y != IGNORE) & (x == x[:, :1]))
        assert np.array_equal(rows, np.arange(n))
        freq = np.bincount((t - 2 * kv) // 2, minlength=space) / n
        p = np.arange(1, space + 1) ** (power_a - 1.0)
        assert 0.5 * np.abs(freq - p / p.sum()).sum() < 0.02  # total variation distance


def test_small_gaps_likelier_than_large():
    seq_len, kv = 128, 4
    space = (seq_len - 2 * kv) // 2
    _, y = multiquery_ar(300, seq_len, kv, 3000, seed=2)
    counts = np.bincount(query_gaps(y, 2 * kv), minlength=space)
    quarter = space // 4
    assert counts[:quarter].sum() > 3 * counts[-quarter:].sum()
    assert counts[0] > counts[space // 2] > 0


INVALID = [
    (dict(vocab_size=64), "vocab_size"),  # vocab_size <= seq_len
    (dict(seq_len=63, vocab_size=1000), "seq_len"),
    (dict(num_kv_pairs=17), "num_kv_pairs"),  # 4 * 17 > 64
    (dict(num_kv_pairs=0), "num_kv_pairs"),
    (dict(num_examples=0), "num_examples"),
    (dict(power_a=0.0), "power_a"),
    (dict(power_a=-1.0), "power_a"),
]


@pytest.mark.parametrize("override, name", INVALID)
def test_invalid_settings_name_the_parameter(override, name):
    kw = dict(vocab_size=100, seq_len=64, num_kv_pairs=8, num_examples=4) | override
    with pytest.raises(DataError, match=name):
        multiquery_ar(**kw)
    with pytest.raises(ValueError):  # DataError is a ValueError
        multiquery_ar_overwrite(num_rebound=0, **kw)


@pytest.mark.parametrize(
    "override",
    [dict(num_rebound=-1), dict(num_rebound=9), dict(num_kv_pairs=15, num_rebound=3)],  # 60 + 6 > 64
)
def test_invalid_rebound_names_num_rebound(override):
    kw = dict(vocab_size=100, seq_len=64, num_kv_pairs=8, num_examples=4) | override
    with pytest.raises(DataError, match="num_rebound"):
        multiquery_ar_overwrite(**kw)
    kw["num_rebound"] = 0
    multiquery_ar_overwrite(**kw)  # the same setting without re-bindings is fine


def test_distinct_is_uniform_over_ordered_rows():
    draws = _distinct(np.random.default_rng(0), 1, 5, 24000, 2)  # 4 values, 12 ordered pairs
    assert (draws[:, 0] != draws[:, 1]).all()
    counts = np.bincount((draws[:, 0] - 1) * 4 + (draws[:, 1] - 1), minlength=16)
    counts = counts[counts > 0]
    assert len(counts) == 12 and counts.min() > 1800 and counts.max() < 2200


# --- overwrite variant ---------------------------------------------------------------------


@pytest.mark.parametrize("num_rebound", [0, 1, 5, 8])
def test_overwrite_layout_kinds_and_latest_value(num_rebound):
    vocab_size, seq_len, kv = 100, 64, 8
    x, y, k = multiquery_ar_overwrite(vocab_size, seq_len, kv, num_rebound, 40, seed=4)
    check_rows(x, y, vocab_size, kv, num_rebound, kinds=k)
    assert ((k == 2).sum(axis=1) == num_rebound).all()
    assert ((k == 1).sum(axis=1) == kv - num_rebound).all()


def test_overwrite_without_rebinding_is_mqar():
    a = multiquery_ar(300, 128, 16, 30, power_a=0.1, seed=5)
    b = multiquery_ar_overwrite(300, 128, 16, 0, 30, power_a=0.1, seed=5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_overwrite_labels_differ_from_first_binding():
    x, y, k = multiquery_ar_overwrite(100, 64, 8, 4, 50, seed=6)
    rows, t = np.nonzero(k == 2)
    first = {(int(r), int(x[r, j])): int(x[r, j + 1]) for r in range(50) for j in range(0, 16, 2)}
    assert all(first[(int(r), int(x[r, s]))] != y[r, s] for r, s in zip(rows, t))


@settings(max_examples=25, deadline=None)
@given(
    kv=st.integers(1, 12),
    extra=st.integers(0, 20),
    frac=st.floats(0, 1),
    power_a=st.floats(0.01, 4.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_overwrite_property(kv, extra, frac, power_a, seed):
    num_rebound = int(frac * kv)
    seq_len = 4 * kv + 2 * num_rebound + 2 * extra
    vocab_size = seq_len + 1 + extra
    x, y, k = multiquery_ar_overwrite(vocab_size, seq_len, kv, num_rebound, 3, power_a, seed)
    check_rows(x, y, vocab_size, kv, num_rebound, kinds=k)


# --- recall_accuracy -----------------------------------------------------------------------


def test_recall_accuracy_perfect_and_wrong():
    x, y, k = multiquery_ar_overwrite(100, 64, 8, 3, 10, seed=0)
    perfect = np.where(y == IGNORE, 0, y)  # predictions at unlabelled positions do not count
    out = recall_accuracy(perfect, y, k)
    assert out["accuracy"] == out["stability"] == out["plasticity"] == 1.0
    assert out["n"] == 80 and out["n_stability"] == 50 and out["n_plasticity"] == 30
    wrong = np.where(y == IGNORE, y, y + 1)  # right everywhere except where it counts
    assert recall_accuracy(wrong, y)["accuracy"] == 0.0
    assert "stability" not in recall_accuracy(wrong, y)


def test_recall_accuracy_splits_by_kind():
    x, y, k = multiquery_ar_overwrite(100, 64, 8, 2, 10, seed=1)
    pred = np.where(k == 2, y + 1, y)  # forgets nothing old, learns nothing new
    out = recall_accuracy(pred, y, k)
    assert out["stability"] == 1.0 and out["plasticity"] == 0.0
    assert out["accuracy"] == pytest.approx(6 / 8)
    x, y, k = multiquery_ar_overwrite(100, 64, 8, 0, 10, seed=1)
    out = recall_accuracy(y, y, k)
    assert out["stability"] == 1.0 and math.isnan(out["plasticity"]) and out["n_plasticity"] == 0


def test_recall_accuracy_shape_mismatch():
    _, y = multiquery_ar(100, 64, 8, 4)
    with pytest.raises(DataError, match="predictions"):
        recall_accuracy(y[:, :-1], y)


# --- filler: random tokens or zeros (zoology's random_non_queries) -------------------------


@pytest.mark.parametrize("num_rebound", [0, 3])
def test_zero_filler_is_zero_exactly_outside_context_and_queries(num_rebound):
    """random_filler=False: token 0 at every position that is neither a context pair nor a query
    key, as zoology's random_non_queries=False; keys (>= 1) and values (>= V/2) are never 0."""
    vocab, seq_len, kv = 64, 48, 6
    x, y, kinds = multiquery_ar_overwrite(vocab, seq_len, kv, num_rebound, 50, seed=4, random_filler=False)
    context = 2 * (kv + num_rebound)
    placed = np.zeros(x.shape, dtype=bool)
    placed[:, :context] = True
    placed |= y != IGNORE  # the query keys sit where the labels are
    assert (x[~placed] == 0).all()
    assert (x[placed] != 0).all()
    check_rows(x, y, vocab, kv, num_rebound, kinds)


def test_filler_choice_changes_only_the_filler():
    """Same seed: the same keys, values, query positions and labels with either filler; the random
    filler is not all zeros (so the two really differ)."""
    noisy, y1 = multiquery_ar(200, 128, 16, 40, seed=9)
    zeros, y2 = multiquery_ar(200, 128, 16, 40, seed=9, random_filler=False)
    np.testing.assert_array_equal(y1, y2)
    filler = zeros == 0
    np.testing.assert_array_equal(noisy[~filler], zeros[~filler])
    assert (noisy[filler] != 0).mean() > 0.9
