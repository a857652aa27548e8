"""Class-incremental streams: every sample once, disjoint tasks, blurry shares, few-shot, anytime points."""

import numpy as np
import pytest

from routemem.data import make_imageset, make_stream
from routemem.errors import DataError


def toy_set(n_classes=12, per_class=20, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    images = rng.random((len(labels), 1, 8, 8), dtype=np.float32)
    return make_imageset("toy", images, labels, [f"c{i}" for i in range(n_classes)])


def stream_labels(stream):
    return stream.images.labels[stream.order]


def test_every_training_sample_is_streamed_exactly_once():
    images = toy_set()
    s = make_stream(images, 4, batch_size=7, seed=3)
    np.testing.assert_array_equal(np.sort(s.order), s.train_indices)
    batched = np.concatenate([b.indices for b in s.batches()])
    np.testing.assert_array_equal(batched, s.order)
    assert len(np.unique(batched)) == len(batched)
    assert np.intersect1d(s.train_indices, s.test_indices).size == 0
    np.testing.assert_array_equal(np.union1d(s.train_indices, s.test_indices), np.arange(len(images)))


def test_test_share_is_per_class():
    s = make_stream(toy_set(per_class=20), 3, test_share=0.25)
    counts = np.bincount(s.images.labels[s.test_indices])
    assert (counts == 5).all()  # 0.25 * 20


def test_disjoint_tasks_share_no_class_and_batches_stay_in_their_task():
    s = make_stream(toy_set(n_classes=10), 4, batch_size=6, seed=1)
    classes = [set(t.classes.tolist()) for t in s.tasks]
    assert sorted(len(c) for c in classes) == [2, 2, 3, 3]  # 10 classes dealt to 4 tasks
    assert set().union(*classes) == set(range(10))
    assert sum(len(c) for c in classes) == 10  # pairwise disjoint
    for b in s.batches():
        assert set(s.images.labels[b.indices].tolist()) <= classes[b.task]
        assert 1 <= len(b.indices) <= 6
    # tasks come in order, and only a task's last batch may be short
    tasks = [b.task for b in s.batches()]
    assert tasks == sorted(tasks)
    short = [i for i, b in enumerate(s.batches()) if len(b.indices) < 6]
    assert set(short) <= set(s.task_end_batches().tolist())


def test_blurry_shares_are_as_configured():
    images = toy_set(n_classes=10, per_class=25)
    s = make_stream(images, 5, seed=2, test_share=0.2, disjoint_share=0.4, blurry_share=0.25)
    home = np.empty(10, dtype=int)
    for t in s.tasks:
        home[t.classes] = t.index
    labels = stream_labels(s)
    away = s.order_task != home[labels]
    away_per_class = np.bincount(labels[away], minlength=10)
    disjoint = away_per_class == 0
    assert disjoint.sum() == 4  # round(0.4 * 10) classes never leave their home task
    # 20 training samples per blurry class (25 - 5 test): round(0.25 * 20) = 5 of them in other tasks
    assert (away_per_class[~disjoint] == 5).all()
    assert away.sum() == 6 * 5
    assert len(set(s.order_task[away].tolist())) > 1  # spread over several tasks


def test_the_default_stream_has_no_blurry_samples():
    s = make_stream(toy_set(), 3)
    home = np.empty(12, dtype=int)
    for t in s.tasks:
        home[t.classes] = t.index
    assert (s.order_task == home[stream_labels(s)]).all()


def test_few_shot_streams_n_samples_per_class():
    s = make_stream(toy_set(per_class=20), 3, shots=3)
    assert (np.bincount(stream_labels(s), minlength=12) == 3).all()
    assert len(s.test_indices) == 12 * 4  # the test split is unchanged: 0.2 * 20 per class


def test_same_seed_same_stream_other_seed_other_stream():
    images = toy_set()
    a, b, c = (make_stream(images, 4, seed=s) for s in (5, 5, 6))
    np.testing.assert_array_equal(a.order, b.order)
    np.testing.assert_array_equal(a.test_indices, b.test_indices)
    assert not np.array_equal(a.order, c.order)


def test_anytime_points_and_seen_classes():
    s = make_stream(toy_set(n_classes=4, per_class=10), 2, batch_size=5, test_share=0.2)
    # 8 train samples per class, 2 classes per task: 16 per task, batches 5 5 5 1 | 5 5 5 1
    assert np.diff(s.batch_starts).tolist() == [5, 5, 5, 1, 5, 5, 5, 1]
    batches, seen = s.anytime_points(10)
    # multiples of 10: 10 -> batch 1 (ends at 10), 20 -> batch 4 (ends at 21), 30 -> batch 6 (ends at 31),
    # and the last batch (7, at 32)
    assert batches.tolist() == [1, 4, 6, 7] and seen.tolist() == [10, 21, 31, 32]
    assert s.task_end_batches().tolist() == [3, 7]
    first = s.batch(0)
    np.testing.assert_array_equal(s.seen_classes(5), np.unique(s.images.labels[first.indices]))
    assert s.seen_classes(len(s)).tolist() == [0, 1, 2, 3]
    seen_test = s.images.labels[s.seen_test_indices(16)]
    assert set(seen_test.tolist()) == set(s.tasks[0].classes.tolist())
    for t in s.tasks:
        assert set(s.images.labels[s.task_test_indices(t.index)].tolist()) == set(t.classes.tolist())


@pytest.mark.parametrize("kwargs, words", [
    ({"n_tasks": 13}, "12 classes: too few for 13 tasks"),
    ({"n_tasks": 3, "shots": 50}, "shots=50"),
    ({"n_tasks": 3, "blurry_share": 0.1}, "needs blurry classes"),
    ({"n_tasks": 1, "disjoint_share": 0.5, "blurry_share": 0.1}, "at least 2 tasks"),
    ({"n_tasks": 3, "test_share": 1.0}, "test_share"),
    ({"n_tasks": 0}, "n_tasks"),
])
def test_bad_stream_requests_are_one_line_errors(kwargs, words):
    with pytest.raises(DataError, match=words) as e:
        make_stream(toy_set(), **kwargs)
    assert "\n" not in str(e.value)


def test_a_class_with_one_sample_cannot_be_split():
    images = make_imageset("tiny", np.zeros((3, 1, 8, 8)), [0, 0, 1], ["a", "b"])
    with pytest.raises(DataError, match="class 'b' has 1 sample"):
        make_stream(images, 2)
