"""Phases 7 and 8: comparing the arms, and the privacy and quality of the synthetic set.

Statistics on the test split: per arm, each seed's AUCs (mean ± sd over seeds) and the seed-ensemble
(mean probability over seeds) with a patient-level bootstrap 95 % CI; paired against the real-only
baseline on the same test images with DeLong's test and a patient-level bootstrap CI of the difference.
"""

from __future__ import annotations

import json

import numpy as np
from absl import logging
from etils import epath

from xray_dit.evaluation import classification, ctr_oracle, plots, privacy, synthesis
from xray_dit.study import filters, probe
from xray_dit.study.phases import StudyContext
from xray_dit.train.classifier import read_predictions

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
    preds = [read_predictions(epath.Path(run["workdir"]) / f"predictions_{split}.csv") for run in runs.values()]
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
    probe_model = probe.ClassifierProbe(context)

    synthetic = probe.synthetic_images(context.results["04_generate"]["out_dir"], names)   # before filtering
    train = probe.real_images(context, "train")
    heldout = probe.real_images(context, "validation")
    test_minority = probe.real_images(context, "test", only_class=target)
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
