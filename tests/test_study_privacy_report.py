"""Phase 08's report text: the one-sentence privacy headline and ordinals."""

import re

import ml_collections

from xray_dit.study import privacy_report
from xray_dit.study import privacy as privacy_phase


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
