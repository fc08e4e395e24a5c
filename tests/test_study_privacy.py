"""Phase 08's privacy part on constructed inputs: the synthetic sets pooled per generator, and the privacy
controls (injected copies flagged, new patients spared). The micro study runs it end to end."""


import ml_collections
import numpy as np
import pytest

from xray_dit.data import phantom
from xray_dit.study import filters
from xray_dit.study import privacy as privacy_phase
from xray_dit.study.probe import ImageSet


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
