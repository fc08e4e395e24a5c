"""Phase 07 on hand-made prediction files (tests/helpers/compare_arms.py): the primary contrast, the Holm family,
per-arm metrics, figures, and arms from older results.

study/analysis.py on hand-made rows: every per-arm threshold is chosen on validation predictions.

The validation and test scores are made so that each threshold differs between the two splits, and
the expected thresholds are worked out by brute force over the validation scores here."""

import json

import numpy as np
import pytest

from tests.helpers.compare_arms import TARGET, study_context, write_arm
from xray_dit.evaluation import classification, statistics
from xray_dit.study import analysis, analysis_plan, contrasts


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Two doses; the synthetic arms at the primary dose from two generator seeds, one of them much better."""
    root = tmp_path_factory.mktemp("compare")
    g = dict(primary=True, roundtrip_prob=0.0)
    retrained = {
        "real + 4 synthetic": write_arm(root, "syn4", 1.2, 10, kind="synthetic", count=4, generator="target_only_seed0",
                                   generator_seed=0, primary=False, roundtrip_prob=0.0),
        "real + 8 synthetic (target_only_seed0)": write_arm(root, "syn8g0", 4.0, 20, kind="synthetic", count=8,
                                                       generator="target_only_seed0", generator_seed=0, **g),
        "real + 8 synthetic (target_only_seed1)": write_arm(root, "syn8g1", 4.0, 30, kind="synthetic", count=8,
                                                       generator="target_only_seed1", generator_seed=1, **g),
        "real + 4 oversampled real": write_arm(root, "over4", 1.0, 40, kind="oversampled", count=4, generator=None,
                                          generator_seed=None, primary=False, roundtrip_prob=0.0),
        "real + 8 oversampled real": write_arm(root, "over8", 1.0, 50, kind="oversampled", count=8, generator=None,
                                          generator_seed=None, **g),
    }
    context = study_context(root, retrained)
    # The round-trip arm reuses the baseline's own files: the same models, so it must differ by exactly 0.
    retrained["real + 8 VAE round-trip real"] = {"key": "rt8", "folder": "", "kind": "vae_roundtrip", "count": 8,
                                                 "generator": None, "generator_seed": None, **g,
                                                 "runs": context.results["01_baseline"]["runs"]}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(analysis, "_train_target_positives", lambda config: 42)
        out = analysis.compare(context)
    return {"out": out, "context": context, "root": root}


def _family(out) -> dict:
    return {e["name"]: e for e in out["family"]}


def test_primary_contrast_pools_the_generator_seeds_against_oversampled_at_the_primary_dose(compared):
    out, context = compared["out"], compared["context"]
    (primary,) = out["primary"]
    assert primary["name"] == "real + 8 synthetic (target_only, 2 generator seeds)"
    assert primary["control"] == "real + 8 oversampled real"
    assert primary["arms"] == ["real + 8 synthetic (target_only_seed0)", "real + 8 synthetic (target_only_seed1)"]
    # The same numbers as the bootstrap on the hand-picked rows: synthetic (2 generators x 2 seeds) − oversampled.
    retrained = context.results["06_retrain"]["arms"]
    tests = contrasts.target_test_set(contrasts.read_runs(context.results["01_baseline"]["runs"], "test")[1], 0)
    rows = {a: contrasts.arm_rows(retrained[a]["runs"], tests, 0) for a in (*primary["arms"], primary["control"])}
    expected = statistics.two_level_bootstrap_difference(
        tests.labels, rows[primary["control"]].test, np.concatenate([rows[a].test for a in primary["arms"]]),
        tests.patients, seeds_a={"seed": ["0", "1"]},
        seeds_b={"seed": ["0", "1", "0", "1"], "generator": ["0", "0", "1", "1"]}, n_boot=400, seed=0)
    for estimand in ("ensemble", "single_model"):
        assert primary[estimand]["estimate"] == pytest.approx(getattr(expected, estimand).estimate)
        assert primary[estimand]["lower"] == pytest.approx(getattr(expected, estimand).lower)
        assert primary[estimand]["upper"] == pytest.approx(getattr(expected, estimand).upper)
    assert primary["p_value"] == primary["single_model"]["p_value"]   # the configured decision estimand
    assert primary["p_holm"] == primary["p_value"]                    # one variant: nothing to adjust
    assert primary["significant"] and "a statistically significant improvement" in primary["statement"]
    assert out["primary_missing"] == []


def test_holm_is_applied_over_every_arm_against_the_baseline(compared):
    out = compared["out"]
    family = _family(out)
    assert list(family) == ["real + 4 synthetic", "real + 8 synthetic (target_only, 2 generator seeds)",
                            "real + 4 oversampled real", "real + 8 oversampled real", "real + 8 VAE round-trip real"]
    holm = statistics.holm({name: e["single_model"]["p_value"] for name, e in family.items()})
    for name, e in family.items():
        assert e["p_holm"] == pytest.approx(holm.adjusted_p[name])
        assert e["significant"] == holm.reject[name]
        assert f"over {len(family)} comparisons" in e["statement"]
    assert out["statements"] == [e["statement"] for e in out["family"]]


def test_a_clearly_better_arm_is_significant_and_the_same_arm_is_not(compared):
    family = _family(compared["out"])
    better = family["real + 8 synthetic (target_only, 2 generator seeds)"]
    assert better["significant"] and better["single_model"]["estimate"] > 0.1
    assert "a statistically significant improvement" in better["statement"]
    same = family["real + 8 VAE round-trip real"]
    for estimand in ("ensemble", "single_model"):
        assert same[estimand]["estimate"] == 0.0 and same[estimand]["p_value"] == 1.0
        assert same[estimand]["lower"] == same[estimand]["upper"] == 0.0
    assert not same["significant"]
    assert "no statistically significant difference" in same["statement"]
    assert "a statistically significant" not in same["statement"]


def test_both_estimands_and_the_per_arm_metrics_are_reported(compared):
    out = compared["out"]
    for entry in out["primary"] + out["family"]:
        for estimand in ("ensemble", "single_model"):
            d = entry[estimand]
            assert d["lower"] <= d["estimate"] <= d["upper"] and 0 < d["p_value"] <= 1
    assert set(out["arms"]) == {"real only", *compared["context"].results["06_retrain"]["arms"]}
    for arm, row in out["arms"].items():
        assert np.mean(list(row["seed_auc"].values())) == pytest.approx(row["per_class_mean_sd"][TARGET][0])
        for key in ("target_ensemble_auc_ci", "auprc"):
            estimate, lower, upper = row[key]
            assert lower <= estimate <= upper
        sens = row["sensitivity_at_specificity"]
        assert sens["threshold_source"].startswith("validation")
        assert sens["sensitivity"][1] <= sens["sensitivity"][0] <= sens["sensitivity"][2]
        assert ("vs_baseline" in row) == (arm != "real only")
    assert out["train_target_positives"] == 42 and out["fraction"] == 1.0


def test_sensitivity_threshold_comes_from_validation_alone(compared):
    """The 90 %-specificity threshold is the validation ensemble's, whatever the test predictions say."""
    root = compared["root"]
    runs = compared["context"].results["01_baseline"]["runs"]
    val = [classification.read_predictions(root / "baseline" / f"seed_{s}" / "predictions_validation.csv")
           for s in runs]
    known = val[0]["mask"][:, 0]
    expected = classification.threshold_at_specificity(val[0]["labels"][known, 0],
                                                       np.mean([v["probs"][known, 0] for v in val], axis=0), 0.9)
    assert compared["out"]["arms"]["real only"]["sensitivity_at_specificity"]["threshold"] == pytest.approx(expected)


def test_figures_and_compare_json(compared):
    out, root = compared["out"], compared["root"]
    for key in ("roc", "auc_ci", "forest", "dose_response"):
        assert out["figures"][key] and (root / "07_compare" / out["figures"][key].split("/")[-1]).exists(), key
    saved = json.loads((root / "07_compare" / "compare.json").read_text())
    assert saved["primary"][0]["name"] == out["primary"][0]["name"]
    plan = json.loads((root / "07_compare" / "analysis_plan.json").read_text())
    assert plan["text"] == analysis_plan.analysis_plan(compared["context"].config)["text"]
    families = {(r["family"], r["n_added"]) for r in out["dose_response"]}
    assert {("synthetic (target_only)", 4), ("synthetic (target_only)", 8), ("oversampled", 4)} <= families


def test_arms_without_the_new_keys_take_the_configured_primary_dose(tmp_path, monkeypatch):
    """06 results that carry only name, kind, count and runs: primary when count == the primary dose."""
    retrained = {"real + 8 synthetic": write_arm(tmp_path, "syn", 3.0, 10, kind="synthetic", count=8, name="x"),
                 "real + 8 oversampled real": write_arm(tmp_path, "over", 1.0, 20, kind="oversampled", count=8,
                                                        name="y")}
    context = study_context(tmp_path, retrained, synthetic_counts=(200,), primary_count=0, bootstrap_samples=100)
    monkeypatch.setattr(analysis, "_train_target_positives", lambda config: 7)
    out = analysis.compare(context)
    (primary,) = out["primary"]
    assert (primary["name"], primary["control"]) == ("real + 8 synthetic", "real + 8 oversampled real")
    assert [e["name"] for e in out["family"]] == list(retrained)
    assert out["figures"]["dose_response"] is None and len(out["statements"]) == 2


VAL_Y = np.array([0] * 10 + [1] * 5)
VAL_S = np.array([0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40, 0.45, 0.50, 0.30, 0.45, 0.60, 0.70, 0.80])
TEST_Y = np.array([0] * 6 + [1] * 4)
TEST_S = np.array([0.10, 0.20, 0.30, 0.60, 0.65, 0.70, 0.75, 0.80, 0.90, 0.95])


def _summary(val_y=VAL_Y):
    tests = contrasts.TargetTestSet(image_ids=np.arange(10), known=np.ones(10, bool), labels=TEST_Y,
                                    patients=np.arange(10), all_labels=TEST_Y[:, None].astype(np.float32),
                                    all_mask=np.ones((10, 1), bool))
    # Two seeds with the same scores, so the seed ensemble's mean is exactly the scores above.
    rows = contrasts.ArmRows(test=np.stack([TEST_S, TEST_S]), test_ensemble=TEST_S[:, None],
                             validation=np.stack([VAL_S, VAL_S]), validation_labels=val_y, seeds=["0", "1"],
                             generators=["", ""])
    entry = {"runs": {s: {"test_auc": {TARGET: 0.9}} for s in ("0", "1")}}
    row, _, confusion = analysis._arm_summary(analysis.BASELINE, entry, {analysis.BASELINE: rows}, tests, [TARGET],
                                              TARGET, n_boot=20)
    return row, confusion


def _youden_by_brute_force(y, s):
    """max over observed scores t of P(s >= t | 1) − P(s >= t | 0); ties to the highest t."""
    j = {t: np.mean(s[y == 1] >= t) - np.mean(s[y == 0] >= t) for t in np.unique(s)}
    best = max(j.values())
    return max(t for t, v in j.items() if v >= best - 1e-12)


def _lowest_threshold_at_specificity(y, s, specificity):
    return min(t for t in np.unique(s) if np.mean(s[y == 0] < t) >= specificity - 1e-12)


def test_youden_and_sensitivity_thresholds_come_from_validation_and_apply_unchanged_to_test():
    row, confusion = _summary()
    youden = _youden_by_brute_force(VAL_Y, VAL_S)
    assert youden == 0.60 and _youden_by_brute_force(TEST_Y, TEST_S) == 0.75   # the splits disagree
    assert row["threshold"] == pytest.approx(youden) and row["threshold_source"].startswith("validation")
    called = TEST_S >= youden
    assert confusion.tolist() == row["test_confusion"] == [
        [int(np.sum(~called & (TEST_Y == 0))), int(np.sum(called & (TEST_Y == 0)))],
        [int(np.sum(~called & (TEST_Y == 1))), int(np.sum(called & (TEST_Y == 1)))]]

    sens = row["sensitivity_at_specificity"]
    at_90 = _lowest_threshold_at_specificity(VAL_Y, VAL_S, 0.9)
    assert at_90 == 0.50 and _lowest_threshold_at_specificity(TEST_Y, TEST_S, 0.9) == 0.75
    assert sens["specificity"] == 0.9 and sens["threshold"] == pytest.approx(at_90)
    assert sens["sensitivity"][0] == pytest.approx(np.mean(TEST_S[TEST_Y == 1] >= at_90))
    assert sens["test_specificity"] == pytest.approx(np.mean(TEST_S[TEST_Y == 0] < at_90))


def test_a_validation_split_of_one_class_chooses_no_threshold_from_the_test_split():
    row, _ = _summary(val_y=np.zeros_like(VAL_Y))
    assert row["threshold"] == 0.5 and "only one class" in row["threshold_source"]
    assert row["sensitivity_at_specificity"]["threshold"] is None
