"""Evaluation room, calibration: class-matched privacy thresholds, positive controls, duplicate threshold."""

import functools

import numpy as np
import pytest
import scipy.stats

from xray_dit.data import phantom
from xray_dit.evaluation import calibration, privacy

euclidean_nn = functools.partial(privacy.nearest_neighbours, metric="euclidean")


def brute_nearest(query, reference):
    return np.linalg.norm(query[:, None] - reference[None], axis=-1).min(axis=1)


# ---- class-matched calibration -----------------------------------------------------------------------------
def test_class_matched_reference_uses_validation_when_it_holds_enough():
    rng = np.random.default_rng(0)
    validation, train = rng.normal(size=(12, 5)), rng.normal(size=(40, 5))
    patients = np.repeat(np.arange(20), 2)
    ref = calibration.class_matched_reference(validation, train, patients, min_count=12, nearest_fn=euclidean_nn,
                                              validation_patients=np.arange(12) // 3)
    assert ref.source == "validation" and ref.heldout_count == 12 and ref.heldout_patients == 4
    np.testing.assert_allclose(ref.distances, brute_nearest(validation, train), atol=1e-12)
    np.testing.assert_array_equal(ref.reference_index, np.arange(40))
    assert "12 validation images" in ref.description


def test_class_matched_reference_cross_fits_training_patients_when_validation_is_small():
    rng = np.random.default_rng(1)
    validation, train = rng.normal(size=(3, 5)), rng.normal(size=(60, 5))
    patients = rng.integers(0, 25, 60).astype(str)   # 1..several images per patient
    ref = calibration.class_matched_reference(validation, train, patients, min_count=10, nearest_fn=euclidean_nn,
                                              folds=5, seed=4)
    assert ref.source == "train, patient folds" and ref.heldout_count == 60
    assert ref.heldout_patients == len(set(patients))
    fold = calibration.patient_folds(patients, 5, 4)
    for patient in set(patients):   # a patient's images share one fold
        assert len(set(fold[patients == patient])) == 1
    assert len(set(fold)) == 5 and np.bincount(np.bincount(fold)).size > 0
    # Each image against every image of the other folds, by brute force.
    expected = [np.linalg.norm(train[fold != fold[i]] - train[i], axis=1).min() for i in range(60)]
    np.testing.assert_allclose(ref.distances, expected, atol=1e-12)
    assert "only 3 images" in ref.description and "fewer than 10" in ref.description
    # Never against an image of the same patient: a patient whose two images are identical gets no distance 0.
    twins = np.concatenate([train, train[:1]])
    ref_twins = calibration.class_matched_reference(validation, twins, np.append(patients, patients[0]),
                                                    min_count=10, nearest_fn=euclidean_nn, folds=5, seed=4)
    assert ref_twins.distances.min() > 0
    # More folds: a reference nearer the whole set, so distances can only shrink or stay.
    loo = calibration.class_matched_reference(validation, train, patients, min_count=10, nearest_fn=euclidean_nn,
                                              folds=1000)
    assert np.mean(loo.distances) <= np.mean(ref.distances)


def test_patient_folds_deal_patients_evenly_and_reproducibly():
    patients = np.repeat(np.arange(23), 3)
    fold = calibration.patient_folds(patients, 5, seed=0)
    counts = np.bincount(fold[::3])     # patients per fold
    assert counts.max() - counts.min() <= 1 and counts.sum() == 23
    np.testing.assert_array_equal(fold, calibration.patient_folds(patients, 5, seed=0))
    assert not np.array_equal(fold, calibration.patient_folds(patients, 5, seed=1))
    assert len(set(calibration.patient_folds(patients[:6], 5, seed=0))) == 2   # never more folds than patients


def test_calibration_cross_fitted_on_training_images_spares_new_patients(phantom_target_class):
    """Without validation images the threshold comes from the training images themselves; new patients' images
    must still be flagged at about the percentile's rate, not more."""
    (train, train_patients), fresh = phantom_target_class["train"], phantom_target_class["test"][0]
    nearest = functools.partial(privacy.shift_tolerant_pixel_nearest_neighbours, max_shift=2)
    reference = calibration.class_matched_reference(train[:0], train, train_patients, min_count=30,
                                                    nearest_fn=nearest)
    assert reference.source == "train, patient folds"
    threshold = privacy.privacy_threshold(heldout_to_train_distances=reference.distances, percentile=1.0)
    flagged = privacy.is_memorised(nearest(fresh, train)[0], threshold)
    assert len(flagged) >= 50 and flagged.mean() <= 0.05, (flagged.mean(), len(flagged))


# ---- positive controls -------------------------------------------------------------------------------------
def test_near_copies_move_scale_and_noise_their_sources_as_documented():
    rng = np.random.default_rng(2)
    train = rng.random((5, 12, 10))
    copies = calibration.near_copies(train, 8, np.random.default_rng(3), noise=0.0, max_shift=2, contrast=0.2)
    assert copies.images.shape == (8, 12, 10) and np.abs(copies.offsets).max() <= 2
    assert np.all((copies.contrast_factors >= 0.8) & (copies.contrast_factors <= 1.2))
    rows, cols = np.arange(12)[:, None], np.arange(10)[None, :]
    for image, source, (dy, dx), factor in zip(*copies):
        moved = train[source][np.clip(rows - dy, 0, 11), np.clip(cols - dx, 0, 9)]
        np.testing.assert_allclose(image, moved.mean() + factor * (moved - moved.mean()), atol=1e-12)
    assert sorted(copies.source_index[:5]) == list(range(5)) and len(set(copies.source_index[5:])) == 3
    noisy = calibration.near_copies(train[:, :, :, None], 200, np.random.default_rng(4), noise=0.1, max_shift=0,
                                    contrast=0.0)
    assert noisy.images.shape == (200, 12, 10, 1)
    sources = train[noisy.source_index]
    residual = (noisy.images[..., 0] - sources) / sources.std(axis=(1, 2))[:, None, None]
    assert residual.std() == pytest.approx(0.1, rel=0.05)


def test_detection_rates_count_flags_with_clopper_pearson_intervals():
    rates = calibration.detection_rates([0.1, 0.2, 0.3, 0.5], [0.25, 0.4, 0.6, 0.7, 0.8, 0.9], threshold=0.3)
    assert (rates.detected, rates.false_positive, rates.copies, rates.fresh) == (0.75, 1 / 6, 4, 6)
    # Clopper-Pearson from the beta quantiles: [B(α/2; x, n-x+1), B(1-α/2; x+1, n-x)].
    assert rates.detected_ci == pytest.approx((scipy.stats.beta.ppf(0.025, 3, 2), scipy.stats.beta.ppf(0.975, 4, 1)))
    assert rates.false_positive_ci == pytest.approx((scipy.stats.beta.ppf(0.025, 1, 6),
                                                     scipy.stats.beta.ppf(0.975, 2, 5)))


@pytest.fixture(scope="module")
def phantom_target_class():
    """Cardiomegaly phantom images at 32 px by split, with patient ids: smooth anatomy, ribs, pixel noise."""
    cohort = phantom.make_cohort(8000, seed=0)
    sets = {}
    for split in phantom.SPLITS:
        records = [r for r in cohort if r.split == split and r.labels[0] == 1]
        sets[split] = (np.stack([phantom.render(r, 32) for r in records]) / 127.5 - 1.0,
                       np.array([r.patient_id for r in records]))
    return sets


def test_class_matched_threshold_catches_shifted_copies_and_spares_new_patients(phantom_target_class):
    (train, train_patients), (validation, _) = phantom_target_class["train"], phantom_target_class["validation"]
    fresh = phantom_target_class["test"][0]   # patients neither in training nor in the calibration
    nearest = functools.partial(privacy.shift_tolerant_pixel_nearest_neighbours, max_shift=2)
    reference = calibration.class_matched_reference(validation, train, train_patients, min_count=30,
                                                    nearest_fn=nearest)
    assert reference.source == "validation" and reference.heldout_count >= 30
    threshold = privacy.privacy_threshold(heldout_to_train_distances=reference.distances, percentile=1.0)
    copies = calibration.near_copies(train, 60, np.random.default_rng(0), noise=0.05, max_shift=2, contrast=0.1)
    copy_d, copy_nn, _ = nearest(copies.images, train)
    rates = calibration.detection_rates(copy_d, nearest(fresh, train)[0], threshold)
    assert rates.detected >= 0.95 and rates.false_positive <= 0.05, rates
    assert np.mean(copy_nn == copies.source_index) >= 0.95   # and it names the copied image
    # Plain pixel correlation, calibrated the same way, misses most copies moved by a pixel or two.
    plain_threshold = privacy.privacy_threshold(
        heldout_to_train_distances=privacy.pixel_nearest_neighbours(validation, train)[0], percentile=1.0)
    moved = copies.offsets.any(axis=1)
    plain = calibration.detection_rates(privacy.pixel_nearest_neighbours(copies.images[moved], train)[0],
                                        privacy.pixel_nearest_neighbours(fresh, train)[0], plain_threshold)
    assert plain.detected < 0.5, plain


# ---- duplicate threshold -----------------------------------------------------------------------------------
def test_pair_correlations_match_brute_force_and_skip_pairs_within_a_patient():
    rng = np.random.default_rng(5)
    images = rng.random((9, 6, 6)) + np.linspace(0, 1, 36).reshape(6, 6)
    groups = np.array([0, 0, 1, 2, 2, 2, 3, 4, 5])
    corr = np.corrcoef(images.reshape(9, -1))
    got, exhaustive = calibration.pair_correlations(images, groups=groups)
    expected = [corr[i, j] for i in range(9) for j in range(i + 1, 9) if groups[i] != groups[j]]
    assert exhaustive and len(got) == len(expected) == 36 - 1 - 3
    np.testing.assert_allclose(np.sort(got), np.sort(expected), atol=1e-12)
    threshold = float(np.median(expected))
    above = calibration.pair_fraction_above(images, threshold, groups=groups)
    assert above == (np.mean(np.array(expected) > threshold), 32, True)
    assert calibration.percentile_threshold(images, 90.0, groups=groups) == pytest.approx(np.percentile(expected, 90))


def test_pair_fraction_above_samples_pairs_when_there_are_many():
    rng = np.random.default_rng(6)
    images = rng.random((300, 4, 4)) + np.linspace(0, 1, 16).reshape(4, 4)
    exact = calibration.pair_fraction_above(images, 0.7)
    sampled = calibration.pair_fraction_above(images, 0.7, max_pairs=20_000, seed=1)
    assert exact.exhaustive and exact.pairs == 300 * 299 // 2
    assert not sampled.exhaustive and sampled.pairs == 20_000
    assert sampled.fraction == pytest.approx(exact.fraction, abs=4 * np.sqrt(exact.fraction / 20_000) + 1e-3)
    with pytest.raises(ValueError, match="two groups"):
        calibration.pair_fraction_above(images, 0.7, groups=np.zeros(300))
