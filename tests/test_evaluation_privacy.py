"""Evaluation room, privacy: nearest neighbours, threshold from held-out data, memorisation, membership AUC."""

import numpy as np
import pytest

from xray_dit.evaluation import privacy


def test_nearest_neighbours_match_brute_force_for_both_metrics():
    rng = np.random.default_rng(0)
    query, reference = rng.normal(size=(20, 8)), rng.normal(size=(50, 8))
    euclidean = np.linalg.norm(query[:, None] - reference[None], axis=-1)
    unit_query = query / np.linalg.norm(query, axis=1, keepdims=True)
    unit_reference = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    cosine = 1 - unit_query @ unit_reference.T
    for metric, full in (("euclidean", euclidean), ("cosine", cosine)):
        distances, indices = privacy.nearest_neighbours(query, reference, metric=metric)
        np.testing.assert_array_equal(indices, full.argmin(axis=1))
        np.testing.assert_allclose(distances, full.min(axis=1), atol=1e-12)
    with pytest.raises(ValueError, match="metric"):
        privacy.nearest_neighbours(query, reference, metric="manhattan")


def test_pixel_nearest_neighbours_use_pearson_correlation_in_chunks():
    rng = np.random.default_rng(1)
    reference = rng.random((23, 16, 16))
    # Brightness and contrast changes of reference images 4 and 17, plus an unrelated image.
    query = np.stack([2.0 * reference[4] + 0.3, 0.5 * reference[17] - 0.1, rng.random((16, 16))])[..., None]
    distances, indices = privacy.pixel_nearest_neighbours(query, reference[..., None], chunk_size=5)
    assert list(indices[:2]) == [4, 17]
    np.testing.assert_allclose(distances[:2], 0.0, atol=1e-12)
    corr = np.corrcoef(query.reshape(3, -1), reference.reshape(23, -1))[:3, 3:]
    assert indices[2] == corr[2].argmax()
    np.testing.assert_allclose(distances[2], 1 - corr[2].max(), rtol=1e-10)
    unchunked = privacy.pixel_nearest_neighbours(query, reference[..., None], chunk_size=1000)
    np.testing.assert_array_equal(unchunked[1], indices)
    np.testing.assert_allclose(unchunked[0], distances, atol=1e-12)


def test_shift_tolerant_pixel_nearest_neighbours_match_brute_force_over_offsets():
    rng = np.random.default_rng(4)
    reference = rng.random((6, 11, 9))
    s = 2
    query = np.stack([np.roll(reference[3], (1, -2), axis=(0, 1)), rng.random((11, 9)), 3 * reference[5] + 1])
    best = np.full((3, 6), -np.inf)   # brute force: Pearson correlation of every window pair
    for i in range(3):
        for j in range(6):
            for dy in range(-s, s + 1):
                for dx in range(-s, s + 1):
                    window = query[i, s + dy:11 - s + dy, s + dx:9 - s + dx]
                    corr = np.corrcoef(window.ravel(), reference[j, s:11 - s, s:9 - s].ravel())[0, 1]
                    best[i, j] = max(best[i, j], corr)
    distances, indices, offsets = privacy.shift_tolerant_pixel_nearest_neighbours(query[..., None], reference, s,
                                                                                  chunk_size=4)
    np.testing.assert_array_equal(indices, best.argmax(axis=1))
    np.testing.assert_allclose(distances, 1 - best.max(axis=1), atol=1e-12)
    assert indices[0] == 3 and tuple(offsets[0]) == (1, -2) and distances[0] < 1e-12
    assert indices[2] == 5 and tuple(offsets[2]) == (0, 0)
    with pytest.raises(ValueError, match="2·max_shift"):
        privacy.shift_tolerant_pixel_nearest_neighbours(query, reference, max_shift=5)


def test_privacy_threshold_takes_only_explicitly_named_heldout_distances():
    heldout = np.linspace(0.0, 1.0, 101)
    assert privacy.privacy_threshold(heldout_to_train_distances=heldout, percentile=5.0) == pytest.approx(0.05)
    with pytest.raises(TypeError):
        privacy.privacy_threshold(heldout)  # positional use would hide which split the distances came from
    with pytest.raises(ValueError, match="percentile"):
        privacy.privacy_threshold(heldout_to_train_distances=heldout, percentile=0)


def test_copies_of_training_images_are_caught_as_memorised():
    rng = np.random.default_rng(2)
    train, heldout = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    copied = rng.choice(400, 20, replace=False)
    synthetic = np.concatenate([train[copied] + 1e-6 * rng.normal(size=(20, 16)), rng.normal(size=(80, 16))])
    heldout_distances, _ = privacy.nearest_neighbours(heldout, train, metric="euclidean")
    threshold = privacy.privacy_threshold(heldout_to_train_distances=heldout_distances, percentile=1.0)
    distances, indices = privacy.nearest_neighbours(synthetic, train, metric="euclidean")
    flagged = privacy.is_memorised(distances, threshold)
    assert flagged[:20].all()
    np.testing.assert_array_equal(indices[:20], copied)
    assert flagged[20:].mean() <= 0.05  # independent images: about the percentile's 1 %
    assert privacy.memorisation_rate(distances, threshold) == pytest.approx(flagged.mean())


def test_membership_inference_auc_is_one_for_copies_and_one_half_for_independent_samples():
    rng = np.random.default_rng(3)
    train, heldout = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))

    def attack(synthetic):
        members, _ = privacy.nearest_neighbours(train, synthetic, metric="cosine")
        nonmembers, _ = privacy.nearest_neighbours(heldout, synthetic, metric="cosine")
        return privacy.membership_inference_auc(members, nonmembers)

    assert attack(train.copy()) == pytest.approx(1.0)
    assert abs(attack(rng.normal(size=(300, 8))) - 0.5) < 0.08
    with pytest.raises(ValueError, match="non-empty"):
        privacy.membership_inference_auc([], [0.1])
