"""The pre-specified analysis plan: made from the config alone, and the verdict rule and its sentence."""


import pytest

from tests.helpers.compare_arms import study_config
from xray_dit.study import analysis_plan


def test_the_plan_comes_from_the_config_alone():
    plan = analysis_plan.analysis_plan(study_config(primary_count=0, synthetic_counts=(100, 400)))
    assert plan["primary_count"] == 400
    assert plan["primary_contrasts"] == ["real + 400 synthetic − real + 400 oversampled real"]
    assert [m["name"] for m in plan["secondary_family"]] == [
        "real + 100 synthetic", "real + 400 synthetic", "real + 100 oversampled real", "real + 400 oversampled real",
        "real + 400 VAE round-trip real"]
    assert plan["decision_estimand"] == "single_model" and plan["warnings"] == []
    assert plan["text"][0].startswith("**Primary endpoint**")
    several = analysis_plan.analysis_plan(study_config(generators=("target_only", "class_conditional"),
                                                  generator_seeds=(0, 1), bootstrap_samples=50))
    assert len(several["primary_contrasts"]) == 2 and "Holm-adjusted across the 2 generator" in several["text"][0]
    assert any("secondary family cannot show" in w for w in several["warnings"])
    with pytest.raises(ValueError, match="primary_estimand"):
        analysis_plan.analysis_plan(study_config(primary_estimand="median"))


@pytest.mark.parametrize("estimate, adjusted_p, significant, phrase", [
    (0.03, 0.01, True, "a statistically significant improvement"),
    (-0.03, 0.01, True, "a statistically significant decrease"),
    (0.03, 0.05, True, "a statistically significant improvement"),
    (0.03, 0.0501, False, "no statistically significant difference"),
    (-0.2, 0.9, False, "no statistically significant difference"),
    (0.2, float("nan"), False, "no statistically significant difference"),
])
def test_the_verdict_rule_and_its_sentence(estimate, adjusted_p, significant, phrase):
    assert analysis_plan.verdict(estimate, adjusted_p) == (significant, phrase)
    difference = {"estimate": estimate, "lower": estimate - 0.05, "upper": estimate + 0.05, "p_value": 0.02}
    sentence = analysis_plan.statement("B", "A", "AUC", difference, adjusted_p, 3, "single_model")
    assert sentence.startswith("'B' vs 'A': AUC difference") and phrase in sentence
    if not significant:
        for claim in ("a statistically significant", "improvement", "decrease"):
            assert claim not in sentence
    assert "Holm-adjusted over 3 comparisons" in sentence
