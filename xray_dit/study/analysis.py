"""Phases 7 and 8: comparing the arms, and the privacy and quality of the synthetic set.

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
from xray_dit.evaluation import classification, ctr_oracle, plots, privacy, statistics, synthesis
from xray_dit.study import analysis_plan, contrasts, filters, probe
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


# --------------------------------------------------------------------------------------------------
# Phase 8: privacy and quality of the synthetic set
# --------------------------------------------------------------------------------------------------
def privacy_and_quality(context: StudyContext) -> dict:
    config = context.config
    out_dir = context.phase_dir("08_privacy")
    names = list(config.data.labels)
    target = config.data.target_class
    t = names.index(target)
    thresholds = context.results["05_filter"]["thresholds"]
    probe_model = context.probe()

    synthetic = context.synthetic_images()   # before filtering
    train = context.real_images("train")
    heldout = context.real_images("validation")
    test_minority = context.real_images("test", only_class=target)
    train_minority = train.subset(train.labels[:, t] == 1)
    heldout_minority = heldout.subset(heldout.labels[:, t] == 1)

    # Nearest-training-image distances in pixel space (1 - correlation) and their threshold: the filter phase
    # computed both for every generated image (before filtering) and every validation image.
    with (context.phase_dir("05_filter") / filters.PIXEL_DISTANCES).open("rb") as f, np.load(f) as saved:
        syn_d, syn_nn, heldout_d = (saved[k] for k in ("synthetic_to_train", "synthetic_nearest_train",
                                                       "heldout_to_train"))
    px = {k: probe.downsample_for_pixels(v.images) for k, v in
          dict(syn=synthetic, train_min=train_minority, heldout_min=heldout_minority).items()}
    memorised = privacy.memorisation_rate(syn_d, thresholds["privacy_pixel"])
    hist = plots.plot_distance_histograms({"synthetic → train": syn_d, "held-out real → train": heldout_d},
                                          thresholds["privacy_pixel"], out_dir / "nn_distance_histogram.png",
                                          xlabel="1 − pixel correlation to the nearest training image")
    closest = np.argsort(syn_d)[:8]
    pairs = plots.plot_nn_pairs(synthetic.images[closest], train.images[syn_nn[closest]], syn_d[closest],
                                out_dir / "closest_pairs.png")
    # Membership inference: are training minority images closer to the synthetic set than held-out ones?
    mia = {}
    if len(heldout_minority) and len(train_minority):
        member_d, _ = privacy.pixel_nearest_neighbours(px["train_min"], px["syn"])
        nonmember_d, _ = privacy.pixel_nearest_neighbours(px["heldout_min"], px["syn"])
        mia = {"auc": privacy.membership_inference_auc(member_d, nonmember_d), "members": len(member_d),
               "non_members": len(nonmember_d)}

    # Quality in the classifier's feature space: real minority test images vs synthetic (all, and accepted).
    _, syn_feats = probe_model(synthetic.images)
    _, real_feats = probe_model(test_minority.images)
    per_sample = json.loads((context.phase_dir("05_filter") / "per_sample.json").read_text())
    accepted = np.logical_and.reduce([np.asarray(per_sample[k], bool) for k in per_sample if k.startswith("pass_")])
    quality = {}
    for name, feats in (("all generated", syn_feats), ("accepted", syn_feats[accepted])):
        if len(feats) >= 2 and len(real_feats) >= 2:
            prdc = synthesis.precision_recall_density_coverage(real_feats, feats, k=min(5, len(real_feats) - 1, len(feats) - 1))
            quality[name] = {"frechet_distance": synthesis.frechet_distance(real_feats, feats), **prdc._asdict(),
                             "n": int(len(feats))}
    diversity = {"synthetic": synthesis.ms_ssim_diversity(synthetic.images, num_pairs=500, value_range=(-1.0, 1.0)),
                 "real minority (train)": synthesis.ms_ssim_diversity(train_minority.images, num_pairs=500,
                                                                      value_range=(-1.0, 1.0))
                 if len(train_minority) >= 2 else float("nan")}
    grid = plots.image_grid(np.concatenate([train_minority.images[:8], synthetic.images[:16]]),
                            out_dir / "real_vs_synthetic.png", nrow=8,
                            title="top row: real training images of the target class; below: synthetic")

    result = {"memorisation_rate": memorised, "privacy_threshold_pixel": thresholds["privacy_pixel"],
              "synthetic_to_train_median": float(np.median(syn_d)), "heldout_to_train_median": float(np.median(heldout_d)),
              "membership_inference": mia, "quality": quality, "ms_ssim_diversity": diversity,
              "real_minority_test": len(test_minority), "synthetic": len(synthetic),
              "figures": {"histogram": str(hist), "closest_pairs": str(pairs), "grid": str(grid)}}
    if config.data.name == "cxr_phantom":
        result["ctr_oracle"] = _ctr_fidelity(synthetic.images, train_minority.images, out_dir)
    (out_dir / "privacy.json").write_text(json.dumps(result, indent=2, default=float))
    return result


def _ctr_fidelity(synthetic: np.ndarray, real_minority: np.ndarray, out_dir: epath.Path) -> dict:
    """Label fidelity by the phantom's CTR oracle: does a generated 'Cardiomegaly' image have CTR > 0.5?"""
    syn = np.array([ctr_oracle.measure_ctr(im) for im in synthetic])
    real = np.array([ctr_oracle.measure_ctr(im) for im in real_minority])
    measurable = np.isfinite(syn)
    figure = None
    if measurable.any() and np.isfinite(real).any():
        figure = plots.plot_ctr_distributions(real[np.isfinite(real)], syn[measurable], out_dir / "ctr_distributions.png")
    return {"fraction_ctr_above_0.5": float(np.mean(syn[measurable] > 0.5)) if measurable.any() else float("nan"),
            "fraction_of_all_generated_ctr_above_0.5": float(np.mean(np.where(measurable, syn, 0) > 0.5)),
            "measurable": int(measurable.sum()), "generated": int(len(syn)),
            "synthetic_ctr_mean": float(np.nanmean(syn)) if measurable.any() else float("nan"),
            "real_minority_ctr_mean": float(np.nanmean(real)) if np.isfinite(real).any() else float("nan"),
            "figure": str(figure) if figure else None}
