"""Evaluation room, detectability: the cross-validated real-vs-synthetic classifier (a two-sample test)."""

import numpy as np
import pytest

from xray_dit.evaluation import detectability


def test_same_distribution_is_undetectable_even_with_more_features_than_a_fold_can_fit():
    rng = np.random.default_rng(0)
    # 150 features for 200 training images per fold: a fit separates its own training data perfectly,
    # so only truly held-out scores stay near 0.5.
    real, synthetic = rng.normal(size=(120, 10, 15)), rng.normal(size=(130, 10, 15))
    result = detectability.detectability_auc(real, synthetic, seed=1, n_boot=300)
    assert result.lower < 0.5 < result.upper
    assert abs(result.auc - 0.5) < 0.1
    assert result.fold_aucs.shape == (5,) and (result.n_real, result.n_synthetic) == (120, 130)


def test_shifted_distribution_is_detected():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(100, 8))
    synthetic = rng.normal(size=(100, 8)) + 0.8  # every feature shifted: d' = 0.8·√8 ≈ 2.3, AUC ≈ 0.95
    result = detectability.detectability_auc(real, synthetic, seed=0, n_boot=300)
    assert result.auc > 0.9 and result.lower > 0.85
    assert (result.fold_aucs > 0.8).all()


def test_detectability_is_seeded_and_refuses_bad_inputs():
    rng = np.random.default_rng(2)
    real, synthetic = rng.normal(size=(30, 4)), rng.normal(size=(30, 4)) + 0.3
    first, again = (detectability.detectability_auc(real, synthetic, seed=3, n_boot=50) for _ in range(2))
    assert first.auc == again.auc and (first.lower, first.upper) == (again.lower, again.upper)
    with pytest.raises(ValueError, match="same features"):
        detectability.detectability_auc(real, synthetic[:, :3])
    with pytest.raises(ValueError, match="at least 5 real and synthetic"):
        detectability.detectability_auc(real[:4], synthetic)
    with pytest.raises(ValueError, match="one feature vector"):
        detectability.detectability_auc(real[:, 0], synthetic[:, 0])
