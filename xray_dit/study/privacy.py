"""Phase 8: is the synthetic data safe to share, and how good is it?

  memorisation        generated images at or below the filter's pixel threshold from a training image of
                      the class (05_filter's distances, before filtering)
  positive controls   near-copies of training images (shifted, contrast-scaled, noisy: what a memorising
                      generator emits) must be flagged, and new patients' images (test split, held out
                      from every threshold) must not: detection and false-positive rates with
                      Clopper-Pearson intervals, for the pixel detector alone and for the whole privacy
                      filter (pixel or feature space)
  membership          could an attacker holding a patient's image tell whether the patient trained the
                      generator? black box: its distance to the nearest released image (all generated,
                      accepted); white box: the DiT's denoising loss. AUC with a patient-level bootstrap CI
                      and a permutation p-value; members are target-class training images, non-members
                      target-class validation and test images
  quality             `quality`: equal-n Fréchet distance and KID with an independent encoder, detectability,
                      diversity, the phantom's CTR oracle

The test split enters only as fresh images and non-members, never a threshold.
"""

from __future__ import annotations

import json
import time

import numpy as np
from etils import epath

from xray_dit.evaluation import calibration, membership, plots
from xray_dit.evaluation import privacy as privacy_metrics
from xray_dit.study import denoising_attack, filters, probe, quality
from xray_dit.study.context import StudyContext

DISTANCE_ATTACK = "distance to the nearest synthetic image (black box)"
DENOISING_ATTACK = "DiT denoising loss (white box)"
ALL, ACCEPTED = "all generated", "accepted"


def _concat(sets: list[probe.ImageSet]) -> probe.ImageSet:
    sets = [s for s in sets if len(s)] or sets[:1]
    return probe.ImageSet(*(np.concatenate([getattr(s, f) for s in sets])
                            for f in ("images", "labels", "ids", "patients")))


def synthetic_sets(scores: dict[str, dict]) -> dict[str, np.ndarray]:
    """Rows of the generators' images pooled in order: "all generated" and "accepted" over every generator,
    and each generator's own when there are several."""
    accepted = np.concatenate([np.asarray(s["accepted"], bool) for s in scores.values()])
    owner = np.concatenate([np.full(len(s["accepted"]), i) for i, s in enumerate(scores.values())])
    rows = np.arange(len(accepted))
    sets = {ALL: rows, ACCEPTED: rows[accepted]}
    if len(scores) > 1:
        for i, name in enumerate(scores):
            sets[f"{ALL} ({name})"] = rows[owner == i]
            sets[f"{ACCEPTED} ({name})"] = rows[(owner == i) & accepted]
    return sets


def _rates(rates: calibration.DetectionRates, threshold: float) -> dict:
    return {"detected": rates.detected, "detected_ci": list(rates.detected_ci),
            "false_positive": rates.false_positive, "false_positive_ci": list(rates.false_positive_ci),
            "copies": rates.copies, "fresh": rates.fresh, "threshold": threshold}


def privacy_controls(study, train_target: probe.ImageSet, fresh: probe.ImageSet, thresholds: dict, probe_model,
                     seed: int) -> tuple[dict, dict]:
    """Detection of injected near-copies and false positives on fresh held-out images; and the distances."""
    copies = calibration.near_copies(train_target.images, int(study.near_copies), np.random.default_rng(seed),
                                     max_shift=int(study.privacy_max_shift))
    copy_images = np.clip(copies.images, -1.0, 1.0)      # a generator's output lies in the image range
    pixel, train_px = filters.pixel_nearest_fn(study), probe.downsample_for_pixels(train_target.images)
    train_feats, copy_feats, fresh_feats = filters.embed(probe_model, train_target.images, copy_images, fresh.images)
    copy_d, copy_nn = pixel(probe.downsample_for_pixels(copy_images), train_px)[:2]
    distances = {"copies": copy_d,
                 "fresh": pixel(probe.downsample_for_pixels(fresh.images), train_px)[0] if len(fresh) else None}
    out = {"copies": int(len(copy_images)), "fresh": int(len(fresh)),
           "fresh_source": "test images of the target class (held out from every threshold)",
           "perturbation": {"max_shift_px": int(study.privacy_max_shift), "contrast": 0.1, "noise_sd": 0.05,
                            "made_from": "target-class training images, each used once before any twice"},
           "nearest_is_own_source": float(np.mean(copy_nn == copies.source_index))}
    if not len(fresh):
        out["reason"] = "no test images of the target class: no false-positive rate"
        return out, distances
    thr_px, thr_feat = thresholds["privacy_pixel"], thresholds["privacy_feature"]
    out["memorisation_detector"] = _rates(calibration.detection_rates(distances["copies"], distances["fresh"], thr_px),
                                          thr_px)
    copy_feat = filters.feature_nearest(copy_feats, train_feats)[0]
    fresh_feat = filters.feature_nearest(fresh_feats, train_feats)[0]
    # The filter rejects at or below either threshold: the smaller margin decides.
    out["privacy_filter"] = _rates(calibration.detection_rates(
        np.minimum(distances["copies"] - thr_px, copy_feat - thr_feat),
        np.minimum(distances["fresh"] - thr_px, fresh_feat - thr_feat), 0.0), None)
    return out, distances


def _mia_entry(result) -> dict:
    r = result._asdict() if hasattr(result, "_asdict") else dict(result)
    entry = {k: r[k] for k in ("auc", "lower", "upper", "p_value", "members", "member_patients",
                               "nonmember_patients")}
    return {**entry, "non_members": r["nonmembers"], **{k: r[k] for k in r if k not in entry and k != "nonmembers"}}


def membership_inference(context: StudyContext, sets: dict[str, np.ndarray], pooled: np.ndarray,
                         members: probe.ImageSet,
                         nonmembers: probe.ImageSet, generators: list[dict]) -> dict:
    study, n_boot = context.config.study, int(context.config.study.bootstrap_samples)
    if not len(members) or not len(nonmembers):
        return {}
    pixel = filters.pixel_nearest_fn(study)
    member_px, nonmember_px = (probe.downsample_for_pixels(s.images) for s in (members, nonmembers))
    pooled_px = probe.downsample_for_pixels(pooled)
    black_box = {name: _mia_entry(membership.distance_attack(member_px, nonmember_px, pooled_px[rows], members.patients,
                                                             nonmembers.patients, nearest_fn=pixel, n_boot=n_boot,
                                                             seed=0))
                 for name, rows in sets.items() if len(rows)}
    by_dit: dict[str, list[str]] = {}
    fallback = context.results.get("03_dit", {}).get("export", "")
    for g in generators:
        by_dit.setdefault(denoising_attack.dit_export_of(g["out_dir"], list(context.config.data.labels), fallback),
                          []).append(g["name"])
    white_box = {("DiT" if len(by_dit) == 1 else f"DiT of {', '.join(names)}"): _mia_entry(
        denoising_attack.attack(context.config, context.mesh, dit, members, nonmembers, n_boot=n_boot))
        for dit, names in by_dit.items() if dit}
    return {DISTANCE_ATTACK: black_box, DENOISING_ATTACK: white_box}


def _memorisation(scores: dict[str, dict], threshold: float) -> dict:
    rates = {name: privacy_metrics.memorisation_rate(s["nn_pixel_distance"], threshold) for name, s in scores.items()}
    pooled = np.concatenate([s["nn_pixel_distance"] for s in scores.values()])
    return {"rate": privacy_metrics.memorisation_rate(pooled, threshold), "per_generator": rates,
            "flagged": int(privacy_metrics.is_memorised(pooled, threshold).sum()), "generated": int(len(pooled)),
            "threshold": threshold}


def _figures(out_dir, distances: dict, threshold: float, pooled: probe.ImageSet, scores: dict, train_target,
             description: str) -> dict:
    hist = plots.plot_distance_histograms({k: v for k, v in distances.items() if v is not None and len(v)},
                                          threshold, out_dir / "nn_distance_histogram.png",
                                          xlabel=f"distance to the nearest training image of the class ({description})")
    nn_ids = np.concatenate([s["nn_train_image"] for s in scores.values()])
    syn_d = distances["synthetic → train"]
    closest = np.argsort(syn_d)[:8]
    row_of = {image_id: i for i, image_id in enumerate(train_target.ids.tolist())}
    pairs = plots.plot_nn_pairs(pooled.images[closest], train_target.images[[row_of[i] for i in nn_ids[closest]]],
                                syn_d[closest], out_dir / "closest_pairs.png")
    grid = plots.image_grid(np.concatenate([train_target.images[:8], pooled.images[:16]]),
                            out_dir / "real_vs_synthetic.png", nrow=8,
                            title="top row: real training images of the target class; below: synthetic")
    return {"histogram": str(hist), "closest_pairs": str(pairs), "grid": str(grid)}


def _quality(context: StudyContext, sets: dict[str, np.ndarray], pooled: probe.ImageSet, train: probe.ImageSet,
             train_target: probe.ImageSet, heldout: probe.ImageSet, test_target: probe.ImageSet, t: int) -> dict:
    model, about = quality.encoder(context)
    pooled_feats, test_feats, train_feats, other_feats, heldout_feats = filters.embed(
        model, pooled.images, test_target.images, train_target.images, quality.other_class_images(train, t),
        heldout.images)
    feats = {name: pooled_feats[rows] for name, rows in sets.items()}
    table = quality.equal_n_table(feats, test_feats, train_feats, other_feats, seed=0)
    detect = quality.detectability_table(heldout.images, heldout_feats,
                                         {name: pooled.images[rows] for name, rows in sets.items()}, feats,
                                         about["name"], int(context.config.study.bootstrap_samples))
    return {"quality": {"encoder": about["name"], "circular": about["circular"], "encoder_note": about["note"],
                        "reference": f"{len(test_target)} test images of the target class", **table},
            "detectability": detect}


def privacy_and_quality(context: StudyContext) -> dict:
    config, study = context.config, context.config.study
    out_dir = context.phase_dir("08_privacy")
    target = config.data.target_class
    t = list(config.data.labels).index(target)
    filt, seconds, clock = context.results["05_filter"], {}, time.perf_counter()
    thresholds = filt["thresholds"]
    generators = context.generators()
    images = {g["name"]: context.synthetic_images(g["name"]) for g in generators}
    scores = {name: json.loads(epath.Path(filt["generators"][name]["per_sample"]).read_text()) for name in images}
    pooled = _concat(list(images.values()))
    sets = synthetic_sets(scores)
    train = context.real_images("train")
    train_target = train.subset(train.labels[:, t] == 1)
    validation = context.real_images("validation")
    test_target = context.real_images("test", only_class=target)
    heldout = _concat([validation.subset(validation.labels[:, t] == 1), test_target])

    controls, control_d = privacy_controls(study, train_target, test_target, thresholds, context.probe(),
                                           int(config.seed))
    seconds["positive controls"], clock = time.perf_counter() - clock, time.perf_counter()
    mia = membership_inference(context, sets, pooled.images, train_target, heldout, generators)
    seconds["membership inference"], clock = time.perf_counter() - clock, time.perf_counter()
    measured = _quality(context, sets, pooled, train, train_target, heldout, test_target, t)
    seconds["quality and detectability"] = time.perf_counter() - clock

    with (context.phase_dir("05_filter") / filters.CALIBRATION).open("rb") as f, np.load(f) as saved:
        calibration_d = saved["heldout_to_train_pixel"]
    syn_d = np.concatenate([s["nn_pixel_distance"] for s in scores.values()])
    distances = {"synthetic → train": syn_d, "held-out real → train (calibration)": calibration_d,
                 "new patients (test) → train": control_d["fresh"],
                 "injected near-copies → train": control_d["copies"]}
    memorisation = _memorisation(scores, thresholds["privacy_pixel"])
    result = {"memorisation_rate": memorisation["rate"], "memorisation": memorisation,
              "privacy_threshold_pixel": thresholds["privacy_pixel"],
              "pixel_distance": filt["calibration"]["pixel"]["distance"],
              "synthetic_to_train_median": float(np.median(syn_d)),
              "heldout_to_train_median": float(np.median(calibration_d)),
              "privacy_controls": controls, "membership_inference": mia, **measured,
              "ms_ssim_diversity": quality.diversity(pooled.images, train_target.images),
              "sets": {name: int(len(x)) for name, x in sets.items()}, "generators": list(images),
              "members": int(len(train_target)), "non_members": int(len(heldout)),
              "real_minority_test": len(test_target), "synthetic": len(pooled), "seconds": seconds,
              "figures": _figures(out_dir, distances, thresholds["privacy_pixel"], pooled, scores, train_target,
                                  filt["calibration"]["pixel"]["distance"])}
    if config.data.name == "cxr_phantom":
        result["ctr_oracle"] = quality.ctr_fidelity(pooled.images, train_target.images, out_dir)
    (out_dir / "privacy.json").write_text(json.dumps(result, indent=2, default=float))
    return result
