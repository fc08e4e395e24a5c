"""Phase 7: comparing the arms.

Statistics on the test split: per arm, each seed's AUCs (mean ± sd over seeds) and the seed-ensemble
(mean probability over seeds) with a patient-level bootstrap 95 % CI; paired against the real-only
baseline on the same test images with DeLong's test and a patient-level bootstrap CI of the difference.
"""

from __future__ import annotations

import json

import numpy as np
from absl import logging
from etils import epath

from xray_dit.evaluation import classification, plots
from xray_dit.study.context import StudyContext

BASELINE = "real only"
ALPHA = 0.05


# --------------------------------------------------------------------------------------------------
# Phase 7: compare
# --------------------------------------------------------------------------------------------------
def all_arms(context: StudyContext) -> dict[str, dict]:
    arms = {BASELINE: context.results["01_baseline"]}
    arms.update(context.results["06_retrain"]["arms"])
    return arms


def _ensemble(runs: dict, split: str) -> dict:
    """Seed-ensemble predictions: mean probability over seeds, rows aligned by image id."""
    preds = [classification.read_predictions(epath.Path(run["workdir"]) / f"predictions_{split}.csv")
             for run in runs.values()]
    for other in preds[1:]:
        if not np.array_equal(other["image_id"], preds[0]["image_id"]):
            raise ValueError(f"{split} predictions of different seeds list different images")
    return dict(preds[0], probs=np.mean([p["probs"] for p in preds], axis=0))


def compare(context: StudyContext) -> dict:
    config = context.config
    out_dir = context.phase_dir("07_compare")
    names = list(config.data.labels)
    target = config.data.target_class
    t = names.index(target)
    n_boot = int(config.study.bootstrap_samples)
    arms = all_arms(context)

    results, curves, forest, confusions = {}, {}, {}, {}
    base_test = _ensemble(arms[BASELINE]["runs"], "test")
    known = base_test["mask"][:, t]
    y = base_test["labels"][known, t]
    patients = base_test["patient_id"][known]
    for arm, entry in arms.items():
        runs = entry["runs"]
        seeds = {seed: run["test_auc"] for seed, run in runs.items()}
        per_class = {c: classification.mean_sd_over_seeds([seeds[s][c] for s in seeds]) for c in names}
        test, val = _ensemble(runs, "test"), _ensemble(runs, "validation")
        if not np.array_equal(test["image_id"], base_test["image_id"]):
            raise ValueError(f"arm {arm!r} was tested on other images than the baseline")
        scores = test["probs"][known, t]
        ci = classification.bootstrap_auc_ci(y, scores, patients, n_boot=n_boot, seed=0, alpha=ALPHA)
        ensemble_aucs = classification.per_class_auc(test["labels"], test["probs"], names, test["mask"])
        row = {"seed_auc": {s: float(v[target]) for s, v in seeds.items()},
               "per_class_mean_sd": {c: list(v) for c, v in per_class.items()},
               "ensemble_auc": ensemble_aucs,
               "target_ensemble_auc_ci": [ci.estimate, ci.lower, ci.upper]}
        vy = val["labels"][val["mask"][:, t], t]
        if np.unique(vy).size == 2:
            threshold, source = classification.youden_threshold(vy, val["probs"][val["mask"][:, t], t]), "validation (Youden's J)"
        else:  # a validation split without positives cannot choose one; never fall back on the test split
            threshold, source = 0.5, "0.5: the validation split holds only one class"
        confusions[arm] = classification.confusion(y, scores, threshold)
        row["threshold"] = threshold
        row["threshold_source"] = source
        row["test_confusion"] = confusions[arm].tolist()
        if arm != BASELINE:
            delong = classification.delong_test(y, scores, base_test["probs"][known, t])
            diff = classification.bootstrap_auc_difference_ci(y, scores, base_test["probs"][known, t], patients,
                                                              n_boot=n_boot, seed=0, alpha=ALPHA)
            significant = bool(delong.p_value < ALPHA and (diff.lower > 0 or diff.upper < 0))
            row["vs_baseline"] = {"delong_z": delong.z, "delong_p": delong.p_value,
                                  "auc_difference_ci": [diff.estimate, diff.lower, diff.upper],
                                  "significant": significant}
        results[arm] = row
        curves[arm] = classification.binary_roc_curve(y, scores)
        forest[arm] = (ci.estimate, ci.lower, ci.upper)

    figures = {
        "roc": str(plots.plot_roc_curves(curves, out_dir / "roc_by_arm.png",
                                         title=f"{target}: ROC per arm (test, seed ensemble)")),
        "auc_ci": str(plots.plot_auc_with_ci(forest, out_dir / "auc_ci_by_arm.png",
                                             title=f"{target} AUC, patient-bootstrap 95% CI (test)")),
        "confusion": {arm: str(plots.plot_confusion_matrix(cm, [f"no {target}", target],
                                                           out_dir / f"confusion_{i}.png", title=f"{arm} (test)"))
                      for i, (arm, cm) in enumerate(confusions.items())},
    }
    statements = [_statement(arm, row, target) for arm, row in results.items() if arm != BASELINE]
    out = {"target": target, "test_images": int(known.sum()), "test_positives": int(y.sum()),
           "test_patients": int(len(np.unique(patients))), "arms": results, "figures": figures,
           "statements": statements, "bootstrap_samples": n_boot}
    (out_dir / "compare.json").write_text(json.dumps(out, indent=2, default=float))
    for s in statements:
        logging.info("compare: %s", s)
    return out


def _statement(arm: str, row: dict, target: str) -> str:
    vs = row["vs_baseline"]
    d, lo, hi = vs["auc_difference_ci"]
    verdict = "a statistically significant" if vs["significant"] else "no statistically significant"
    direction = ("improvement" if d > 0 else "decrease") if vs["significant"] else "difference"
    caveat = ""
    if not vs["significant"] and (vs["delong_p"] < ALPHA) != (lo > 0 or hi < 0):
        caveat = (" (the two tests disagree; a difference counts only when DeLong p < α and the patient-level "
                  "interval excludes 0, because DeLong treats the images of one patient as independent)")
    return (f"'{arm}' vs '{BASELINE}': {target} AUC difference {d:+.3f} (patient-bootstrap 95% CI "
            f"[{lo:+.3f}, {hi:+.3f}]; DeLong p = {vs['delong_p']:.3g}) — {verdict} {direction} at α = {ALPHA}"
            f"{caveat}.")
