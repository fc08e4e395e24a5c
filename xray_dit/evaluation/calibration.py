"""Thresholds calibrated on real images of the generated class, and positive controls that test them.

The generator learns one class (the target finding), so the distances that say "this is as close as a new
patient gets" must come from new patients *of that class* to the training images *of that class*
(`class_matched_reference`); distances over all classes mix in easier and harder pairs and move the
threshold. A threshold is only trusted once it is shown to work: `near_copies` makes perturbed copies of
training images (what a memorising generator emits), `detection_rates` says how many of them a threshold
catches and how many fresh held-out images it flags by mistake.

The duplicate filter's correlation threshold gets the same treatment: `pair_fraction_above` says how often
two *real* images of the class (of different patients) are that similar, and `percentile_threshold` sets
the threshold at a percentile of those real pairs.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import scipy.stats

from xray_dit.evaluation import privacy

NearestFn = Callable[[np.ndarray, np.ndarray], tuple]   # (query, reference) -> (distances, indices, ...)


# ---- class-matched calibration -----------------------------------------------------------------------------
class ClassMatchedReference(NamedTuple):
    distances: np.ndarray        # each held-out target-class image → its nearest reference image
    source: str                  # "validation" or "train, patient folds"
    description: str             # one sentence for the report: what was held out and why
    heldout_count: int
    heldout_patients: int | None  # None when validation patient ids were not given
    reference_index: np.ndarray  # rows of train_target that served as a training reference
    heldout_index: np.ndarray    # rows of validation_target (source "validation") or of train_target


def class_matched_reference(validation_target, train_target, train_patients, *, min_count: int,
                            validation_patients=None, nearest_fn: NearestFn = privacy.pixel_nearest_neighbours,
                            folds: int = 20, seed: int = 0) -> ClassMatchedReference:
    """Held-out target-class → training target-class nearest-neighbour distances, for a privacy threshold.

    Validation images of the target class are used when there are at least `min_count` of them. Otherwise
    every training image of the target class is held out once, cross-fitted: the training patients are dealt
    (in a seeded random order) into `folds` folds, and each fold's images get their distance to the images of
    the other folds. The reference then holds nearly all training images (at least (folds − 1) / folds of
    them on average), as it does for a generated or a new patient's image scored against the whole training
    set: a reference half that size (a one-off split) makes the distances larger and the threshold flag
    new patients more often than its percentile says. Test images never enter.
    `nearest_fn(query, reference)` returns distances first (pixel, shift-tolerant or feature space).
    """
    validation_target, train_target = np.asarray(validation_target), np.asarray(train_target)
    train_patients = np.asarray(train_patients)
    if len(train_patients) != len(train_target) or min_count < 1 or folds < 2:
        raise ValueError(f"need one patient id per training image ({len(train_patients)} ids for "
                         f"{len(train_target)} images), min_count >= 1 and folds >= 2 (got {min_count}, {folds})")
    if len(validation_target) >= min_count:
        distances = nearest_fn(validation_target, train_target)[0]
        return ClassMatchedReference(
            np.asarray(distances), "validation",
            f"{len(validation_target)} validation images of the target class → their nearest of the "
            f"{len(train_target)} training images of the target class",
            len(validation_target), None if validation_patients is None else len(np.unique(validation_patients)),
            np.arange(len(train_target)), np.arange(len(validation_target)))
    fold = patient_folds(train_patients, folds, seed)
    if len(np.unique(fold)) < 2:
        raise ValueError(f"cannot hold out training patients of the target class: {len(train_target)} images "
                         f"of {len(np.unique(train_patients))} patient(s)")
    distances = np.empty(len(train_target))
    for f in np.unique(fold):
        distances[fold == f] = np.asarray(nearest_fn(train_target[fold == f], train_target[fold != f])[0])
    count, patients = len(train_target), len(np.unique(train_patients))
    return ClassMatchedReference(
        distances, "train, patient folds",
        f"validation holds only {len(validation_target)} images of the target class (fewer than {min_count}); "
        f"each of the {count} training images of the target class ({patients} patients, dealt into "
        f"{len(np.unique(fold))} folds by patient) → its nearest training image of the target class in the "
        f"other folds", count, patients, np.arange(count), np.arange(count))


def patient_folds(patients, folds: int, seed: int) -> np.ndarray:
    """Fold index per image: whole patients dealt round-robin, in a seeded random order, into
    min(folds, number of patients) folds."""
    patients = np.asarray(patients)
    unique, inverse = np.unique(patients, return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of_patient = np.empty(len(unique), int)
    fold_of_patient[order] = np.arange(len(unique)) % min(folds, len(unique))
    return fold_of_patient[inverse]


# ---- positive controls -------------------------------------------------------------------------------------
class NearCopies(NamedTuple):
    images: np.ndarray            # (k, H, W[, 1]), like the input
    source_index: np.ndarray      # the training image each copy was made from
    offsets: np.ndarray           # (k, 2) integer (dy, dx) by which the content moved
    contrast_factors: np.ndarray  # (k,) scaling of each image's deviations from its mean


def near_copies(train_images, k: int, rng: np.random.Generator, *, noise: float = 0.05, max_shift: int = 2,
                contrast: float = 0.1) -> NearCopies:
    """k perturbed copies of training images, as a memorising generator would emit them.

    Each copy is a training image (each used once before any is used twice) moved by an integer offset in
    [-max_shift, max_shift]² (edges replicated), with its contrast scaled by a factor in
    [1 - contrast, 1 + contrast] about its mean, plus Gaussian noise of `noise` times its pixel sd.
    """
    images = np.asarray(train_images, np.float64)
    squeeze = images.ndim == 4 and images.shape[-1] == 1
    stack = images[..., 0] if squeeze else images
    if stack.ndim != 3 or not len(stack) or k < 1 or max_shift < 0 or noise < 0 or not 0 <= contrast < 1:
        raise ValueError(f"need (N, H, W[, 1]) images, k >= 1, max_shift >= 0, noise >= 0 and contrast in "
                         f"[0, 1); got {images.shape}, {k}, {max_shift}, {noise}, {contrast}")
    # Whole permutations one after another: no image is copied twice before every image has been copied.
    source = np.concatenate([rng.permutation(len(stack)) for _ in range(-(-k // len(stack)))])[:k]
    offsets = rng.integers(-max_shift, max_shift + 1, size=(k, 2))
    factors = rng.uniform(1 - contrast, 1 + contrast, k)
    height, width = stack.shape[1:]
    copies = np.empty((k, height, width))
    s = max_shift
    for i, (index, (dy, dx), factor) in enumerate(zip(source, offsets, factors)):
        padded = np.pad(stack[index], s, mode="edge")
        moved = padded[s - dy:s - dy + height, s - dx:s - dx + width]
        mean = moved.mean()
        copies[i] = mean + factor * (moved - mean) + noise * stack[index].std() * rng.standard_normal((height, width))
    return NearCopies(copies[..., None] if squeeze else copies, source, offsets, factors)


class DetectionRates(NamedTuple):
    detected: float                      # share of copies flagged (sensitivity)
    detected_ci: tuple[float, float]     # Clopper-Pearson interval
    false_positive: float                # share of fresh held-out images flagged
    false_positive_ci: tuple[float, float]
    copies: int
    fresh: int


def detection_rates(copy_distances, fresh_distances, threshold: float, alpha: float = 0.05) -> DetectionRates:
    """How a memorisation threshold does on known copies and on new patients' images.

    Both arguments are distances to the nearest training image; flagged means at or below `threshold`, as
    in `privacy.is_memorised`. The fresh images must be held out from the threshold's own calibration
    (otherwise the false-positive rate is the calibration percentile by construction).
    """
    copies = privacy.is_memorised(copy_distances, threshold)
    fresh = privacy.is_memorised(fresh_distances, threshold)

    def interval(flags: np.ndarray) -> tuple[float, float]:
        ci = scipy.stats.binomtest(int(flags.sum()), flags.size).proportion_ci(1 - alpha, method="exact")
        return float(ci.low), float(ci.high)

    return DetectionRates(float(copies.mean()), interval(copies), float(fresh.mean()), interval(fresh),
                          int(copies.size), int(fresh.size))


# ---- duplicate threshold -----------------------------------------------------------------------------------
class PairFraction(NamedTuple):
    fraction: float      # share of pairs with pixel correlation above the threshold
    pairs: int           # pairs looked at
    exhaustive: bool     # all pairs (True) or a random sample of them


def _pair_indices(groups: np.ndarray, max_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, bool]:
    """Pairs (i, j) of images of different groups: all of them when there are at most `max_pairs`,
    else `max_pairs` drawn uniformly (with replacement) among them."""
    first, second = np.triu_indices(len(groups), 1)
    if len(groups) * (len(groups) - 1) // 2 <= max_pairs:
        keep = groups[first] != groups[second]
        return first[keep], second[keep], True
    chosen_first, chosen_second = [], []
    while sum(map(len, chosen_first)) < max_pairs:
        i, j = rng.integers(0, len(groups), (2, max_pairs))
        keep = groups[i] != groups[j]
        chosen_first.append(i[keep])
        chosen_second.append(j[keep])
    return (np.concatenate(chosen_first)[:max_pairs], np.concatenate(chosen_second)[:max_pairs], False)


def pair_correlations(images, *, max_pairs: int = 100_000, seed: int = 0, groups=None,
                      chunk_size: int = 4096) -> tuple[np.ndarray, bool]:
    """Pixel (Pearson) correlations of pairs of distinct images, and whether all pairs were used.

    `groups` (e.g. patient ids) excludes pairs within a group: two images of one patient are expected to
    be alike and say nothing about how alike two different generated images may be.
    """
    images = np.asarray(images)
    groups = np.arange(len(images)) if groups is None else np.asarray(groups)
    if len(groups) != len(images) or len(np.unique(groups)) < 2 or max_pairs < 1:
        raise ValueError(f"need images of at least two groups (one group id per image) and max_pairs >= 1; "
                         f"got {len(images)} images, {len(groups)} ids, max_pairs={max_pairs}")
    first, second, exhaustive = _pair_indices(groups, max_pairs, np.random.default_rng(seed))
    rows = privacy.standardised_rows(images)
    correlations = np.concatenate([np.einsum("pd,pd->p", rows[first[s:s + chunk_size]], rows[second[s:s + chunk_size]])
                                   for s in range(0, len(first), chunk_size)])
    return correlations, exhaustive


def pair_fraction_above(images, threshold: float, *, max_pairs: int = 100_000, seed: int = 0, groups=None
                        ) -> PairFraction:
    """Share of pairs of real images (of different `groups`) whose pixel correlation exceeds `threshold`."""
    correlations, exhaustive = pair_correlations(images, max_pairs=max_pairs, seed=seed, groups=groups)
    return PairFraction(float(np.mean(correlations > threshold)), int(correlations.size), exhaustive)


def percentile_threshold(images, percentile: float = 99.0, *, max_pairs: int = 100_000, seed: int = 0,
                         groups=None) -> float:
    """The correlation that only (100 - percentile) % of real pairs of different groups exceed."""
    if not 0 < percentile < 100:
        raise ValueError(f"percentile must lie in (0, 100), got {percentile}")
    correlations, _ = pair_correlations(images, max_pairs=max_pairs, seed=seed, groups=groups)
    return float(np.percentile(correlations, percentile))
