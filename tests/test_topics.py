"""Topic sequences: the synthetic task behind the fast-slow study's decisive control."""

from __future__ import annotations

import math

import numpy as np
import pytest

from routemem.data.topics import topic_known_loss, topic_one_token_loss, topic_sequences, topic_subsets
from routemem.errors import DataError


def test_subsets_are_distinct_sorted_and_fixed_by_their_seed():
    subsets = topic_subsets(64, 16, 32, topic_seed=3)
    assert subsets.shape == (16, 32)
    assert all(len(set(row)) == 32 and list(row) == sorted(row) for row in subsets)
    assert np.array_equal(subsets, topic_subsets(64, 16, 32, topic_seed=3))
    assert not np.array_equal(subsets, topic_subsets(64, 16, 32, topic_seed=4))


def test_every_token_of_a_sequence_comes_from_its_topic():
    subsets = topic_subsets(64, 16, 32)
    tokens, topics = topic_sequences(50, 100, subsets, seed=0)
    assert tokens.shape == (50, 100) and tokens.dtype == np.int64
    for row, topic in zip(tokens, topics):
        assert set(row) <= set(subsets[topic])
    again, _ = topic_sequences(50, 100, subsets, seed=0)
    assert np.array_equal(tokens, again)


def test_the_two_reference_losses_bracket_the_task():
    subsets = topic_subsets(64, 16, 32)
    known, local = topic_known_loss(subsets), topic_one_token_loss(subsets, 64)
    assert known == pytest.approx(math.log(32))
    assert known < local < math.log(64)
    # one topic: the current token adds nothing beyond the topic, so both losses are ln(size)
    single = topic_subsets(64, 1, 32)
    assert topic_one_token_loss(single, 64) == pytest.approx(topic_known_loss(single))


def test_one_token_loss_matches_a_sampled_estimate():
    """The analytic Bayes loss equals the empirical loss of the same predictor on samples."""
    subsets = topic_subsets(16, 4, 8, topic_seed=1)
    member = np.zeros((4, 16))
    member[np.arange(4)[:, None], subsets] = 1.0
    posterior = member / member.sum(axis=0, keepdims=True).clip(min=1)
    predict = posterior.T @ member / 8
    tokens, _ = topic_sequences(4000, 2, subsets, seed=5)
    empirical = -np.log(predict[tokens[:, 0], tokens[:, 1]]).mean()
    assert empirical == pytest.approx(topic_one_token_loss(subsets, 16), abs=0.02)


def test_bad_sizes_are_data_errors():
    with pytest.raises(DataError, match="topic_size"):
        topic_subsets(8, 2, 9)
    with pytest.raises(DataError, match="n_topics"):
        topic_subsets(8, 0, 4)
