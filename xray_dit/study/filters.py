"""Phase 5: the four filters, each reported on its own, for every generator of 04_generate (in
`05_filter/<generator>/`), and the oversampling control set.

All thresholds come from training and validation (held-out) images; the test split is never read here.

  label fidelity  the baseline classifier's probability for the target class ≥ study.fidelity_threshold
  realism         distance to the k-th nearest real minority training image (classifier feature space,
                  cosine) ≤ the study.realism_percentile of the same distance among real minority images
  privacy         nearest training image closer than the study.privacy_percentile of validation → train
                  nearest-neighbour distances, in pixel space (1 − Pearson correlation) or in feature space
                  (cosine): rejected
  duplicates      a sample whose pixel correlation with an earlier kept sample exceeds
                  study.duplicate_threshold: rejected (one of each near-identical pair is kept)
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from absl import logging

from xray_dit.data import synthetic as synthetic_lib
from xray_dit.evaluation import plots, privacy
from xray_dit.study import probe
from xray_dit.study.context import StudyContext

REALISM_K = 5
MAX_EXAMPLES = 8
PIXEL_DISTANCES = "nn_pixel_distances.npz"   # nearest-training-image distances, written for 08_privacy


def kth_neighbour_distance(query: np.ndarray, reference: np.ndarray, k: int, *, exclude_self: bool = False) -> np.ndarray:
    """Cosine distance from each query row to its k-th nearest reference row."""
    q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    r = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    distances = 1.0 - q @ r.T
    if exclude_self:
        np.fill_diagonal(distances, np.inf)
    k = min(k, distances.shape[1] - (1 if exclude_self else 0))
    return np.partition(distances, k - 1, axis=1)[:, k - 1]


def greedy_duplicates(images: np.ndarray, threshold: float) -> np.ndarray:
    """True for each image whose pixel correlation with an earlier *kept* image exceeds `threshold`."""
    flat = images.reshape(len(images), -1).astype(np.float64)
    flat = flat - flat.mean(axis=1, keepdims=True)
    flat /= np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    corr = flat @ flat.T
    duplicate = np.zeros(len(images), bool)
    kept: list[int] = []
    for i in range(len(images)):
        if kept and corr[i, kept].max() > threshold:
            duplicate[i] = True
        else:
            kept.append(i)
    return duplicate


@dataclasses.dataclass
class _Reference:
    """What the filters measure generated images against: real images, their features and the thresholds."""
    train: probe.ImageSet
    train_feats: np.ndarray
    minority_feats: np.ndarray
    train_px: np.ndarray
    heldout_pixel_d: np.ndarray
    thresholds: dict


def run_filters(context: StudyContext) -> dict:
    """Each generator's images through the four filters (thresholds from real images, once for all)."""
    config, study = context.config, context.config.study
    out_dir = context.phase_dir("05_filter")
    target = config.data.target_class
    labels = list(config.data.labels)
    t = labels.index(target)
    probe_model = context.probe()

    train = context.real_images("train")
    heldout = context.real_images("validation")
    minority = train.subset(train.labels[:, t] == 1)
    if len(minority) < 2:
        raise ValueError(f"only {len(minority)} training images of {target!r}: too few to judge realism")
    _, train_feats = probe_model(train.images)
    _, heldout_feats = probe_model(heldout.images)
    minority_feats = train_feats[train.labels[:, t] == 1]
    # Realism: within the spread real minority images show among themselves.
    real_knn = kth_neighbour_distance(minority_feats, minority_feats, REALISM_K, exclude_self=True)
    # Privacy: thresholds from held-out (validation) → train distances only.
    train_px, heldout_px = (probe.downsample_for_pixels(s.images) for s in (train, heldout))
    heldout_pixel_d, _ = privacy.pixel_nearest_neighbours(heldout_px, train_px)
    heldout_feat_d, _ = privacy.nearest_neighbours(heldout_feats, train_feats, metric="cosine")
    thresholds = {"fidelity_probability": float(study.fidelity_threshold),
                  "realism_knn": float(np.percentile(real_knn, study.realism_percentile)),
                  "privacy_pixel": float(privacy.privacy_threshold(heldout_to_train_distances=heldout_pixel_d,
                                                                   percentile=study.privacy_percentile)),
                  "privacy_feature": float(privacy.privacy_threshold(heldout_to_train_distances=heldout_feat_d,
                                                                     percentile=study.privacy_percentile)),
                  "duplicate_correlation": float(study.duplicate_threshold)}
    reference = _Reference(train, train_feats, minority_feats, train_px, heldout_pixel_d, thresholds)

    generators = {entry["name"]: _filter_generator(context, entry["name"], reference, out_dir / entry["name"])
                  for entry in context.generators()}
    oversampled_dir = out_dir / "oversampled_real"
    synthetic_lib.write_synthetic(
        oversampled_dir, minority.images,
        ["|".join(n for n, v in zip(labels, row) if v) for row in minority.labels],
        {"image_id": list(minority.ids), "patient_id": list(minority.patients)}, prefix="real")
    # 08_privacy reads the first generator's per-sample scores and distances from the phase folder itself.
    first = out_dir / context.generators()[0]["name"]
    for name in ("per_sample.json", PIXEL_DISTANCES):
        (out_dir / name).write_bytes((first / name).read_bytes())
    summary = generators[context.generators()[0]["name"]]
    return {"generated": summary["generated"], "accepted": summary["accepted"], "criteria": summary["criteria"],
            "thresholds": thresholds, "reject_examples": summary["reject_examples"],
            "accepted_dir": summary["accepted_dir"], "generators": generators,
            "threshold_sources": {"realism": "train minority images (leave-one-out)",
                                  "privacy": "validation → train nearest-neighbour distances"},
            "oversampled_dir": str(oversampled_dir), "real_minority_train": len(minority),
            "classifier": probe_model.source}


def _filter_generator(context: StudyContext, name: str, reference: _Reference, out_dir) -> dict:
    """One generator's images through the four filters; writes its accepted set and per-sample scores."""
    config, thresholds = context.config, reference.thresholds
    target = config.data.target_class
    t = list(config.data.labels).index(target)
    synthetic = context.synthetic_images(name)
    syn_probs, syn_feats = context.probe()(synthetic.images)
    fidelity_ok = syn_probs[:, t] >= thresholds["fidelity_probability"]
    syn_knn = kth_neighbour_distance(syn_feats, reference.minority_feats, REALISM_K)
    realism_ok = syn_knn <= thresholds["realism_knn"]
    syn_px = probe.downsample_for_pixels(synthetic.images)
    syn_pixel_d, syn_pixel_nn = privacy.pixel_nearest_neighbours(syn_px, reference.train_px)
    syn_feat_d, _ = privacy.nearest_neighbours(syn_feats, reference.train_feats, metric="cosine")
    privacy_ok = (syn_pixel_d >= thresholds["privacy_pixel"]) & (syn_feat_d >= thresholds["privacy_feature"])
    duplicate_ok = ~greedy_duplicates(syn_px, thresholds["duplicate_correlation"])

    criteria = {"label fidelity": fidelity_ok, "realism": realism_ok, "privacy": privacy_ok, "duplicates": duplicate_ok}
    accepted = np.logical_and.reduce(list(criteria.values()))
    summary = {c: {"passed": int(ok.sum()), "rejected": int((~ok).sum())} for c, ok in criteria.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = {}
    for criterion, ok in criteria.items():
        rejected = np.flatnonzero(~ok)[:MAX_EXAMPLES]
        if len(rejected):
            path = out_dir / f"rejected_{criterion.replace(' ', '_')}.png"
            plots.image_grid(synthetic.images[rejected], path, nrow=min(len(rejected), MAX_EXAMPLES),
                             titles=[str(synthetic.ids[i]) for i in rejected], title=f"rejected by {criterion}")
            examples[criterion] = str(path)
    logging.info("filters: %s: %s; accepted %d of %d", name, summary, accepted.sum(), len(synthetic))

    accepted_dir = out_dir / "accepted"
    if accepted.any():
        synthetic_lib.write_synthetic(accepted_dir, synthetic.images[accepted], [target] * int(accepted.sum()),
                                      {"source_file": list(synthetic.ids[accepted]),
                                       "p_target": [f"{p:.4f}" for p in syn_probs[accepted, t]]}, prefix="accepted")
    per_sample = {"file": synthetic.ids.tolist(), "p_target": syn_probs[:, t].tolist(), "knn_distance": syn_knn.tolist(),
                  "nn_pixel_distance": syn_pixel_d.tolist(), "nn_feature_distance": syn_feat_d.tolist(),
                  "nn_train_image": reference.train.ids[syn_pixel_nn].tolist(),
                  **{f"pass_{k.replace(' ', '_')}": v.tolist() for k, v in criteria.items()}}
    (out_dir / "per_sample.json").write_text(json.dumps(per_sample))
    # The privacy phase reports on the same distances: they are the costliest part of both phases at scale.
    with (out_dir / PIXEL_DISTANCES).open("wb") as f:
        np.savez(f, synthetic_to_train=syn_pixel_d, synthetic_nearest_train=syn_pixel_nn,
                 heldout_to_train=reference.heldout_pixel_d)
    return {"generated": len(synthetic), "accepted": int(accepted.sum()), "accepted_dir": str(accepted_dir),
            "per_sample": str(out_dir / "per_sample.json"), "criteria": summary, "reject_examples": examples}
