"""The online class-incremental loop: ``run_stream(method, stream)`` walks a stream once and measures.

Protocol. The stream's batches come once, in order (``routemem.data.streams``). At the first batch
of task t the loop calls ``method.begin_task(t, classes)``; each batch gets ``updates_per_batch``
calls of ``method.observe`` (one optimizer step each; Si-Blurry's "online iterations", default 1),
then one ``method.after_batch``. No task id reaches ``predict``.

Evaluation (batched, no gradient, eval mode; a prediction is the argmax of ``method.predict``,
whose unseen classes are -inf):

- after the last batch of task i, row i of the accuracy matrix R: ``R[i, j]`` = accuracy on the
  test samples of task j's home classes, for j <= i. Entries above the diagonal (tasks not yet
  trained on, whose classes are still masked) are not measured: NaN, which the metrics of
  ``routemem.train.continual.metrics`` skip.
- anytime accuracy (Koh et al. 2022): after the first batch ending at or past every ``eval_every``
  stream samples, and after the last batch, accuracy on the test samples of every class seen so far.

Deterministic for a given ``seed`` on the CPU: torch's generator is seeded at the start (buffer
draws, dropout); the stream is seeded when it is built, the method's initial weights by
``make_method``.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from routemem.data.images import ImageSet
from routemem.data.streams import Stream
from routemem.errors import ConfigError, DataError
from routemem.machine import resolve_device
from routemem.train.continual.methods import Method
from routemem.train.continual.metrics import summarize, task_accuracies

__all__ = ["predict_labels", "result_to_json", "run_stream"]

ANYTIME_POINTS = 20  # default: about this many anytime evaluations per stream


def _as_batch(imageset: ImageSet, indices: np.ndarray, device: torch.device, dtype: torch.dtype):
    images = torch.from_numpy(imageset.images[indices]).to(device=device, dtype=dtype)
    return images, torch.from_numpy(imageset.labels[indices]).to(device)


def predict_labels(method: Method, imageset: ImageSet, indices: np.ndarray, *, device: torch.device,
                   batch_size: int = 256) -> np.ndarray:
    """The method's predicted class of each sample ``imageset[indices]``, ``batch_size`` at a time."""
    dtype = method.vit.head.weight.dtype
    out = []
    with torch.no_grad():
        for lo in range(0, len(indices), batch_size):
            images, _ = _as_batch(imageset, indices[lo:lo + batch_size], device, dtype)
            out.append(method.predict(images).argmax(dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _check(method, stream, imageset, updates_per_batch, eval_every, eval_batch_size) -> None:
    if not isinstance(method, Method):
        raise TypeError(f"run_stream needs a Method (see make_method), got {type(method).__name__}")
    if method.task != -1:
        raise ValueError(f"{method.name}: this method has already run; build a fresh one per stream")
    counts = {"updates_per_batch": updates_per_batch, "eval_batch_size": eval_batch_size, "eval_every": eval_every}
    for name, value in counts.items():
        if name == "eval_every" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    if len(imageset) != len(stream.images) or not np.array_equal(imageset.labels, stream.images.labels):
        raise DataError(f"{imageset.name} is not the image set the stream indexes ({stream.images.name}): "
                        "sizes or labels differ")
    if stream.images.n_classes != method.n_classes or stream.n_tasks != method.n_tasks:
        raise ConfigError(f"{method.name} was built for {method.n_classes} classes in {method.n_tasks} tasks, "
                          f"the stream has {stream.images.n_classes} in {stream.n_tasks}")
    shape = tuple(imageset.images.shape[1:])
    if shape != method.input_shape():
        raise DataError(f"{imageset.name} images are {list(shape)} (channels, height, width) but the backbone "
                        f"takes {list(method.input_shape())}")


def run_stream(method: Method, stream: Stream, imageset: ImageSet | None = None, *, updates_per_batch: int = 1,
               eval_every: int | None = None, eval_batch_size: int = 256, device: str | torch.device = "auto",
               seed: int = 0, progress: str | None = None) -> dict:
    """Train ``method`` on ``stream`` online and evaluate it (module docstring).

    ``imageset``: the images the stream's indices refer to (default ``stream.images``; e.g.
    ``to_rgb(stream.images)`` for an RGB backbone). ``eval_every``: stream samples between anytime
    evaluations (default: len(stream) / 20, rounded up). ``progress`` names a bar over the batches
    (none when None or ``$ROUTEMEM_STEP_BARS`` is 0).

    Returns a dict: ``accuracy_matrix`` (R, [T, T], NaN above the diagonal), ``anytime_samples`` and
    ``anytime_accuracy`` (the curve), ``metrics`` (``continual_metrics.summarize``: final and
    average incremental accuracy, forgetting, BWT, A_auc; fractions), ``seconds`` (the whole
    run), ``train_seconds`` (begin_task / observe / after_batch only), ``train_images_per_second``
    (stream samples over train_seconds; replayed samples and repeated updates not counted),
    ``updates`` (optimizer steps), ``samples``, and the settings (``method``, ``options``,
    ``updates_per_batch``, ``eval_every``, ``seed``, ``device``)."""
    imageset = stream.images if imageset is None else imageset
    _check(method, stream, imageset, updates_per_batch, eval_every, eval_batch_size)
    device = resolve_device(device)
    eval_every = eval_every if eval_every is not None else max(1, math.ceil(len(stream) / ANYTIME_POINTS))
    torch.manual_seed(seed)
    method.to(device)
    dtype = method.vit.head.weight.dtype
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    T = stream.n_tasks
    task_of_class = np.empty(stream.images.n_classes, dtype=np.int64)
    for task in stream.tasks:
        task_of_class[task.classes] = task.index
    row_after = {int(b): i for i, b in enumerate(stream.task_end_batches())}
    anytime_batches, anytime_samples = stream.anytime_points(eval_every)
    anytime_at = set(anytime_batches.tolist())
    R = np.full((T, T), np.nan)
    anytime_accuracy = []
    labels_all = imageset.labels
    steps_before = method.steps

    start = time.perf_counter()
    train_seconds = 0.0
    quiet = progress is None or os.environ.get("ROUTEMEM_STEP_BARS", "1") == "0"
    for b in tqdm(range(stream.n_batches), desc=progress, leave=False, disable=quiet, mininterval=2.0):
        batch = stream.batch(b)
        tick = time.perf_counter()
        if batch.task != method.task:
            method.begin_task(batch.task, stream.tasks[batch.task].classes)
        images, labels = _as_batch(imageset, batch.indices, device, dtype)
        for _ in range(updates_per_batch):
            method.observe(images, labels)
        method.after_batch(images, labels)
        if b in row_after or b in anytime_at:
            sync()
        train_seconds += time.perf_counter() - tick

        wanted = {}
        if b in row_after:
            i = row_after[b]
            wanted["row"] = np.concatenate([stream.task_test_indices(j) for j in range(i + 1)])
        if b in anytime_at:
            wanted["anytime"] = stream.seen_test_indices(stream.samples_seen(b))
        if not wanted:
            continue
        indices = np.unique(np.concatenate(list(wanted.values())))  # one pass when both are due
        predicted = predict_labels(method, imageset, indices, device=device, batch_size=eval_batch_size)
        if "row" in wanted:
            at = np.searchsorted(indices, wanted["row"])
            row = task_accuracies(predicted[at], labels_all[wanted["row"]], task_of_class, T)
            R[i, : i + 1] = row[: i + 1]
        if "anytime" in wanted:
            at = np.searchsorted(indices, wanted["anytime"])
            anytime_accuracy.append(float(np.mean(predicted[at] == labels_all[wanted["anytime"]])))

    seconds = time.perf_counter() - start
    return {
        "method": method.name,
        "options": dict(getattr(method, "options", {})),
        "accuracy_matrix": R,
        "anytime_samples": anytime_samples.astype(np.int64),
        "anytime_accuracy": np.array(anytime_accuracy),
        "metrics": summarize(R, anytime_accuracy, anytime_samples),
        "seconds": seconds,
        "train_seconds": train_seconds,
        "train_images_per_second": len(stream) / train_seconds if train_seconds > 0 else float("nan"),
        "updates": method.steps - steps_before,
        "samples": len(stream),
        "updates_per_batch": updates_per_batch,
        "eval_every": eval_every,
        "seed": seed,
        "device": device.type,
    }


def _plain(value):
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def result_to_json(result: dict) -> dict:
    """``run_stream``'s result as plain JSON types: arrays as lists, NaN (unmeasured) as null."""
    return _plain(result)
