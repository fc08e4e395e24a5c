"""Privacy: nearest-neighbour distances to the training set, memorisation rate, membership inference.

The protocol, and which data may enter where:
  1. distances of held-out real images (validation patients, never test) to their nearest training image
     set the threshold: `privacy_threshold(heldout_to_train_distances=...)`, e.g. its 1st percentile, a
     distance that new real patients' images almost never get below (`calibration.class_matched_reference`
     restricts both sides to the generated class; `calibration.near_copies` checks that it catches copies);
  2. a synthetic image nearer than that to some training image counts as memorised (`is_memorised`,
     `memorisation_rate`);
  3. membership inference: if training images lie closer to the synthetic set than held-out images do,
     an attacker holding a patient's image learns whether the patient was in the training set
     (`membership_inference_auc`; 0.5 = no leakage, 1 = every member identifiable; `membership` adds
     patient-level uncertainty and a white-box attack on the DiT).
Distances are feature-space (`nearest_neighbours`, cosine or Euclidean) or pixel-space
(`pixel_nearest_neighbours`, 1 - Pearson correlation, which ignores brightness and contrast changes;
`shift_tolerant_pixel_nearest_neighbours` also ignores small translations, which plain correlation does
not: a training image moved by one pixel is already farther from its source than new patients are).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

METRICS = ("cosine", "euclidean")


def _finite_1d(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of distances, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def nearest_neighbours(query_feats, reference_feats, metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """For each query row (Q, D), the distance to and index of its nearest reference row (R, D).

    metric "cosine" gives 1 - cosine similarity (0 = same direction, up to 2); "euclidean" the L2 distance.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    query, reference = np.asarray(query_feats, np.float64), np.asarray(reference_feats, np.float64)
    if query.ndim != 2 or reference.ndim != 2 or query.shape[1] != reference.shape[1] or not len(reference):
        raise ValueError(f"need (Q, D) queries and non-empty (R, D) references, got {query.shape} and "
                         f"{reference.shape}")
    if metric == "cosine" and (np.linalg.norm(query, axis=1).min(initial=1) == 0
                               or np.linalg.norm(reference, axis=1).min() == 0):
        raise ValueError("cosine distance is undefined for all-zero feature vectors; use metric='euclidean'")
    distances, indices = NearestNeighbors(n_neighbors=1, metric=metric, algorithm="brute").fit(
        reference).kneighbors(query)
    # Rounding can leave -1e-16 for identical vectors; distances are non-negative.
    return np.maximum(distances[:, 0], 0.0), indices[:, 0]


def standardised_rows(images: np.ndarray) -> np.ndarray:
    """Flattened images with zero mean and unit norm, so a dot product is the Pearson correlation.

    A constant image has no defined correlation; it becomes all zeros (correlation 0, distance 1).
    """
    flat = images.reshape(len(images), -1).astype(np.float64)
    flat = flat - flat.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return np.divide(flat, norms, out=np.zeros_like(flat), where=norms > 0)


def pixel_nearest_neighbours(query_images, reference_images, chunk_size: int = 256
                             ) -> tuple[np.ndarray, np.ndarray]:
    """Nearest reference image of each query image in pixel space: distance = 1 - Pearson correlation.

    Images are (N, H, W) or (N, H, W, 1) at the same resolution. Both sets are processed in chunks of
    `chunk_size` images, so memory holds two chunks and one chunk_size² correlation block, never all pairs.
    """
    query, reference = np.asarray(query_images), np.asarray(reference_images)
    if query.ndim < 3 or query.shape[1:] != reference.shape[1:] or not len(reference):
        raise ValueError(f"need (N, H, W[, 1]) query and reference images of one size, got {query.shape} and "
                         f"{reference.shape}")
    best_corr = np.full(len(query), -np.inf)
    best_index = np.zeros(len(query), np.int64)
    for q in range(0, len(query), chunk_size):
        q_rows = standardised_rows(query[q:q + chunk_size])
        for r in range(0, len(reference), chunk_size):
            corr = q_rows @ standardised_rows(reference[r:r + chunk_size]).T
            chunk_best = corr.argmax(axis=1)
            chunk_corr = corr[np.arange(len(corr)), chunk_best]
            better = chunk_corr > best_corr[q:q + chunk_size]
            best_corr[q:q + chunk_size][better] = chunk_corr[better]
            best_index[q:q + chunk_size][better] = r + chunk_best[better]
    return np.clip(1.0 - best_corr, 0.0, 2.0), best_index


def _grayscale_stack(images, name: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W) or (N, H, W, 1) images, got shape {images.shape}")
    return images


def shift_tolerant_pixel_nearest_neighbours(query_images, reference_images, max_shift: int = 2,
                                            chunk_size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`pixel_nearest_neighbours` minimised over integer translations of the query of up to `max_shift` px.

    Correlations are taken on the central (H - 2s) x (W - 2s) window of each reference image against the
    query's window displaced by (dy, dx), |dy|, |dx| <= s, so no padding enters. Returns the distances,
    the nearest reference indices and the (dy, dx) offsets (N, 2) that achieved them. Costs (2s + 1)²
    plain searches.
    """
    query = _grayscale_stack(query_images, "query_images")
    reference = _grayscale_stack(reference_images, "reference_images")
    s = int(max_shift)
    height, width = reference.shape[1:]
    if s < 0 or min(height, width) <= 2 * s or query.shape[1:] != reference.shape[1:]:
        raise ValueError(f"need images of one size larger than 2·max_shift={2 * s} px, got {query.shape} and "
                         f"{reference.shape}")
    centre = reference[:, s:height - s, s:width - s]
    best = np.full(len(query), np.inf)
    best_index = np.zeros(len(query), np.int64)
    best_offset = np.zeros((len(query), 2), np.int64)
    for dy in range(-s, s + 1):
        for dx in range(-s, s + 1):
            window = query[:, s + dy:height - s + dy, s + dx:width - s + dx]
            distances, indices = pixel_nearest_neighbours(window, centre, chunk_size)
            better = distances < best
            best[better], best_index[better], best_offset[better] = distances[better], indices[better], (dy, dx)
    return best, best_index, best_offset


def privacy_threshold(*, heldout_to_train_distances, percentile: float = 1.0) -> float:
    """The memorisation threshold: the `percentile`-th percentile of held-out-real → train distances.

    Keyword-only on purpose: the distances must be those of *held-out real* images (validation patients,
    disjoint from training) to their nearest *training* image. Never pass test-set images (the test set
    stays untouched until the final evaluation) nor synthetic images (the threshold would then move with
    the very leakage it is meant to detect).
    """
    distances = _finite_1d(heldout_to_train_distances, "heldout_to_train_distances")
    if not 0 < percentile < 100:
        raise ValueError(f"percentile must lie in (0, 100), got {percentile}")
    return float(np.percentile(distances, percentile))


def is_memorised(synthetic_to_train_distances, threshold: float) -> np.ndarray:
    """Boolean mask: synthetic images at or below the threshold distance from some training image."""
    return _finite_1d(synthetic_to_train_distances, "synthetic_to_train_distances") <= threshold


def memorisation_rate(synthetic_to_train_distances, threshold: float) -> float:
    """Share of synthetic images flagged by `is_memorised`."""
    return float(is_memorised(synthetic_to_train_distances, threshold).mean())


def membership_inference_auc(train_member_distances, nonmember_distances) -> float:
    """AUC of the attack "closer to the synthetic set = training member".

    train_member_distances: each training image's distance to its nearest synthetic image;
    nonmember_distances: the same for held-out real images. 0.5 means members are indistinguishable.
    """
    members = _finite_1d(train_member_distances, "train_member_distances")
    nonmembers = _finite_1d(nonmember_distances, "nonmember_distances")
    is_member = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
    return float(roc_auc_score(is_member, -np.concatenate([members, nonmembers])))
