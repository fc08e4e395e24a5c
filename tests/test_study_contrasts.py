"""Phase 07's contrasts: the arm plan grouped into one comparison per kind, dose and generator variant, and a
missing control named instead of a primary contrast.

study/contrasts.py on hand-made entries: the verdict of a family is decided by its Holm-adjusted p."""

import ml_collections
import pytest

from xray_dit.study import arms, contrasts, training


def test_the_arm_plan_groups_into_one_comparison_per_kind_dose_and_generator_variant():
    """06_retrain's arms as `arms.plan_arms` names them: generator seeds of one variant pool, variants do not."""
    study = ml_collections.ConfigDict(dict(arms=arms.ARM_KINDS, swept_arms=("synthetic", "oversampled"),
                                           synthetic_counts=(4, 8), primary_count=8, roundtrip_prob=0.5))
    generators = [{"name": "target_only_seed0", "seed": 0}, {"name": "target_only_seed1", "seed": 1},
                  {"name": "class_conditional_seed0", "seed": 0}]
    plan = arms.plan_arms(study, accepted_count={g["name"]: 100 for g in generators}, have_phantom=True,
                          generators=generators)
    retrained = {arm["name"]: {k: arm[k] for k in training._ARM_FIELDS} for arm in plan}
    variants = {"target_only_seed0": "target_only", "target_only_seed1": "target_only",
                "class_conditional_seed0": "class_conditional"}
    groups = contrasts.group_arms(retrained, variants, primary_count=0)
    assert [(g.name, g.primary) for g in groups] == [
        ("real + 4 synthetic (target_only, 2 generator seeds)", False),
        ("real + 4 synthetic (class_conditional_seed0)", False),
        ("real + 8 synthetic (target_only, 2 generator seeds)", True),
        ("real + 8 synthetic (class_conditional_seed0)", True),
        ("real + 4 oversampled real", False), ("real + 8 oversampled real", True),
        ("real + 8 phantom positives", True), ("real + 8 VAE round-trip real", True),
        ("real + 8 synthetic (target_only, 2 generator seeds), real round-tripped p=0.5", True),
        ("real + 8 synthetic (class_conditional_seed0), real round-tripped p=0.5", True)]
    assert groups[2].arms == ("real + 8 synthetic (target_only_seed0)", "real + 8 synthetic (target_only_seed1)")
    assert groups[3].variant == "class_conditional"
    # Without 04_generate's entries the variant is the generator's name without its seed.
    assert [g.name for g in contrasts.group_arms(retrained, {}, 0)] == [g.name for g in groups]


def test_a_missing_control_is_named_instead_of_a_primary_contrast():
    group = contrasts.Group("real + 8 synthetic", "synthetic", 8, None, ("real + 8 synthetic",), True)
    entries, missing = contrasts.primary_contrasts([group], {}, None, n_boot=10, alpha=0.05,
                                                   estimand="single_model", metric="AUC")
    assert entries == [] and missing == ["no oversampled-real arm at the primary dose ran"]


def _entry(name: str, estimate: float, p: float) -> dict:
    difference = {"estimate": estimate, "lower": estimate - 0.02, "upper": estimate + 0.02, "p_value": p}
    return {"name": name, "single_model": difference, "ensemble": dict(difference, p_value=1.0), "p_value": p}


def test_a_family_is_judged_on_holm_adjusted_p_values_not_on_each_raw_p():
    # Raw p-values all at or below alpha = 0.05; Holm by hand (m = 3, sorted 0.01, 0.03, 0.04):
    #   0.01 * 3 = 0.03;  max(0.03, 0.03 * 2 = 0.06) = 0.06;  max(0.06, 0.04 * 1 = 0.04) = 0.06.
    # Only the smallest survives. Plain p would call all three significant; Bonferroni would give
    # 0.03, 0.09, 0.12; a Holm without the running maximum would give 0.04 to the largest p.
    entries = [_entry("B1", 0.05, 0.01), _entry("B2", 0.04, 0.04), _entry("B3", -0.03, 0.03)]
    contrasts._adjust(entries, "single_model", 0.05, "A", "AUC")
    assert [e["p_holm"] for e in entries] == pytest.approx([0.03, 0.06, 0.06])
    assert [e["significant"] for e in entries] == [True, False, False]
    assert "a statistically significant improvement" in entries[0]["statement"]
    for e in entries[1:]:
        assert "no statistically significant difference" in e["statement"]
        assert "a statistically significant" not in e["statement"]
        assert e["statement"].startswith(f"'{e['name']}' vs 'A'") and "over 3 comparisons p = 0.06" in e["statement"]
