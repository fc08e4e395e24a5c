"""Phase 7: comparing the arms.

Phase 7 follows the pre-specified plan (`analysis_plan`, written to analysis_plan.json before any
prediction is read): the primary contrast (synthetic − oversampled real at the primary dose), every arm
against the real-only baseline with Holm's correction, both by the two-level bootstrap of `contrasts`;
per arm, the seed ensemble's AUC, AUPRC and sensitivity at 90 % specificity with patient-bootstrap
intervals, ROC curves and confusion matrices at thresholds from validation, and DeLong's test as a
secondary check that decides nothing.
"""

from __future__ import annotations

import json

import numpy as np
from absl import logging
from etils import epath

from xray_dit.data import pipeline
from xray_dit.evaluation import classification, plots, statistics
from xray_dit.study import analysis_plan, contrasts
from xray_dit.study.context import StudyContext

BASELINE = "real only"
ALPHA = analysis_plan.ALPHA


# --------------------------------------------------------------------------------------------------
# Phase 7: compare
# --------------------------------------------------------------------------------------------------
def all_arms(context: StudyContext) -> dict[str, dict]:
    arms = {BASELINE: context.results["01_baseline"]}
    arms.update(context.results["06_retrain"]["arms"])
    return arms


def compare(context: StudyContext) -> dict:
    config = context.config
    out_dir = context.phase_dir("07_compare")
    plan = analysis_plan.analysis_plan(config)
    (out_dir / "analysis_plan.json").write_text(json.dumps(plan, indent=2))   # fixed before any number
    names, target = list(config.data.labels), config.data.target_class
    t = names.index(target)
    n_boot, estimand = int(config.study.bootstrap_samples), plan["decision_estimand"]
    metric = f"{target} test AUC"
    arms = all_arms(context)
    tests = contrasts.target_test_set(contrasts.read_runs(arms[BASELINE]["runs"], "test")[1], t)
    rows = {arm: contrasts.arm_rows(entry["runs"], tests, t, contrasts.generator_of(entry), arm)
            for arm, entry in arms.items()}
    per_arm = {arm: _arm_summary(arm, entry, rows, tests, names, target, n_boot) for arm, entry in arms.items()}

    retrained = context.results["06_retrain"]["arms"]
    groups = contrasts.group_arms(retrained, _generator_variants(context.results),
                                  contrasts.fallback_primary_count(config.study, retrained))
    primary, missing = contrasts.primary_contrasts(groups, rows, tests, n_boot=n_boot, alpha=ALPHA,
                                                   estimand=estimand, metric=metric)
    family, by_family = contrasts.baseline_family(groups, rows, BASELINE, tests, n_boot=n_boot, alpha=ALPHA,
                                                  estimand=estimand, metric=metric)
    dose_response = statistics.dose_response_rows(by_family)
    out = {"target": target, "fraction": float(config.data.get("target_fraction", 1.0)),
           "train_target_positives": _train_target_positives(config),
           "test_images": int(tests.known.sum()), "test_positives": int(tests.labels.sum()),
           "test_patients": int(len(np.unique(tests.patients))), "bootstrap_samples": n_boot, "alpha": ALPHA,
           "plan": plan, "primary": primary, "primary_missing": missing, "family": family,
           "dose_response": dose_response, "arms": {arm: summary[0] for arm, summary in per_arm.items()},
           "statements": [entry["statement"] for entry in family]}
    out["figures"] = _figures(per_arm, family, dose_response, estimand, target, out_dir)
    (out_dir / "compare.json").write_text(json.dumps(out, indent=2, default=float))
    for line in [e["statement"] for e in primary] + missing + out["statements"]:
        logging.info("compare: %s", line)
    return out


def _arm_summary(arm: str, entry: dict, rows: dict[str, contrasts.ArmRows], tests: contrasts.TargetTestSet,
                 names: list[str], target: str, n_boot: int) -> tuple[dict, classification.RocCurve, np.ndarray]:
    """One arm's row of compare.json, its ROC curve and its test confusion matrix (seed ensemble)."""
    runs, own = entry["runs"], rows[arm]
    seeds = {seed: run["test_auc"] for seed, run in runs.items()}
    scores = own.test.mean(axis=0)
    ci = classification.bootstrap_auc_ci(tests.labels, scores, tests.patients, n_boot=n_boot, seed=0, alpha=ALPHA)
    row = {"kind": entry.get("kind", "baseline"), "count": int(entry.get("count", 0)),
           "generator": contrasts.generator_of(entry) or None,
           "seed_auc": {s: float(v[target]) for s, v in seeds.items()},
           "per_class_mean_sd": {c: list(classification.mean_sd_over_seeds([seeds[s][c] for s in seeds]))
                                 for c in names},
           "ensemble_auc": classification.per_class_auc(tests.all_labels, own.test_ensemble, names, tests.all_mask),
           "target_ensemble_auc_ci": [ci.estimate, ci.lower, ci.upper],
           **contrasts.ensemble_metrics(tests, own, n_boot=n_boot, alpha=ALPHA)}
    val_scores = own.validation.mean(axis=0)
    if np.unique(own.validation_labels).size == 2:
        threshold = classification.youden_threshold(own.validation_labels, val_scores)
        source = "validation (Youden's J)"
    else:  # a validation split without positives cannot choose one; never fall back on the test split
        threshold, source = 0.5, "0.5: the validation split holds only one class"
    confusion = classification.confusion(tests.labels, scores, threshold)
    row.update(threshold=threshold, threshold_source=source, test_confusion=confusion.tolist())
    if arm != BASELINE:   # a secondary check beside the plan's bootstrap; it decides nothing
        base = rows[BASELINE].test.mean(axis=0)
        delong = classification.delong_test(tests.labels, scores, base)
        diff = classification.bootstrap_auc_difference_ci(tests.labels, scores, base, tests.patients,
                                                          n_boot=n_boot, seed=0, alpha=ALPHA)
        row["vs_baseline"] = {"delong_z": delong.z, "delong_p": delong.p_value,
                              "auc_difference_ci": [diff.estimate, diff.lower, diff.upper]}
    return row, classification.binary_roc_curve(tests.labels, scores), confusion


def _figures(per_arm: dict, family: list[dict], dose_response: list[dict], estimand: str, target: str,
             out_dir: epath.Path) -> dict:
    auc_ci = {arm: summary[0]["target_ensemble_auc_ci"] for arm, summary in per_arm.items()}
    estimand_text = analysis_plan.ESTIMANDS[estimand].split(" (")[0]
    figures = {
        "roc": str(plots.plot_roc_curves({arm: s[1] for arm, s in per_arm.items()}, out_dir / "roc_by_arm.png",
                                         title=f"{target}: ROC per arm (test, seed ensemble)")),
        "auc_ci": str(plots.plot_auc_with_ci(auc_ci, out_dir / "auc_ci_by_arm.png",
                                             title=f"{target} AUC, patient-bootstrap 95% CI (test)")),
        "confusion": {arm: str(plots.plot_confusion_matrix(s[2], [f"no {target}", target],
                                                           out_dir / f"confusion_{i}.png", title=f"{arm} (test)"))
                      for i, (arm, s) in enumerate(per_arm.items())},
        "forest": None, "dose_response": None}
    if family:
        differences = {e["name"] + (" *" if e["significant"] else ""): [e[estimand][k] for k in
                                                                        ("estimate", "lower", "upper")]
                       for e in family}
        figures["forest"] = str(plots.plot_auc_with_ci(
            differences, out_dir / "forest_vs_baseline.png", xlabel=f"{target} AUC difference vs {BASELINE}",
            reference=0.0, title=f"Every arm vs {BASELINE} ({estimand_text}; two-level bootstrap 95% CI; "
                                 "* Holm-significant)"))
    series = {}
    for row in dose_response:
        if row["estimand"] == estimand:
            series.setdefault(row["family"], []).append((row["n_added"], row["difference"], row["lower"],
                                                         row["upper"]))
    if any(len(points) > 1 for points in series.values()):
        figures["dose_response"] = str(plots.plot_difference_curves(
            series, out_dir / "dose_response.png", xlabel="images added to the real training set (N)",
            ylabel=f"{target} AUC difference vs {BASELINE}",
            title=f"Dose-response ({estimand_text}; two-level bootstrap 95% CI)"))
    return figures


def _generator_variants(results: dict) -> dict[str, str]:
    """Generator name → variant, from 04_generate's entries when it lists them."""
    generated = results.get("04_generate") or {}
    entries = generated.get("generators", []) if isinstance(generated, dict) else []
    return {str(e["name"]): str(e["variant"]) for e in entries if "name" in e and "variant" in e}


def _train_target_positives(config) -> int:
    """Real target-class images in the training split as the classifiers read it (after target_fraction)."""
    table = pipeline.metadata_table(config.data, "train", data_dir=config.data.data_dir or None)
    return int(len(table.positives(config.data.target_class)))
