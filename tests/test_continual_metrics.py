"""The continual-learning metrics on small accuracy matrices worked out by hand."""

import math

import numpy as np
import pytest

from routemem.errors import UserError
from routemem.train.continual.metrics import (
    anytime_auc,
    average_incremental_accuracy,
    backward_transfer,
    final_average_accuracy,
    forgetting,
    summarize,
    task_accuracies,
)

NAN = float("nan")
# Rows: after task i; columns: task j. Upper triangle not measured.
R_DECAY = [[0.9, NAN, NAN],
           [0.6, 0.8, NAN],
           [0.5, 0.7, 0.9]]
# Upper triangle 0 (masked logits of unseen classes); task 0 peaks after task 1, task 1 improves at the end.
R_MIXED = [[0.5, 0.0, 0.0],
           [0.8, 0.6, 0.0],
           [0.7, 0.9, 0.4]]


def test_final_average_accuracy():
    assert final_average_accuracy(R_DECAY) == pytest.approx(0.7)  # (0.5 + 0.7 + 0.9) / 3 = 2.1 / 3
    assert final_average_accuracy(R_MIXED) == pytest.approx(2.0 / 3)  # (0.7 + 0.9 + 0.4) / 3


def test_average_incremental_accuracy():
    # (0.9 + (0.6 + 0.8) / 2 + (0.5 + 0.7 + 0.9) / 3) / 3 = (0.9 + 0.7 + 0.7) / 3 = 2.3 / 3
    assert average_incremental_accuracy(R_DECAY) == pytest.approx(2.3 / 3)
    # (0.5 + (0.8 + 0.6) / 2 + 2.0 / 3) / 3 = (0.5 + 0.7 + 0.666...) / 3
    assert average_incremental_accuracy(R_MIXED) == pytest.approx((0.5 + 0.7 + 2.0 / 3) / 3)


def test_forgetting():
    # j=0: max(0.9, 0.6) - 0.5 = 0.4; j=1: max(NaN skipped, 0.8) - 0.7 = 0.1; mean 0.25
    assert forgetting(R_DECAY) == pytest.approx(0.25)
    # j=0: max(0.5, 0.8) - 0.7 = 0.1 (the best, not the first, accuracy); j=1: max(0.0, 0.6) - 0.9 = -0.3
    assert forgetting(R_MIXED) == pytest.approx((0.1 - 0.3) / 2)


def test_backward_transfer():
    # j=0: 0.5 - 0.9 = -0.4; j=1: 0.7 - 0.8 = -0.1; mean -0.25
    assert backward_transfer(R_DECAY) == pytest.approx(-0.25)
    # j=0: 0.7 - 0.5 = 0.2; j=1: 0.9 - 0.6 = 0.3; mean 0.25 (not minus forgetting: the max differs)
    assert backward_transfer(R_MIXED) == pytest.approx(0.25)


def test_one_task_has_no_forgetting_or_transfer():
    assert final_average_accuracy([[0.4]]) == pytest.approx(0.4)
    assert average_incremental_accuracy([[0.4]]) == pytest.approx(0.4)
    assert math.isnan(forgetting([[0.4]])) and math.isnan(backward_transfer([[0.4]]))


def test_percentages_stay_percentages():
    R = np.array(R_DECAY) * 100
    assert final_average_accuracy(R) == pytest.approx(70.0)
    assert forgetting(R) == pytest.approx(25.0)


def test_anytime_auc_weights_by_samples_since_the_last_evaluation():
    # (0.2 * 100 + 0.5 * 100 + 0.8 * 50) / 250 = (20 + 50 + 40) / 250 = 0.44
    assert anytime_auc([0.2, 0.5, 0.8], [100, 200, 250]) == pytest.approx(0.44)
    # even spacing: the plain mean, (0.2 + 0.5 + 0.8) / 3 = 0.5
    assert anytime_auc([0.2, 0.5, 0.8], [100, 200, 300]) == pytest.approx(0.5)


def test_task_accuracies_is_a_row_of_the_matrix():
    task_of_class = [0, 0, 1, 1, 2]  # classes 0, 1 -> task 0; 2, 3 -> task 1; 4 -> task 2
    labels = [0, 1, 1, 2, 3, 3, 4]
    preds = [0, 0, 1, 2, 2, 3, 1]
    # task 0: labels 0,1,1 -> hits 1,0,1 = 2/3; task 1: 2,3,3 -> 1,0,1 = 2/3; task 2: 4 -> 0/1
    np.testing.assert_allclose(task_accuracies(preds, labels, task_of_class, 3), [2 / 3, 2 / 3, 0.0])
    row = task_accuracies([0], [0], task_of_class, 3)
    assert row[0] == 1.0 and np.isnan(row[1:]).all()  # tasks with no samples: NaN, not 0


def test_summarize_collects_every_metric():
    out = summarize(R_DECAY, [0.2, 0.5, 0.8], [100, 200, 250])
    assert out == pytest.approx({"final_average_accuracy": 0.7, "average_incremental_accuracy": 2.3 / 3,
                                 "forgetting": 0.25, "backward_transfer": -0.25, "a_auc": 0.44})
    assert "a_auc" not in summarize(R_DECAY)


@pytest.mark.parametrize("bad, words", [
    ([[0.1, 0.2]], "square"),
    ([[0.1, NAN], [NAN, 0.2]], "NaN"),
])
def test_bad_matrices_are_user_errors(bad, words):
    with pytest.raises(UserError, match=words):
        final_average_accuracy(bad)


def test_bad_anytime_curves_are_user_errors():
    with pytest.raises(UserError, match="increasing"):
        anytime_auc([0.1, 0.2], [200, 100])
    with pytest.raises(UserError, match="equal"):
        anytime_auc([0.1, 0.2], [100])
