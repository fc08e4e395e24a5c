"""The study's filter, privacy and quality parts on constructed inputs (the micro study runs them end to end)."""

import re

import ml_collections
import numpy as np
import pytest

from xray_dit.data import phantom
from xray_dit.study import filters, privacy_report, quality
from xray_dit.study import privacy as privacy_phase
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


def test_synthetic_sets_pool_every_generator_and_its_accepted_images():
    scores = {"a": {"accepted": [True, False, True]}, "b": {"accepted": [False, True]}}
    sets = privacy_phase.synthetic_sets(scores)
    assert {k: v.tolist() for k, v in sets.items()} == {
        "all generated": [0, 1, 2, 3, 4], "accepted": [0, 2, 4], "all generated (a)": [0, 1, 2],
        "accepted (a)": [0, 2], "all generated (b)": [3, 4], "accepted (b)": [4]}
    one = privacy_phase.synthetic_sets({"a": scores["a"]})
    assert {k: v.tolist() for k, v in one.items()} == {"all generated": [0, 1, 2], "accepted": [0, 2]}


@pytest.fixture(scope="module")
def target_class_images():
    """Cardiomegaly phantom images at 32 px by split, with patient ids."""
    cohort = phantom.make_cohort(900, seed=1, spec=phantom.PhantomSpec(cardiomegaly_prevalence=0.3))
    sets = {}
    for split in phantom.SPLITS:
        records = [r for r in cohort if r.split == split and r.labels[0] == 1]
        images = np.stack([phantom.render(r, 32) for r in records]) / 127.5 - 1.0
        sets[split] = ImageSet(images.astype(np.float32), np.ones((len(records), 1)),
                               np.array([r.image_id for r in records]), np.array([r.patient_id for r in records]))
    return sets


def _pixel_probe(images):
    """A stand-in classifier: probabilities 1, features the 8 x 8 average-pooled pixels."""
    feats = np.asarray(images).reshape(len(images), 8, 4, 8, 4).mean(axis=(2, 4)).reshape(len(images), -1)
    return np.ones((len(images), 1)), feats + 2.0


def test_privacy_controls_flag_injected_copies_and_spare_new_patients(target_class_images):
    train, fresh = target_class_images["train"], target_class_images["test"]
    study = ml_collections.ConfigDict({"privacy_max_shift": 2, "near_copies": 30, "privacy_percentile": 1.0,
                                       "calibration_min_count": 20})
    validation = target_class_images["validation"]
    thresholds = filters._privacy_thresholds(study, train, validation, _pixel_probe(train.images)[1],
                                             _pixel_probe(validation.images)[1])
    assert thresholds["calibration"]["pixel"]["heldout_count"] == len(thresholds["distances"]["pixel"])
    controls, distances = privacy_phase.privacy_controls(
        study, train, fresh, {"privacy_pixel": thresholds["pixel"], "privacy_feature": thresholds["feature"]},
        _pixel_probe, seed=0)
    detector, whole_filter = controls["memorisation_detector"], controls["privacy_filter"]
    assert controls["copies"] == 30 and controls["fresh"] == len(fresh) == len(distances["fresh"])
    assert detector["detected"] >= 0.95 and detector["false_positive"] <= 0.1, detector
    for rates in (detector, whole_filter):
        assert rates["detected_ci"][0] <= rates["detected"] <= rates["detected_ci"][1]
        assert rates["false_positive_ci"][0] <= rates["false_positive"] <= rates["false_positive_ci"][1]
    # The filter rejects in either space, so it flags at least what the pixel detector flags.
    assert whole_filter["detected"] >= detector["detected"]
    assert whole_filter["false_positive"] >= detector["false_positive"]
    assert np.mean(distances["copies"] <= thresholds["pixel"]) == detector["detected"]


def test_equal_n_table_draws_every_row_at_one_n_and_leaves_small_sets_out():
    rng = np.random.default_rng(0)
    reference, real_other = rng.normal(size=(40, 3)), rng.normal(size=(30, 3))
    synthetic = {"all generated": rng.normal(size=(25, 3)) + 1.0, "accepted": rng.normal(size=(4, 3))}
    table = quality.equal_n_table(synthetic, reference, real_other, rng.normal(size=(50, 3)) + 5.0)
    assert table["left_out"] == {"accepted": 4} and table["n"] == 25
    rows = table["rows"]
    assert list(rows) == ["all generated", quality.synthesis.AS_GOOD_AS_REAL, quality.synthesis.WRONG_CLASS]
    assert {r["n"] for r in rows.values()} == {25}
    fd = {name: r["frechet_distance"]["mean"] for name, r in rows.items()}
    assert fd[quality.synthesis.AS_GOOD_AS_REAL] < fd["all generated"] < fd[quality.synthesis.WRONG_CLASS]
    assert quality.equal_n_table({"accepted": rng.normal(size=(4, 3))}, reference, real_other, real_other)["rows"] == {}


def _privacy_result(lower, upper):
    mia = {"auc": 0.53 if lower < 0.5 else 0.62, "lower": lower, "upper": upper, "p_value": 0.3, "members": 60,
           "non_members": 30, "member_patients": 40, "nonmember_patients": 20}
    return {"memorisation": {"flagged": 2, "generated": 500, "rate": 0.004, "per_generator": {}},
            "privacy_controls": {"memorisation_detector": {"detected": 1.0, "detected_ci": [0.96, 1.0]}},
            "membership_inference": {privacy_phase.DISTANCE_ATTACK: {"all generated": mia, "accepted": mia}},
            "sets": {"all generated": 500, "accepted": 180}}


def test_headline_is_one_sentence_with_the_adversary_result_and_interval():
    config = ml_collections.ConfigDict({"data": {"target_class": "Cardiomegaly"}})
    text = privacy_report.headline(_privacy_result(0.44, 0.61), {}, config)
    assert len(re.findall(r"[.!?](\s|$)", text)) == 1 and text.endswith(".")
    for part in ("patient's chest X-ray", "180 synthetic Cardiomegaly images", "no better than chance",
                 "AUC 0.53, 95 % CI 0.44–0.61", "100 % (95 % CI 96 %–100 %)", "2 of the 500 generated"):
        assert part in text, part
    assert "did better than chance" in privacy_report.headline(_privacy_result(0.55, 0.7), {}, config)


def test_ordinals():
    assert [privacy_report.ordinal(v) for v in (1, 2, 3, 5, 11, 12, 13, 21, 22, 2.5)] == [
        "1st", "2nd", "3rd", "5th", "11th", "12th", "13th", "21st", "22nd", "2.5th"]


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
