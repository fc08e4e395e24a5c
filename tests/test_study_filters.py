"""Phase 05's filters on constructed inputs: pass flags at each threshold's edge, near-duplicates, the duplicate
threshold, the realism distance. The micro study runs them end to end."""


import ml_collections
import numpy as np
import pytest

from xray_dit.study import filters
from xray_dit.study.probe import ImageSet


def test_pass_flags_follow_each_threshold_at_its_edge():
    thresholds = {"fidelity_probability": 0.5, "realism_knn": 0.2, "privacy_pixel": 0.1, "privacy_feature": 0.05,
                  "duplicate_correlation": 0.98}
    scores = {"p_target": [0.5, 0.49, 0.9, 0.9], "knn_distance": [0.2, 0.1, 0.21, 0.1],
              "nn_pixel_distance": [0.11, 0.1, 0.5, 0.5], "nn_feature_distance": [0.06, 0.5, 0.05, 0.5],
              "duplicate_correlation": [-1.0, 0.98, 0.5, 0.99]}
    flags = filters.pass_flags(scores, thresholds)
    assert flags["label fidelity"].tolist() == [True, False, True, True]
    assert flags["realism"].tolist() == [True, True, False, True]
    # At a privacy threshold counts as memorised (privacy.is_memorised), in either space.
    assert flags["privacy"].tolist() == [True, False, False, True]
    assert flags["duplicates"].tolist() == [True, True, True, False]


def test_duplicate_correlations_keep_one_of_each_near_identical_pair():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(5, 8, 8))
    images[3] = images[1] * 2 + 0.5          # perfectly correlated with image 1
    images[4] = images[3]                    # and with it: compared only with kept images (0, 1, 2)
    corr = filters.duplicate_correlations(images, 0.98)
    assert corr[0] == -1.0 and corr[3] == pytest.approx(1.0) and corr[4] == pytest.approx(1.0)
    assert filters.greedy_duplicates(images, 0.98).tolist() == [False, False, False, True, True]
    assert corr[2] == pytest.approx(max(np.corrcoef(images[2].ravel(), images[i].ravel())[0, 1] for i in (0, 1)))


def test_duplicate_threshold_is_fixed_or_a_percentile_of_real_pairs_of_different_patients():
    rng = np.random.default_rng(3)
    images = rng.normal(size=(30, 8, 8)) + np.linspace(0, 3, 64).reshape(8, 8)
    real = ImageSet(images, np.ones((30, 1)), np.arange(30), np.repeat(np.arange(15), 2))
    fixed = filters._duplicate_reference(ml_collections.ConfigDict(
        {"duplicate_threshold": 0.98, "duplicate_threshold_percentile": 0.0}), real, "Cardiomegaly")
    assert fixed["threshold"] == 0.98 and fixed["source"] == "the fixed study.duplicate_threshold"
    assert fixed["real_pairs"] == 30 * 29 // 2 - 15 and fixed["real_pairs_exhaustive"]
    calibrated = filters._duplicate_reference(ml_collections.ConfigDict(
        {"duplicate_threshold": 0.98, "duplicate_threshold_percentile": 90.0}), real, "Cardiomegaly")
    assert calibrated["threshold"] < 0.98 and "90th percentile" in calibrated["source"]
    assert calibrated["real_pair_fraction_above"] == pytest.approx(0.1, abs=0.01)


def test_realism_distance_on_constructed_sets():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(20, 4))
    query = np.concatenate([reference[:2], rng.normal(size=(2, 4)) * 10])
    d = filters.kth_neighbour_distance(query, reference, 1)
    assert d[0] == pytest.approx(0.0, abs=1e-9) and d[1] == pytest.approx(0.0, abs=1e-9)
    loo = filters.kth_neighbour_distance(reference, reference, 1, exclude_self=True)
    assert np.all(loo > 0)
