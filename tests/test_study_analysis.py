"""study/analysis.py on hand-made rows: every per-arm threshold is chosen on validation predictions.

The validation and test scores are made so that each threshold differs between the two splits, and
the expected thresholds are worked out by brute force over the validation scores here.
"""

import numpy as np
import pytest

from xray_dit.study import analysis, contrasts

TARGET = "Cardiomegaly"
VAL_Y = np.array([0] * 10 + [1] * 5)
VAL_S = np.array([0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40, 0.45, 0.50, 0.30, 0.45, 0.60, 0.70, 0.80])
TEST_Y = np.array([0] * 6 + [1] * 4)
TEST_S = np.array([0.10, 0.20, 0.30, 0.60, 0.65, 0.70, 0.75, 0.80, 0.90, 0.95])


def _summary(val_y=VAL_Y):
    tests = contrasts.TargetTestSet(image_ids=np.arange(10), known=np.ones(10, bool), labels=TEST_Y,
                                    patients=np.arange(10), all_labels=TEST_Y[:, None].astype(np.float32),
                                    all_mask=np.ones((10, 1), bool))
    # Two seeds with the same scores, so the seed ensemble's mean is exactly the scores above.
    rows = contrasts.ArmRows(test=np.stack([TEST_S, TEST_S]), test_ensemble=TEST_S[:, None],
                             validation=np.stack([VAL_S, VAL_S]), validation_labels=val_y, seeds=["0", "1"],
                             generators=["", ""])
    entry = {"runs": {s: {"test_auc": {TARGET: 0.9}} for s in ("0", "1")}}
    row, _, confusion = analysis._arm_summary(analysis.BASELINE, entry, {analysis.BASELINE: rows}, tests, [TARGET],
                                              TARGET, n_boot=20)
    return row, confusion


def _youden_by_brute_force(y, s):
    """max over observed scores t of P(s >= t | 1) − P(s >= t | 0); ties to the highest t."""
    j = {t: np.mean(s[y == 1] >= t) - np.mean(s[y == 0] >= t) for t in np.unique(s)}
    best = max(j.values())
    return max(t for t, v in j.items() if v >= best - 1e-12)


def _lowest_threshold_at_specificity(y, s, specificity):
    return min(t for t in np.unique(s) if np.mean(s[y == 0] < t) >= specificity - 1e-12)


def test_youden_and_sensitivity_thresholds_come_from_validation_and_apply_unchanged_to_test():
    row, confusion = _summary()
    youden = _youden_by_brute_force(VAL_Y, VAL_S)
    assert youden == 0.60 and _youden_by_brute_force(TEST_Y, TEST_S) == 0.75   # the splits disagree
    assert row["threshold"] == pytest.approx(youden) and row["threshold_source"].startswith("validation")
    called = TEST_S >= youden
    assert confusion.tolist() == row["test_confusion"] == [
        [int(np.sum(~called & (TEST_Y == 0))), int(np.sum(called & (TEST_Y == 0)))],
        [int(np.sum(~called & (TEST_Y == 1))), int(np.sum(called & (TEST_Y == 1)))]]

    sens = row["sensitivity_at_specificity"]
    at_90 = _lowest_threshold_at_specificity(VAL_Y, VAL_S, 0.9)
    assert at_90 == 0.50 and _lowest_threshold_at_specificity(TEST_Y, TEST_S, 0.9) == 0.75
    assert sens["specificity"] == 0.9 and sens["threshold"] == pytest.approx(at_90)
    assert sens["sensitivity"][0] == pytest.approx(np.mean(TEST_S[TEST_Y == 1] >= at_90))
    assert sens["test_specificity"] == pytest.approx(np.mean(TEST_S[TEST_Y == 0] < at_90))


def test_a_validation_split_of_one_class_chooses_no_threshold_from_the_test_split():
    row, _ = _summary(val_y=np.zeros_like(VAL_Y))
    assert row["threshold"] == 0.5 and "only one class" in row["threshold_source"]
    assert row["sensitivity_at_specificity"]["threshold"] is None
