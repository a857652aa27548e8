"""Topic sequences: a synthetic task where the only useful context is far away and coarse.

Each of ``n_topics`` topics is a fixed random subset of ``topic_size`` tokens out of ``vocab``
(the topics come from ``topic_seed``, the same in training and validation). A sequence picks one
topic and draws every token uniformly from its subset. One or two tokens say little about the
topic (the subsets overlap heavily); the bag of a few dozen tokens names it. So a model that sees
only the last token or two cannot beat ~ln(vocab) by much, while one that pools earlier tokens
reaches ln(topic_size): the fast-slow study's decisive positive control for the slow path.
"""

from __future__ import annotations

import math

import numpy as np

from routemem.errors import DataError


def topic_subsets(vocab: int, n_topics: int, topic_size: int, topic_seed: int = 0) -> np.ndarray:
    """``[n_topics, topic_size]`` token ids, each row a distinct random subset of ``range(vocab)``."""
    if not 1 <= topic_size <= vocab or n_topics < 1:
        raise DataError(f"need 1 <= topic_size <= vocab and n_topics >= 1, got vocab={vocab}, "
                        f"n_topics={n_topics}, topic_size={topic_size}")
    rng = np.random.default_rng(topic_seed)
    return np.stack([np.sort(rng.permutation(vocab)[:topic_size]) for _ in range(n_topics)])


def topic_sequences(n: int, length: int, subsets: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` sequences of ``length`` tokens and their topic ids: int64 ``[n, length]`` and ``[n]``."""
    rng = np.random.default_rng(seed)
    topics = rng.integers(0, len(subsets), size=n)
    picks = rng.integers(0, subsets.shape[1], size=(n, length))
    return subsets[topics[:, None], picks].astype(np.int64), topics


def topic_known_loss(subsets: np.ndarray) -> float:
    """The best possible loss per token once the topic is known: ln(topic_size) nats."""
    return math.log(subsets.shape[1])


def topic_one_token_loss(subsets: np.ndarray, vocab: int) -> float:
    """The best possible loss per token when only the current token is seen (the next token is
    drawn from the same topic): the Bayes predictor that averages the topics containing it."""
    n_topics, size = subsets.shape
    member = np.zeros((n_topics, vocab))
    member[np.arange(n_topics)[:, None], subsets] = 1.0
    posterior = member / member.sum(axis=0, keepdims=True).clip(min=1)  # [topic, token]: P(topic | token)
    predict = posterior.T @ member / size  # [seen token, next token]
    loss = 0.0
    for k in range(n_topics):  # topic k, current token x and next token y both uniform on its subset
        q = predict[np.ix_(subsets[k], subsets[k])]
        loss += -np.log(q).mean() / n_topics
    return float(loss)
