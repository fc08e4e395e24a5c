"""Phase 07 on hand-made prediction files: the pre-specified plan, the primary contrast, the Holm family,
per-arm metrics, and the verdict rule and its sentences.

Arms are folders of `predictions_{validation,test}.csv` written by the project's own writer; an arm's
target-class probabilities are the label times its signal plus seed noise, so a stronger signal is a
clearly better arm and an arm that reuses the baseline's files is the same arm.
"""

import json

import ml_collections
import numpy as np
import pytest

from xray_dit.evaluation import classification, statistics
from xray_dit.study import analysis, analysis_plan, arms, contrasts, training
from xray_dit.study.context import StudyContext

LABELS = ("Cardiomegaly", "Effusion")
TARGET = "Cardiomegaly"
N_TEST, N_VAL = 160, 60


def _config(**study):
    values = dict(seeds=(0, 1), synthetic_counts=(4, 8), primary_count=8, bootstrap_samples=400,
                  arms=("synthetic", "oversampled", "vae_roundtrip"), swept_arms=("synthetic", "oversampled"),
                  primary_estimand="single_model", privacy_percentile=1.0)
    values.update(study)
    data = {"name": "nih_chestxray14", "builder_config": "256", "image_size": 256, "labels": LABELS,
            "target_class": TARGET, "target_fraction": 1.0, "data_dir": ""}
    return ml_collections.ConfigDict({"data": data, "study": values})


def _split(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    labels = np.stack([np.arange(n) % 3 == 0, rng.random(n) < 0.3], axis=1).astype(np.float32)
    return {"ids": [f"img{i}" for i in range(n)], "patients": [f"p{i // 2}" for i in range(n)], "labels": labels}


SPLITS = {"test": _split(N_TEST, 0), "validation": _split(N_VAL, 1)}


def _run(folder, signal: float, seed: int) -> dict:
    """One trained model's prediction files; its noise depends on the seed only, so arms pair by seed."""
    probs = {}
    for split, data in SPLITS.items():
        rng = np.random.default_rng([seed, len(data["ids"])])
        probs[split] = 1 / (1 + np.exp(-(signal * data["labels"] + rng.normal(size=data["labels"].shape))))
        classification.write_predictions(folder / f"predictions_{split}.csv", data["ids"], data["patients"],
                                         data["labels"], probs[split], LABELS)
    return {"workdir": str(folder), "test_auc": classification.per_class_auc(SPLITS["test"]["labels"], probs["test"],
                                                                             LABELS)}


def _arm(root, key: str, signal: float, seed_offset: int = 0, **fields) -> dict:
    runs = {str(s): _run(root / key / f"seed_{s}", signal, s + seed_offset) for s in (0, 1)}
    return {"key": key, "folder": str(root / key), **fields, "runs": runs}


def _context(root, retrained: dict, **study) -> StudyContext:
    (root / "07_compare").mkdir(parents=True, exist_ok=True)
    baseline = {"arm": "real only", "runs": {str(s): _run(root / "baseline" / f"seed_{s}", 1.0, s) for s in (0, 1)}}
    return StudyContext(config=_config(**study), workdir=root, mesh=None,
                        results={"01_baseline": baseline, "06_retrain": {"arms": retrained}})


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Two doses; the synthetic arms at the primary dose from two generator seeds, one of them much better."""
    root = tmp_path_factory.mktemp("compare")
    g = dict(primary=True, roundtrip_prob=0.0)
    retrained = {
        "real + 4 synthetic": _arm(root, "syn4", 1.2, 10, kind="synthetic", count=4, generator="target_only_seed0",
                                   generator_seed=0, primary=False, roundtrip_prob=0.0),
        "real + 8 synthetic (target_only_seed0)": _arm(root, "syn8g0", 4.0, 20, kind="synthetic", count=8,
                                                       generator="target_only_seed0", generator_seed=0, **g),
        "real + 8 synthetic (target_only_seed1)": _arm(root, "syn8g1", 4.0, 30, kind="synthetic", count=8,
                                                       generator="target_only_seed1", generator_seed=1, **g),
        "real + 4 oversampled real": _arm(root, "over4", 1.0, 40, kind="oversampled", count=4, generator=None,
                                          generator_seed=None, primary=False, roundtrip_prob=0.0),
        "real + 8 oversampled real": _arm(root, "over8", 1.0, 50, kind="oversampled", count=8, generator=None,
                                          generator_seed=None, **g),
    }
    context = _context(root, retrained)
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
    retrained = {"real + 8 synthetic": _arm(tmp_path, "syn", 3.0, 10, kind="synthetic", count=8, name="x"),
                 "real + 8 oversampled real": _arm(tmp_path, "over", 1.0, 20, kind="oversampled", count=8, name="y")}
    context = _context(tmp_path, retrained, synthetic_counts=(200,), primary_count=0, bootstrap_samples=100)
    monkeypatch.setattr(analysis, "_train_target_positives", lambda config: 7)
    out = analysis.compare(context)
    (primary,) = out["primary"]
    assert (primary["name"], primary["control"]) == ("real + 8 synthetic", "real + 8 oversampled real")
    assert [e["name"] for e in out["family"]] == list(retrained)
    assert out["figures"]["dose_response"] is None and len(out["statements"]) == 2


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


# ---- the plan and the rule ---------------------------------------------------------------------------
def test_the_plan_comes_from_the_config_alone():
    plan = analysis_plan.analysis_plan(_config(primary_count=0, synthetic_counts=(100, 400)))
    assert plan["primary_count"] == 400
    assert plan["primary_contrasts"] == ["real + 400 synthetic − real + 400 oversampled real"]
    assert [m["name"] for m in plan["secondary_family"]] == [
        "real + 100 synthetic", "real + 400 synthetic", "real + 100 oversampled real", "real + 400 oversampled real",
        "real + 400 VAE round-trip real"]
    assert plan["decision_estimand"] == "single_model" and plan["warnings"] == []
    assert plan["text"][0].startswith("**Primary endpoint**")
    several = analysis_plan.analysis_plan(_config(generators=("target_only", "class_conditional"),
                                                  generator_seeds=(0, 1), bootstrap_samples=50))
    assert len(several["primary_contrasts"]) == 2 and "Holm-adjusted across the 2 generator" in several["text"][0]
    assert any("secondary family cannot show" in w for w in several["warnings"])
    with pytest.raises(ValueError, match="primary_estimand"):
        analysis_plan.analysis_plan(_config(primary_estimand="median"))


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
