"""Phase 05's filters on constructed inputs: pass flags at each threshold's edge, near-duplicates, the duplicate
threshold, the realism distance. The micro study runs them end to end.

study/filters.py's phase on constructed images: thresholds from target-class train/validation images only,
and a sample is accepted when it passes all four criteria.

A stand-in context serves 16 px images of two classes (target: a horizontal gradient, other class: a
vertical one) and refuses the test split; a stand-in probe gives the target probability from one marker
pixel and 4 x 4 block means as features. Every threshold and score is recomputed here with plain numpy."""

import json
import types

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


SIZE = 16
STUDY = dict(fidelity_threshold=0.5, realism_percentile=90.0, privacy_percentile=5.0, duplicate_threshold=0.98,
             duplicate_threshold_percentile=0.0, calibration_min_count=4, privacy_max_shift=0)
TARGET_PATTERN = np.tile(np.linspace(-0.6, 0.6, SIZE), (SIZE, 1))
OTHER_PATTERN = TARGET_PATTERN.T


def _images(rng, pattern, n, marker):
    images = np.clip(pattern + rng.normal(scale=0.25, size=(n, SIZE, SIZE)), -1, 1)
    images[:, 0, 0] = marker
    return images


def _real(rng, n_per_class: int, split: str) -> ImageSet:
    images = np.concatenate([_images(rng, TARGET_PATTERN, n_per_class, 1.0),
                             _images(rng, OTHER_PATTERN, n_per_class, -1.0)])
    labels = np.zeros((2 * n_per_class, 2), np.float32)
    labels[:n_per_class, 0] = 1
    labels[n_per_class:, 1] = 1
    ids = np.array([f"{split}{i}" for i in range(len(images))])
    return ImageSet(images, labels, ids, np.array([f"{split}_p{i // 2}" for i in range(len(images))]))


class _Probe:
    source = "stand-in probe"

    def __call__(self, images):
        images = np.asarray(images)
        p = np.where(images[:, 0, 0] > 0, 0.9, 0.1)
        feats = images.reshape(len(images), 4, 4, 4, 4).mean(axis=(2, 4)).reshape(len(images), -1) + 2.0
        return np.stack([p, 1 - p], axis=1), feats


def _cosine(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return 1 - a @ b.T


def _one_minus_corr(a, b):
    return np.array([[1 - np.corrcoef(x.ravel(), y.ravel())[0, 1] for y in b] for x in a])


@pytest.fixture
def filtered(tmp_path):
    rng = np.random.default_rng(0)
    real = {"train": _real(rng, 14, "train"), "validation": _real(rng, 6, "validation")}
    train_target = real["train"].images[:14]
    generated = np.stack([
        _images(rng, TARGET_PATTERN, 1, 1.0)[0],    # 0: a new target-class image: passes all four
        _images(rng, TARGET_PATTERN, 1, -1.0)[0],   # 1: the probe does not call it the target class
        train_target[3],                            # 2: a copy of a training image
        _images(rng, OTHER_PATTERN, 1, 1.0)[0],     # 3: marked as the target, looks like the other class
        _images(rng, TARGET_PATTERN, 1, 1.0)[0],    # 4: another new one
    ])
    generated = np.concatenate([generated, generated[4:5]])   # 5: a duplicate of sample 4
    synthetic = ImageSet(generated, np.tile([[1.0, 0.0]], (len(generated), 1)),
                         np.array([f"s{i}.png" for i in range(len(generated))]), np.full(len(generated), ""))

    def real_images(split, **_):
        assert split in ("train", "validation"), f"the filters read the {split} split"
        return real[split]

    (tmp_path / "05_filter").mkdir()
    context = types.SimpleNamespace(
        config=ml_collections.ConfigDict({"data": {"target_class": "Cardiomegaly",
                                                   "labels": ("Cardiomegaly", "Effusion")}, "study": STUDY}),
        phase_dir=lambda phase: tmp_path / phase, probe=_Probe, real_images=real_images,
        generators=lambda: [{"name": "g0", "variant": "v", "seed": 0, "out_dir": str(tmp_path / "gen")}],
        synthetic_images=lambda name: synthetic)
    out = filters.run_filters(context)
    per_sample = json.loads((tmp_path / "05_filter" / "g0" / filters.PER_SAMPLE).read_text())
    return {"out": out, "per_sample": per_sample, "real": real, "generated": generated}


def test_thresholds_come_from_target_class_training_and_validation_images_only(filtered):
    out, real = filtered["out"], filtered["real"]
    train, validation = real["train"].images[:14], real["validation"].images[:6]   # the target class only
    train_feats, validation_feats = _Probe()(train)[1], _Probe()(validation)[1]
    within = _cosine(train_feats, train_feats)
    np.fill_diagonal(within, np.inf)                                        # leave each image out
    fifth = np.sort(within, axis=1)[:, filters.REALISM_K - 1]
    privacy_pixel = np.percentile(_one_minus_corr(validation, train).min(axis=1), STUDY["privacy_percentile"])
    privacy_feature = np.percentile(_cosine(validation_feats, train_feats).min(axis=1), STUDY["privacy_percentile"])
    assert out["thresholds"] == pytest.approx({
        "fidelity_probability": 0.5, "realism_knn": np.percentile(fifth, STUDY["realism_percentile"]),
        "privacy_pixel": privacy_pixel, "privacy_feature": privacy_feature, "duplicate_correlation": 0.98})
    assert out["real_minority_train"] == 14
    # Real pairs for the duplicate threshold: the 14 target images of 7 patients, pairs across patients.
    assert out["duplicate_reference"]["real_pairs"] == 14 * 13 // 2 - 7
    assert out["calibration"]["pixel"]["source"] == "validation" and out["calibration"]["pixel"]["heldout_count"] == 6


def test_a_sample_is_accepted_only_when_it_passes_every_criterion(filtered):
    out, per_sample, generated = filtered["out"], filtered["per_sample"], filtered["generated"]
    train = filtered["real"]["train"].images[:14]
    thresholds = out["thresholds"]
    probs, feats = _Probe()(generated)
    knn = np.sort(_cosine(feats, _Probe()(train)[1]), axis=1)[:, filters.REALISM_K - 1]
    pixel = _one_minus_corr(generated, train).min(axis=1)
    feature = _cosine(feats, _Probe()(train)[1]).min(axis=1)
    corr = np.corrcoef(generated.reshape(len(generated), -1))
    kept, duplicate = [], []
    for i in range(len(generated)):                  # greedy: compared with earlier kept samples only
        duplicate.append(bool(kept) and corr[i, kept].max() > 0.98)
        if not duplicate[-1]:
            kept.append(i)
    expected = {"label_fidelity": probs[:, 0] >= 0.5, "realism": knn <= thresholds["realism_knn"],
                "privacy": (pixel > thresholds["privacy_pixel"]) & (feature > thresholds["privacy_feature"]),
                "duplicates": ~np.array(duplicate)}
    # The construction: each of samples 1, 2, 3, 5 fails the criterion it was made to fail; 0 and 4 pass all.
    assert [k for k in expected if not expected[k][1]] == ["label_fidelity"]
    assert not expected["privacy"][2]
    assert [k for k in expected if not expected[k][3]] == ["realism"]
    assert [k for k in expected if not expected[k][5]] == ["duplicates"]
    for name, flags in expected.items():
        assert per_sample[f"pass_{name}"] == flags.tolist(), name
    assert per_sample["accepted"] == [True, False, False, False, True, False]
    assert out["generators"]["g0"]["accepted"] == out["accepted"] == 2
    assert out["generators"]["g0"]["flagged_as_memorised"] == int((~expected["privacy"]).sum())
