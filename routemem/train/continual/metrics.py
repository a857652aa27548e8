"""The continual-learning metrics, named as avalanche and mammoth name them; numpy in, floats out.

R is the accuracy matrix, ``[T, T]``: ``R[i, j]`` = accuracy on task j's test set after training on
task i (rows: when, columns: what). Accuracies may be fractions or percentages; each metric comes
back in the same unit. Only entries with ``i >= j`` are read, except by ``forgetting`` (see there);
entries above the diagonal may be NaN (not measured).

- final average accuracy      A_T   = (1/T) sum_j R[T-1, j]
- average incremental accuracy A_inc = (1/T) sum_i [ (1/(i+1)) sum_{j<=i} R[i, j] ]
- forgetting (Chaudhry et al. 2018)
                              F     = (1/(T-1)) sum_{j<T-1} ( max_{i<T-1} R[i, j] - R[T-1, j] )
- backward transfer (Lopez-Paz & Ranzato 2017)
                              BWT   = (1/(T-1)) sum_{j<T-1} ( R[T-1, j] - R[j, j] )
- anytime accuracy (Koh et al. 2022, Si-Blurry's A_auc): accuracies a_k on the classes seen so far,
  measured after n_k stream samples (n_1 < n_2 < ...):
                              A_auc = sum_k a_k (n_k - n_{k-1}) / n_K,   n_0 = 0
  i.e. the area under the step curve of accuracy over samples seen, divided by its width, so it is
  in the accuracies' unit; with evaluations every dn samples it is the plain mean of the a_k.

Forgetting and BWT need T >= 2; with T = 1 they are NaN.
"""

from __future__ import annotations

import numpy as np

from routemem.errors import UserError


def _matrix(R) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] < 1:
        raise UserError(f"the accuracy matrix must be square [T, T] with T >= 1, got shape {R.shape}")
    if not np.isfinite(R[np.tril_indices(len(R))]).all():
        raise UserError("the accuracy matrix has NaN or Inf on or below its diagonal")
    return R


def task_accuracies(predictions, labels, task_of_class, n_tasks: int) -> np.ndarray:
    """One row of R: ``[n_tasks]`` accuracy (fraction) of ``predictions`` vs ``labels`` on each task's
    samples, where a sample's task is ``task_of_class[label]``; NaN for a task with no samples."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise UserError(f"predictions {predictions.shape} and labels {labels.shape} differ in shape")
    task = np.asarray(task_of_class)[labels]
    correct = (predictions == labels).astype(np.float64)
    count = np.bincount(task, minlength=n_tasks).astype(np.float64)
    hits = np.bincount(task, weights=correct, minlength=n_tasks)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, hits / np.maximum(count, 1), np.nan)


def final_average_accuracy(R) -> float:
    """Mean of the last row: accuracy over all tasks at the end."""
    return float(_matrix(R)[-1].mean())


def average_incremental_accuracy(R) -> float:
    """Mean over i of the mean of R[i, :i+1] (accuracy on the tasks seen so far, after each task)."""
    R = _matrix(R)
    return float(np.mean([R[i, : i + 1].mean() for i in range(len(R))]))


def forgetting(R) -> float:
    """Mean over j < T-1 of (best accuracy on j before the last task) - (accuracy on j at the end).
    The max runs over rows i < T-1, any i (NaN entries above the diagonal are skipped), so it can
    be negative when a task improved at the end."""
    R = _matrix(R)
    if len(R) < 2:
        return float("nan")
    best = np.nanmax(R[:-1, :-1], axis=0)  # column j always has R[j, j], so no all-NaN column
    return float(np.mean(best - R[-1, :-1]))


def backward_transfer(R) -> float:
    """Mean over j < T-1 of R[T-1, j] - R[j, j] (negative: forgetting; positive: later tasks helped)."""
    R = _matrix(R)
    if len(R) < 2:
        return float("nan")
    return float(np.mean(R[-1, :-1] - np.diag(R)[:-1]))


def anytime_auc(accuracies, samples_seen) -> float:
    """A_auc: accuracies weighted by the stream samples since the previous evaluation, over all samples."""
    a = np.asarray(accuracies, dtype=np.float64)
    n = np.asarray(samples_seen, dtype=np.float64)
    if a.ndim != 1 or a.shape != n.shape or len(a) == 0:
        raise UserError(f"anytime accuracies {a.shape} and sample counts {n.shape} must be equal, non-empty 1-D")
    if not (np.isfinite(a).all() and n[0] > 0 and np.all(np.diff(n) > 0)):
        raise UserError("anytime accuracies must be finite and sample counts positive and increasing")
    widths = np.diff(n, prepend=0.0)
    return float((a * widths).sum() / n[-1])


def summarize(R, anytime_accuracies=None, samples_seen=None) -> dict[str, float]:
    """Every metric above in one dict (``a_auc`` only when the anytime curve is given)."""
    out = {
        "final_average_accuracy": final_average_accuracy(R),
        "average_incremental_accuracy": average_incremental_accuracy(R),
        "forgetting": forgetting(R),
        "backward_transfer": backward_transfer(R),
    }
    if anytime_accuracies is not None:
        out["a_auc"] = anytime_auc(anytime_accuracies, samples_seen)
    return out
