"""Phase 5: the four filters, each reported on its own, per generator; and the oversampling control set.

Every threshold is set once, from training and validation images only (the test split is never read
here), and every generator's images are judged against the same thresholds:

  label fidelity  the baseline classifier's probability for the target class ≥ study.fidelity_threshold
  realism         distance to the k-th nearest real target-class training image (classifier feature space,
                  cosine) ≤ the study.realism_percentile of the same distance among those real images
  privacy         a sample is rejected when its nearest target-class training image is as close as the
                  study.privacy_percentile of *new patients'* target-class images get, in pixel space (1 −
                  Pearson correlation, minimised over shifts of up to study.privacy_max_shift px) or in
                  feature space (cosine). The generator learned that class only, so both sides of the
                  calibration are of that class (`calibration.class_matched_reference`: validation, or
                  the training images cross-fitted over patient folds when validation holds fewer than
                  study.calibration_min_count)
  duplicates      a sample whose pixel correlation with an earlier kept sample of the same generator
                  exceeds the duplicate threshold is rejected (one of each near-identical pair is kept);
                  the threshold is study.duplicate_threshold, or with study.duplicate_threshold_percentile
                  > 0 that percentile of real pairs; how often real pairs exceed it is reported beside it

Each generator's `per_sample.json` holds every score and pass flag, so the decisions can be recomputed.
"""

from __future__ import annotations

import functools
import json

import numpy as np
from absl import logging
from etils import epath

from xray_dit.data import synthetic as synthetic_lib
from xray_dit.evaluation import calibration, plots, privacy
from xray_dit.study import probe
from xray_dit.study.context import StudyContext

REALISM_K = 5
MAX_EXAMPLES = 8
PER_SAMPLE = "per_sample.json"
CALIBRATION = "calibration.npz"      # the class-matched held-out → train distances, for 08_privacy's figures
CRITERIA = ("label fidelity", "realism", "privacy", "duplicates")


def pixel_nearest_fn(study_config):
    """(query, reference) → (distances, indices, offsets): 1 − pixel correlation over small shifts."""
    return functools.partial(privacy.shift_tolerant_pixel_nearest_neighbours,
                             max_shift=int(study_config.privacy_max_shift))


def feature_nearest(query, reference):
    """(query, reference) → (cosine distances, indices) in a classifier's feature space."""
    return privacy.nearest_neighbours(query, reference, metric="cosine")


def pixel_description(study_config, images: np.ndarray) -> str:
    size = probe.downsample_for_pixels(images[:1]).shape[1]
    return (f"1 − pixel correlation at {size} px, the smallest over shifts of up to "
            f"{int(study_config.privacy_max_shift)} px")


def embed(probe_model, *image_sets: np.ndarray) -> list[np.ndarray]:
    """The probe's features of each image set, from one pass over all of them."""
    feats = probe_model(np.concatenate(image_sets))[1]
    return np.split(feats, np.cumsum([len(x) for x in image_sets])[:-1])


# ---- pure parts -----------------------------------------------------------------------------------------------
def kth_neighbour_distance(query: np.ndarray, reference: np.ndarray, k: int, *,
                           exclude_self: bool = False) -> np.ndarray:
    """Cosine distance from each query row to its k-th nearest reference row."""
    q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    r = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    distances = 1.0 - q @ r.T
    if exclude_self:
        np.fill_diagonal(distances, np.inf)
    k = min(k, distances.shape[1] - (1 if exclude_self else 0))
    return np.partition(distances, k - 1, axis=1)[:, k - 1]


def duplicate_correlations(images: np.ndarray, threshold: float) -> np.ndarray:
    """Each image's highest pixel correlation with an earlier *kept* image (−1 for the first one), where an
    image is kept when that correlation is at most `threshold`."""
    rows = privacy.standardised_rows(np.asarray(images))
    corr = rows @ rows.T
    best = np.full(len(rows), -1.0)
    kept: list[int] = []
    for i in range(len(rows)):
        if kept:
            best[i] = corr[i, kept].max()
        if best[i] <= threshold:
            kept.append(i)
    return best


def greedy_duplicates(images: np.ndarray, threshold: float) -> np.ndarray:
    """True for each image whose pixel correlation with an earlier *kept* image exceeds `threshold`."""
    return duplicate_correlations(images, threshold) > threshold


def pass_flags(scores: dict, thresholds: dict) -> dict[str, np.ndarray]:
    """Each criterion's pass flags from a generator's per-sample scores; flagged-as-memorised means at or
    below a privacy threshold, as `privacy.is_memorised` counts it."""
    arrays = {k: np.asarray(scores[k], np.float64) for k in ("p_target", "knn_distance", "nn_pixel_distance",
                                                               "nn_feature_distance", "duplicate_correlation")}
    return {"label fidelity": arrays["p_target"] >= thresholds["fidelity_probability"],
            "realism": arrays["knn_distance"] <= thresholds["realism_knn"],
            "privacy": ((arrays["nn_pixel_distance"] > thresholds["privacy_pixel"])
                        & (arrays["nn_feature_distance"] > thresholds["privacy_feature"])),
            "duplicates": arrays["duplicate_correlation"] <= thresholds["duplicate_correlation"]}


# ---- thresholds (once, from train and validation) -------------------------------------------------------------
def _reference_entry(reference: calibration.ClassMatchedReference, distance: str, percentile: float) -> dict:
    return {"source": reference.source, "description": reference.description, "distance": distance,
            "heldout_count": int(reference.heldout_count), "heldout_patients": reference.heldout_patients,
            "reference_count": int(len(reference.reference_index)), "percentile": float(percentile)}


def _privacy_thresholds(study, train_target, validation_target, train_feats, validation_feats) -> dict:
    """Class-matched pixel and feature thresholds (one split of held-out images for both)."""
    common = dict(min_count=int(study.calibration_min_count), validation_patients=validation_target.patients,
                  seed=0)
    pixels = calibration.class_matched_reference(
        probe.downsample_for_pixels(validation_target.images), probe.downsample_for_pixels(train_target.images),
        train_target.patients, nearest_fn=pixel_nearest_fn(study), **common)
    features = calibration.class_matched_reference(validation_feats, train_feats, train_target.patients,
                                                   nearest_fn=feature_nearest, **common)
    percentile = float(study.privacy_percentile)
    return {"pixel": privacy.privacy_threshold(heldout_to_train_distances=pixels.distances, percentile=percentile),
            "feature": privacy.privacy_threshold(heldout_to_train_distances=features.distances,
                                                 percentile=percentile),
            "calibration": {"pixel": _reference_entry(pixels, pixel_description(study, train_target.images),
                                                      percentile),
                            "feature": _reference_entry(features, "cosine distance of the baseline classifier's "
                                                                  "features", percentile)},
            "distances": {"pixel": pixels.distances, "feature": features.distances}}


def _duplicate_reference(study, train_target, target: str) -> dict:
    """The duplicate threshold and how often real target-class pairs of different patients exceed it."""
    pixels = probe.downsample_for_pixels(train_target.images)
    percentile = float(study.duplicate_threshold_percentile)
    enough = len(np.unique(train_target.patients)) >= 2
    if percentile > 0 and enough:
        threshold = calibration.percentile_threshold(pixels, percentile, groups=train_target.patients)
        source = (f"the {percentile:g}th percentile of pixel correlations between real {target} training images "
                  "of different patients")
    else:
        threshold, source = float(study.duplicate_threshold), "the fixed study.duplicate_threshold"
    entry = {"threshold": float(threshold), "source": source}
    if enough:
        real = calibration.pair_fraction_above(pixels, threshold, groups=train_target.patients)
        entry.update(real_pair_fraction_above=real.fraction, real_pairs=real.pairs,
                     real_pairs_exhaustive=real.exhaustive)
    return entry


# ---- one generator ---------------------------------------------------------------------------------------------
def _scores(images: probe.ImageSet, probe_model, t: int, reference: dict, study, duplicate_threshold: float) -> dict:
    probs, feats = probe_model(images.images)
    pixels = probe.downsample_for_pixels(images.images)
    pixel_d, pixel_nn, offsets = pixel_nearest_fn(study)(pixels, reference["pixels"])
    feature_d, _ = feature_nearest(feats, reference["feats"])
    return {"file": images.ids.tolist(), "p_target": probs[:, t].tolist(),
            "knn_distance": kth_neighbour_distance(feats, reference["feats"], REALISM_K).tolist(),
            "nn_pixel_distance": pixel_d.tolist(), "nn_feature_distance": feature_d.tolist(),
            "nn_train_image": reference["ids"][pixel_nn].tolist(), "nn_pixel_shift": offsets.tolist(),
            "duplicate_correlation": duplicate_correlations(pixels, duplicate_threshold).tolist()}


def _filter_generator(generator: dict, images: probe.ImageSet, out_dir: epath.Path, probe_model, t: int,
                      target: str, reference: dict, thresholds: dict, study) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = _scores(images, probe_model, t, reference, study, thresholds["duplicate_correlation"])
    criteria = pass_flags(scores, thresholds)
    accepted = np.logical_and.reduce([criteria[name] for name in CRITERIA])
    per_sample = {**scores, **{f"pass_{k.replace(' ', '_')}": v.tolist() for k, v in criteria.items()},
                  "accepted": accepted.tolist()}
    (out_dir / PER_SAMPLE).write_text(json.dumps(per_sample))
    examples = {}
    for name, ok in criteria.items():
        rejected = np.flatnonzero(~ok)[:MAX_EXAMPLES]
        if len(rejected):
            path = out_dir / f"rejected_{name.replace(' ', '_')}.png"
            plots.image_grid(images.images[rejected], path, nrow=min(len(rejected), MAX_EXAMPLES),
                             titles=[str(images.ids[i]) for i in rejected],
                             title=f"{generator['name']}: rejected by {name}")
            examples[name] = str(path)
    accepted_dir = out_dir / "accepted"
    if accepted.any():
        synthetic_lib.write_synthetic(accepted_dir, images.images[accepted], [target] * int(accepted.sum()),
                                      {"source_file": list(images.ids[accepted]),
                                       "p_target": [f"{p:.4f}" for p in np.asarray(scores["p_target"])[accepted]]},
                                      prefix="accepted")
    summary = {name: {"passed": int(ok.sum()), "rejected": int((~ok).sum())} for name, ok in criteria.items()}
    logging.info("filters: %s: %s; accepted %d of %d", generator["name"], summary, accepted.sum(), len(images))
    return {"variant": generator.get("variant", ""), "seed": generator.get("seed"), "source_dir": generator["out_dir"],
            "generated": len(images), "accepted": int(accepted.sum()), "accepted_dir": str(accepted_dir),
            "per_sample": str(out_dir / PER_SAMPLE), "criteria": summary, "reject_examples": examples,
            "flagged_as_memorised": int((~criteria["privacy"]).sum()),
            "synthetic_pair_fraction_above": _pair_fraction(images.images, thresholds["duplicate_correlation"])}


def _pair_fraction(images: np.ndarray, threshold: float) -> float | None:
    if len(images) < 2:
        return None
    return calibration.pair_fraction_above(probe.downsample_for_pixels(images), threshold).fraction


# ---- the phase -------------------------------------------------------------------------------------------------
def run_filters(context: StudyContext) -> dict:
    config, study = context.config, context.config.study
    out_dir = context.phase_dir("05_filter")
    target, labels = config.data.target_class, list(config.data.labels)
    t = labels.index(target)
    probe_model = context.probe()
    train = context.real_images("train")
    validation = context.real_images("validation")
    minority = train.subset(train.labels[:, t] == 1)
    validation_target = validation.subset(validation.labels[:, t] == 1)
    if len(minority) < 2:
        raise ValueError(f"only {len(minority)} training images of {target!r}: too few to judge realism")

    minority_feats, validation_feats = embed(probe_model, minority.images, validation_target.images)
    real_knn = kth_neighbour_distance(minority_feats, minority_feats, REALISM_K, exclude_self=True)
    realism_threshold = float(np.percentile(real_knn, study.realism_percentile))
    private = _privacy_thresholds(study, minority, validation_target, minority_feats, validation_feats)
    duplicates = _duplicate_reference(study, minority, target)
    thresholds = {"fidelity_probability": float(study.fidelity_threshold), "realism_knn": realism_threshold,
                  "privacy_pixel": private["pixel"], "privacy_feature": private["feature"],
                  "duplicate_correlation": duplicates["threshold"]}
    reference = {"pixels": probe.downsample_for_pixels(minority.images), "feats": minority_feats, "ids": minority.ids}
    with (out_dir / CALIBRATION).open("wb") as f:
        np.savez(f, heldout_to_train_pixel=private["distances"]["pixel"],
                 heldout_to_train_feature=private["distances"]["feature"])

    per_generator = {g["name"]: _filter_generator(g, context.synthetic_images(g["name"]), out_dir / g["name"], probe_model,
                                                  t, target, reference, thresholds, study)
                     for g in context.generators()}
    oversampled_dir = out_dir / "oversampled_real"
    synthetic_lib.write_synthetic(
        oversampled_dir, minority.images,
        ["|".join(n for n, v in zip(labels, row) if v) for row in minority.labels],
        {"image_id": list(minority.ids), "patient_id": list(minority.patients)}, prefix="real")
    first = next(iter(per_generator.values()))
    return {"generators": per_generator, "thresholds": thresholds,
            "threshold_sources": {"realism": f"{target} training images (leave-one-out)",
                                  "privacy": f"class-matched: {private['calibration']['pixel']['source']} "
                                             f"{target} images → {target} training images",
                                  "duplicates": duplicates["source"]},
            "calibration": private["calibration"], "duplicate_reference": duplicates,
            "generated": sum(g["generated"] for g in per_generator.values()),
            "criteria": {name: {k: sum(g["criteria"][name][k] for g in per_generator.values())
                                for k in ("passed", "rejected")} for name in CRITERIA},
            # The first generator's accepted set, for readers that mix in one set.
            "accepted": first["accepted"], "accepted_dir": first["accepted_dir"],
            "reject_examples": first["reject_examples"],
            "oversampled_dir": str(oversampled_dir), "real_minority_train": len(minority),
            "classifier": probe_model.source}
