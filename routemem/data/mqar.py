"""Multi-query associative recall (MQAR, as in zoology), an in-context overwrite variant, and its metric.

A sequence is ``k1 v1 k2 v2 ...`` (keys from ``[1, V/2)``, values from ``[V/2, V)``, distinct
within a sequence), then every key once more as a query at an even offset of the remaining
region, with power-law gaps (short ones likelier), and filler everywhere else: uniform noise tokens
from ``[0, V)`` (``random_filler=True``, zoology's default ``random_non_queries=True``) or token 0
(``random_filler=False``, zoology's ``random_non_queries=False``, which the Palimpsa authors'
MQAR configurations use). The label at a query key's position is that key's value; all other labels
are -100 (ignored). Only the query keys are placed in the inputs: the value is never shown after a
query, so it must be recalled.

numpy only, vectorised over examples: 100k sequences of length 256 take 1-2 s on two CPU cores.
"""

from __future__ import annotations

import numpy as np

from routemem.errors import DataError

IGNORE = -100
STABILITY, PLASTICITY = 1, 2  # ``kinds``: query of a key bound once / of a key bound again


def _distinct(rng: np.random.Generator, low: int, high: int, n: int, k: int) -> np.ndarray:
    """``[n, k]`` draws from ``[low, high)``, distinct within each row, uniform over such rows.

    Draw with replacement, then redraw every repeat (all but a value's first occurrence) until
    none is left. The procedure treats all values alike, so each ordered row of distinct values
    is equally likely; unlike an argsort of an ``[n, high - low]`` random matrix it needs only
    ``O(n k)`` memory, which matters for a vocabulary of 8192.
    """
    dtype = np.int16 if high <= np.iinfo(np.int16).max else np.int64  # int16: stable sort is a radix sort
    out = rng.integers(low, high, size=(n, k), dtype=dtype)
    rows = np.arange(n)
    while rows.size:
        sub = out[rows]
        order = np.argsort(sub, axis=1, kind="stable")  # stable: the first occurrence stays first
        s = np.take_along_axis(sub, order, axis=1)
        rep_sorted = np.zeros(sub.shape, dtype=bool)
        rep_sorted[:, 1:] = s[:, 1:] == s[:, :-1]
        rep = np.zeros(sub.shape, dtype=bool)
        np.put_along_axis(rep, order, rep_sorted, axis=1)
        sub[rep] = rng.integers(low, high, size=int(rep.sum()), dtype=dtype)
        out[rows] = sub
        rows = rows[rep.any(axis=1)]
    return out.astype(np.int64)


def _power_law_gaps(rng: np.random.Generator, space: int, n: int, k: int, power_a: float) -> np.ndarray:
    """``[n, k]`` distinct gaps from ``range(space)``, ``P(gap = i - 1) ∝ power_a * i**(power_a - 1)``.

    Sequential sampling without replacement (``rng.choice(space, k, replace=False, p=p)`` per
    row), vectorised as an exponential race: the k smallest ``Exp(1) / p_i`` (compared as logs), in
    increasing order, have the law of k successive draws (Gumbel-top-k): ``gaps[:, 0]`` follows ``p``.
    """
    log_inv_p = (1.0 - power_a) * np.log(np.arange(1, space + 1))  # log(1 / p) up to a constant
    exp = rng.standard_exponential((n, space), dtype=np.float32)
    arrival = np.log(np.maximum(exp, np.finfo(np.float32).tiny)) + log_inv_p.astype(np.float32)  # no log(0)
    top = np.argpartition(arrival, k - 1, axis=1)[:, :k]
    order = np.argsort(np.take_along_axis(arrival, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def _check(vocab_size, seq_len, num_kv_pairs, num_rebound, num_examples, power_a, overwrite):
    """Raise ``DataError`` naming the first bad parameter."""
    if num_kv_pairs < 1:
        raise DataError(f"num_kv_pairs must be >= 1, got {num_kv_pairs}")
    if num_examples < 1:
        raise DataError(f"num_examples must be >= 1, got {num_examples}")
    if not power_a > 0:
        raise DataError(f"power_a must be > 0, got {power_a}")
    if not 0 <= num_rebound <= num_kv_pairs:
        raise DataError(f"num_rebound must be in [0, num_kv_pairs={num_kv_pairs}], got {num_rebound}")
    if seq_len % 2:
        raise DataError(f"seq_len must be even (keys and values come in pairs), got {seq_len}")
    if vocab_size <= seq_len:
        raise DataError(f"vocab_size must be > seq_len={seq_len}, got {vocab_size}")
    if overwrite and 4 * num_kv_pairs + 2 * num_rebound > seq_len:
        raise DataError(
            f"seq_len={seq_len} too short for num_kv_pairs={num_kv_pairs} and num_rebound={num_rebound}:"
            " need 4 * num_kv_pairs + 2 * num_rebound <= seq_len"
        )
    if 4 * num_kv_pairs > seq_len:
        raise DataError(f"num_kv_pairs={num_kv_pairs} too large: need 4 * num_kv_pairs <= seq_len={seq_len}")
    if vocab_size // 2 - 1 < num_kv_pairs:  # implied by the checks above; kept as a guard
        raise DataError(f"vocab_size={vocab_size} has fewer than num_kv_pairs={num_kv_pairs} keys")
    if vocab_size - vocab_size // 2 < num_kv_pairs + num_rebound:  # likewise implied
        raise DataError(f"vocab_size={vocab_size} has fewer than num_kv_pairs + num_rebound values")


def multiquery_ar_overwrite(
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    num_rebound: int,
    num_examples: int,
    power_a: float = 0.01,
    seed: int = 0,
    random_filler: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MQAR where ``num_rebound`` keys are bound a second time, to a new value, in the context.

    The context is the ``num_kv_pairs`` pairs, then the re-bindings (distinct keys among the
    first ones, each with a value unused so far in its sequence). The answer to a re-bound key's
    query is its latest value: this separates keeping old bindings (``kinds == 1``, stability)
    from overwriting them (``kinds == 2``, plasticity). Returns ``(inputs, labels, kinds)``,
    int64, int64 and int8 arrays of shape ``[num_examples, seq_len]``.
    """
    _check(vocab_size, seq_len, num_kv_pairs, num_rebound, num_examples, power_a, overwrite=True)
    rng = np.random.default_rng(seed)
    n, kv, r = num_examples, num_kv_pairs, num_rebound
    context = 2 * (kv + r)
    space = (seq_len - context) // 2

    keys = _distinct(rng, 1, vocab_size // 2, n, kv)
    values = _distinct(rng, vocab_size // 2, vocab_size, n, kv + r)
    # which pairs get a new value: the first r of a random permutation (none drawn when r = 0)
    rebound = np.argsort(rng.random((n, kv)), axis=1)[:, :r] if r else np.zeros((n, 0), dtype=np.int64)
    latest = values[:, :kv].copy()
    np.put_along_axis(latest, rebound, values[:, kv:], axis=1)
    kind = np.full((n, kv), STABILITY, dtype=np.int8)
    np.put_along_axis(kind, rebound, PLASTICITY, axis=1)

    # Conceptually the sequence is seq_len + 1 long with the label right after each query key,
    # then shifted for next-token prediction (inputs drop the last token, labels the first). We
    # write the shifted arrays directly: the label lands on the query key's own position. Every
    # slot that is neither context nor query holds a uniform noise token from [0, vocab_size), or 0.
    # The noise is drawn either way so that the rest of the sequence is the same for both fillers.
    inputs = rng.integers(0, vocab_size, size=(n, seq_len), dtype=np.int64)
    if not random_filler:
        inputs[:] = 0
    inputs[:, 0 : 2 * kv : 2] = keys
    inputs[:, 1 : 2 * kv : 2] = values[:, :kv]
    inputs[:, 2 * kv : context : 2] = np.take_along_axis(keys, rebound, axis=1)
    inputs[:, 2 * kv + 1 : context : 2] = values[:, kv:]
    pos = context + 2 * _power_law_gaps(rng, space, n, kv, power_a)  # key i is queried at pos[:, i]
    np.put_along_axis(inputs, pos, keys, axis=1)
    labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
    np.put_along_axis(labels, pos, latest, axis=1)
    kinds = np.zeros((n, seq_len), dtype=np.int8)
    np.put_along_axis(kinds, pos, kind, axis=1)
    return inputs, labels, kinds


def multiquery_ar(
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    num_examples: int,
    power_a: float = 0.01,
    seed: int = 0,
    random_filler: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Zoology's MQAR: ``(inputs, labels)``, int64 ``[num_examples, seq_len]``; ``labels[t]`` is
    the target for ``inputs[t]`` (-100 except at the ``num_kv_pairs`` query keys of each row).
    ``random_filler=False`` puts token 0 between the queries, as zoology's ``random_non_queries=False``.
    """
    _check(vocab_size, seq_len, num_kv_pairs, 0, num_examples, power_a, overwrite=False)
    # The overwrite generator with no re-binding is exactly MQAR (same bits for the same seed).
    inputs, labels, _ = multiquery_ar_overwrite(
        vocab_size, seq_len, num_kv_pairs, 0, num_examples, power_a, seed, random_filler
    )
    return inputs, labels


def recall_accuracy(predictions, labels, kinds=None) -> dict:
    """Accuracy of argmax ``predictions`` on labelled positions only (filler is unpredictable).

    Returns ``{"accuracy", "n"}`` and, given ``kinds``, also ``"stability"`` / ``"plasticity"``
    accuracies with their counts ``"n_stability"`` / ``"n_plasticity"``; nan where there are none.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise DataError(f"predictions shape {predictions.shape} != labels shape {labels.shape}")
    correct = predictions == labels

    def acc(mask: np.ndarray) -> tuple[float, int]:
        m = int(mask.sum())
        return (float(correct[mask].mean()) if m else float("nan")), m

    accuracy, n = acc(labels != IGNORE)
    out = {"accuracy": accuracy, "n": n}
    if kinds is not None:
        kinds = np.asarray(kinds)
        if kinds.shape != labels.shape:
            raise DataError(f"kinds shape {kinds.shape} != labels shape {labels.shape}")
        for name, code in (("stability", STABILITY), ("plasticity", PLASTICITY)):
            out[name], out[f"n_{name}"] = acc((kinds == code) & (labels != IGNORE))
    return out
