"""Online class-incremental streams over an ImageSet: tasks, the ordered train batches, test sets.

``make_stream(images, n_tasks, ...)`` builds, all from one ``seed``:

1. Train / test split, per class: the class's samples in a seeded order, the first
   ``max(1, round(test_share * n))`` for test, the rest for training (a class needs >= 2 samples).
   Few-shot (``shots=n``): only the first n training samples of each class are streamed; the test
   split is unchanged.
2. Classes in a seeded order; the first ``round(disjoint_share * K)`` are *disjoint* classes, the
   rest *blurry* classes. Each class gets a home task: the disjoint ones, then the blurry ones, are
   dealt round-robin to tasks 0, 1, ..., T-1, 0, ... (task sizes differ by at most one class, and
   every task has one when K >= T). ``Task.classes`` are a task's home classes; its test set is
   their test samples (the columns of the accuracy matrix).
3. Samples: a disjoint class's training samples all go to its home task. For a blurry class,
   ``round(blurry_share * n_train)`` of its training samples (at most n_train - 1: one always stays
   home) go instead to tasks drawn uniformly from the other tasks (so a blurry class can show up before and after its home task); the rest
   go home. Within each task the samples are shuffled; tasks follow one another in order.
4. Batches: each task's samples cut into batches of ``batch_size`` (the last of a task may be
   smaller: a batch never spans two tasks). Every training sample appears exactly once.

Default (``disjoint_share=1, blurry_share=0``): the usual disjoint class-incremental split, tasks of
disjoint classes. Si-Blurry-style (Moon et al. 2023, after i-Blurry-N-M of Koh et al. 2022):
``disjoint_share=0.5, blurry_share=0.1`` gives N = 50% disjoint classes and M = 10% of each blurry
class's samples in other tasks. Not implemented: Si-Blurry's randomly varying number of classes per
task (ours are dealt evenly).

Anytime evaluation (Koh et al. 2022): ``stream.anytime_points(every)`` says after which batches to
evaluate (the first batch end at or past each multiple of ``every`` samples, and the last batch);
``stream.seen_classes(n)`` is what a model can be held to after ``n`` stream samples.
Every ``round`` above rounds half up.
No task ids are given at test time: a task index rides along each batch for bookkeeping only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from routemem.data.images import ImageSet
from routemem.errors import DataError


@dataclass(frozen=True, repr=False, eq=False)
class Task:
    index: int
    classes: np.ndarray  # int64, sorted: the task's home classes (labels of the ImageSet)

    def __repr__(self) -> str:
        return f"Task({self.index}, classes={self.classes.tolist()})"


@dataclass(frozen=True, repr=False, eq=False)
class StreamBatch:
    indices: np.ndarray  # int64 indices into the ImageSet
    task: int  # the task this batch belongs to (bookkeeping, not a model input)


@dataclass(frozen=True, repr=False, eq=False)
class Stream:
    """One seeded online stream (module docstring). Build it with ``make_stream``."""

    images: ImageSet
    tasks: tuple[Task, ...]
    train_indices: np.ndarray  # int64, sorted: every sample that is streamed
    test_indices: np.ndarray  # int64, sorted: held out, disjoint from train_indices
    order: np.ndarray  # int64: train_indices in stream order (each exactly once)
    order_task: np.ndarray  # int64: the task of each stream position
    batch_starts: np.ndarray  # int64 [n_batches + 1]: batch b is order[batch_starts[b]:batch_starts[b + 1]]
    settings: dict  # the arguments it was built from (for results files)

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    @property
    def n_batches(self) -> int:
        return len(self.batch_starts) - 1

    def __len__(self) -> int:
        """Training samples in the stream."""
        return len(self.order)

    def batch(self, b: int) -> StreamBatch:
        lo, hi = int(self.batch_starts[b]), int(self.batch_starts[b + 1])
        return StreamBatch(self.order[lo:hi], int(self.order_task[lo]))

    def batches(self) -> Iterator[StreamBatch]:
        """The train batches in stream order."""
        return (self.batch(b) for b in range(self.n_batches))

    def samples_seen(self, b: int) -> int:
        """Stream samples seen once batch ``b`` has been trained on."""
        return int(self.batch_starts[b + 1])

    def task_end_batches(self) -> np.ndarray:
        """The last batch of each task (evaluate there for row i of the accuracy matrix)."""
        first_task = self.order_task[self.batch_starts[:-1]]
        return np.array([np.flatnonzero(first_task == t)[-1] for t in range(self.n_tasks)], dtype=np.int64)

    def task_test_indices(self, t: int) -> np.ndarray:
        """Test samples of task ``t``'s home classes."""
        labels = self.images.labels[self.test_indices]
        return self.test_indices[np.isin(labels, self.tasks[t].classes)]

    def seen_classes(self, n_samples: int) -> np.ndarray:
        """Sorted classes among the first ``n_samples`` stream samples."""
        return np.unique(self.images.labels[self.order[:n_samples]])

    def seen_test_indices(self, n_samples: int) -> np.ndarray:
        """Test samples of the classes seen in the first ``n_samples`` stream samples."""
        labels = self.images.labels[self.test_indices]
        return self.test_indices[np.isin(labels, self.seen_classes(n_samples))]

    def anytime_points(self, every: int) -> tuple[np.ndarray, np.ndarray]:
        """(batch indices to evaluate after, samples seen there): the first batch ending at or
        past each multiple of ``every`` samples, plus the last batch; increasing, no repeats."""
        if every < 1:
            raise DataError(f"anytime evaluation needs every >= 1 sample, got {every}")
        ends = self.batch_starts[1:]
        targets = np.arange(every, len(self) + 1, every)
        batches = np.unique(np.append(np.searchsorted(ends, targets, side="left"), self.n_batches - 1))
        return batches.astype(np.int64), ends[batches].astype(np.int64)

    def __repr__(self) -> str:
        return (f"Stream({self.images.name}, tasks={self.n_tasks}, train={len(self)}, "
                f"test={len(self.test_indices)}, batches={self.n_batches})")


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def _check(images: ImageSet, n_tasks, batch_size, test_share, shots, disjoint_share, blurry_share) -> None:
    if not isinstance(n_tasks, (int, np.integer)) or n_tasks < 1:
        raise DataError(f"n_tasks must be a positive integer, got {n_tasks!r}")
    if images.n_classes < n_tasks:
        raise DataError(f"{images.name} has {images.n_classes} classes: too few for {n_tasks} tasks "
                        "(each task needs at least one class)")
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    if not 0.0 < test_share < 1.0:
        raise DataError(f"test_share must lie strictly between 0 and 1, got {test_share}")
    if shots is not None and shots < 1:
        raise DataError(f"shots must be at least 1 (or None for all samples), got {shots}")
    if not 0.0 <= disjoint_share <= 1.0:
        raise DataError(f"disjoint_share must lie in [0, 1], got {disjoint_share}")
    if not 0.0 <= blurry_share < 1.0:
        raise DataError(f"blurry_share must lie in [0, 1), got {blurry_share}")
    if blurry_share > 0 and n_tasks < 2:
        raise DataError("blurry samples need at least 2 tasks to move between")
    if blurry_share > 0 and _round_half_up(disjoint_share * images.n_classes) >= images.n_classes:
        raise DataError(f"blurry_share={blurry_share} needs blurry classes, but disjoint_share="
                        f"{disjoint_share} makes all {images.n_classes} classes disjoint")


def make_stream(images: ImageSet, n_tasks: int, *, batch_size: int = 10, seed: int = 0,
                test_share: float = 0.2, shots: int | None = None,
                disjoint_share: float = 1.0, blurry_share: float = 0.0) -> Stream:
    """A seeded class-incremental online stream (construction: module docstring)."""
    _check(images, n_tasks, batch_size, test_share, shots, disjoint_share, blurry_share)
    rng = np.random.default_rng([seed, 13])
    n_classes = images.n_classes
    train_of, test_parts = [], []
    for c in range(n_classes):
        idx = rng.permutation(np.flatnonzero(images.labels == c))
        if len(idx) < 2:
            raise DataError(f"class '{images.class_names[c]}' has {len(idx)} sample(s): a class needs "
                            "at least 2 (one for training, one for testing)")
        n_test = max(1, _round_half_up(test_share * len(idx)))
        n_test = min(n_test, len(idx) - 1)
        test_parts.append(idx[:n_test])
        train = idx[n_test:]
        if shots is not None:
            if len(train) < shots:
                raise DataError(f"shots={shots} but class '{images.class_names[c]}' has only "
                                f"{len(train)} training samples")
            train = train[:shots]
        train_of.append(train)

    class_order = rng.permutation(n_classes)
    n_disjoint = _round_half_up(disjoint_share * n_classes)
    home = np.empty(n_classes, dtype=np.int64)
    home[class_order] = np.arange(n_classes) % n_tasks  # disjoint first, then blurry, dealt round-robin
    blurry = np.zeros(n_classes, dtype=bool)
    blurry[class_order[n_disjoint:]] = True

    per_task: list[list[np.ndarray]] = [[] for _ in range(n_tasks)]
    for c in class_order:
        train = train_of[c]
        n_move = min(_round_half_up(blurry_share * len(train)), len(train) - 1) if blurry[c] else 0
        per_task[home[c]].append(train[n_move:])
        if n_move:
            others = np.delete(np.arange(n_tasks), home[c])
            dest = others[rng.integers(0, len(others), size=n_move)]
            for t in range(n_tasks):
                per_task[t].append(train[:n_move][dest == t])

    order, order_task, starts, offset = [], [], [0], 0
    for t in range(n_tasks):  # every task has a sample: each class keeps one at home
        samples = rng.permutation(np.concatenate(per_task[t]).astype(np.int64))
        order.append(samples)
        order_task.append(np.full(len(samples), t, dtype=np.int64))
        starts.extend(offset + np.arange(batch_size, len(samples), batch_size))
        starts.append(offset + len(samples))
        offset += len(samples)
    tasks = tuple(Task(t, np.sort(np.flatnonzero(home == t)).astype(np.int64)) for t in range(n_tasks))
    settings = {"source": images.name, "source_sha256": images.sha256, "n_tasks": int(n_tasks),
                "batch_size": int(batch_size), "seed": int(seed), "test_share": float(test_share),
                "shots": None if shots is None else int(shots), "disjoint_share": float(disjoint_share),
                "blurry_share": float(blurry_share)}  # plain types: results files write it as JSON
    return Stream(images, tasks, np.sort(np.concatenate(train_of)).astype(np.int64),
                  np.sort(np.concatenate(test_parts)).astype(np.int64), np.concatenate(order),
                  np.concatenate(order_task), np.array(starts, dtype=np.int64), settings)
