"""Comparing classifier arms: Holm's correction and a two-level (patients × seeds) bootstrap.

An arm's result varies with the test patients *and* with the training randomness (classifier seed,
and for synthetic arms the generator seed). A patient-only bootstrap of one seed ensemble ignores the
second source, so `two_level_bootstrap_difference` resamples both, independently: patients (every
image of a drawn patient comes along) and the seeds of each seed factor. Seeds shared by both arms
(the same classifier seed trained on real data and on real + synthetic data) are drawn jointly, which
keeps the pairing; generator seeds, which only synthetic arms have, are drawn as a factor of their own.

Two estimands are reported, B - A:
  * seed ensemble: the metric of the mean probability over the (resampled) seeds, i.e. what a
    deployed ensemble would score;
  * single model: the mean over (resampled) seeds of each seed model's own metric, i.e. what one
    trained model scores on average.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, NamedTuple, Sequence, Union

import numpy as np

from xray_dit.evaluation.classification import BootstrapCI, _binary_labels, _both_classes, patient_bootstrap

# A metric: "auc", "auprc", or any callable metric(labels, scores) -> float (e.g. sklearn's).
Metric = Union[str, Callable[[np.ndarray, np.ndarray], float]]
# Seeds of an arm's rows: one level per row (one factor), or factor name -> one level per row.
SeedFactors = Union[Mapping[str, Sequence], Sequence, None]


class HolmResult(NamedTuple):
    adjusted_p: dict | np.ndarray  # keyed like the input (dict in, dict out)
    reject: dict | np.ndarray      # adjusted_p <= alpha


class BootstrapDifference(NamedTuple):
    estimate: float          # metric(B) - metric(A) on the original data
    lower: float             # percentile (1 - alpha) interval of the replicates
    upper: float
    p_value: float           # two-sided, no difference as the null
    replicates: np.ndarray   # (n_boot,); NaN where a resample held only one class
    arm_a: BootstrapCI       # each arm alone, on the same resamples
    arm_b: BootstrapCI


class ArmComparison(NamedTuple):
    ensemble: BootstrapDifference      # metric of the mean probability over seeds
    single_model: BootstrapDifference  # mean over seeds of each seed model's metric


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1) (0.05 gives a 95% interval), got {alpha}")


# ---- multiple testing ------------------------------------------------------------------------------------
def holm(pvalues: Mapping[str, float] | Sequence[float], alpha: float = 0.05) -> HolmResult:
    """Holm-Bonferroni step-down adjusted p-values and rejections, controlling the family-wise error.

    Sorted ascending, the k-th smallest p (k = 1..m) is adjusted to max over j <= k of min(1, (m - j + 1) p_j),
    which makes adjusted p-values monotone in p; a hypothesis is rejected when its adjusted p <= alpha.
    """
    _check_alpha(alpha)
    keys = list(pvalues) if isinstance(pvalues, Mapping) else None
    p = np.asarray([pvalues[k] for k in keys] if keys is not None else pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"pvalues must be a flat sequence or a mapping, got shape {p.shape}")
    if not ((p >= 0) & (p <= 1)).all():  # also refuses NaN
        raise ValueError(f"p-values must lie in [0, 1], got {p[~((p >= 0) & (p <= 1))][:5]}")
    order = np.argsort(p, kind="stable")
    multipliers = p.size - np.arange(p.size)
    adjusted = np.empty_like(p)
    adjusted[order] = np.maximum.accumulate(np.minimum(1.0, multipliers * p[order]))
    reject = adjusted <= alpha
    if keys is None:
        return HolmResult(adjusted, reject)
    return HolmResult({k: float(a) for k, a in zip(keys, adjusted)}, {k: bool(r) for k, r in zip(keys, reject)})


# ---- weighted ranking metrics, vectorised over resamples -------------------------------------------------
def weighted_ranking_metric(labels, scores, weights, metric: str = "auc") -> np.ndarray:
    """AUC or average precision of each weighted resample: equal to sklearn's with `sample_weight`.

    labels (N,); scores (N,) shared by all resamples or (B, N) one row per resample; weights (B, N),
    e.g. how often each image appears in each resample. Returns (B,); NaN where a resample has no
    positive weight (and, for AUC, no negative weight). Ties count half for AUC and form one operating
    point for average precision, as in sklearn.
    """
    if metric not in ("auc", "auprc"):
        raise ValueError(f"metric must be 'auc' or 'auprc' here, got {metric!r}")
    labels = np.asarray(labels, dtype=np.float64)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:  # one sort serves every resample
        order = np.argsort(-scores, kind="stable")
        sorted_scores, weights, labels = scores[order][None], weights[:, order], labels[order][None]
    else:
        order = np.argsort(-scores, axis=1, kind="stable")
        sorted_scores = np.take_along_axis(scores, order, axis=1)
        weights, labels = np.take_along_axis(weights, order, axis=1), labels[order]
    positive, negative = weights * labels, weights * (1 - labels)
    block_end, block_start = _tie_blocks(sorted_scores, positive.shape)
    cum_positive, cum_negative = np.cumsum(positive, axis=1), np.cumsum(negative, axis=1)
    negatives_through_block = np.take_along_axis(cum_negative, block_end, axis=1)
    total_positive, total_negative = cum_positive[:, -1], cum_negative[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "auc":
            negatives_before_block = np.take_along_axis(cum_negative - negative, block_start, axis=1)
            negatives_below = total_negative[:, None] - negatives_through_block
            tied = negatives_through_block - negatives_before_block
            wins = (positive * (negatives_below + 0.5 * tied)).sum(axis=1)
            pairs = total_positive * total_negative
            return np.where(pairs > 0, wins / pairs, np.nan)
        # Each positive adds its recall step times the precision at its block's threshold.
        positives_through_block = np.take_along_axis(cum_positive, block_end, axis=1)
        called = positives_through_block + negatives_through_block
        precision = np.where(called > 0, positives_through_block / np.where(called > 0, called, 1), 0.0)
        return np.where(total_positive > 0, (positive * precision).sum(axis=1) / total_positive, np.nan)


def _tie_blocks(sorted_scores: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """For each position of descending rows, the last and the first position of its run of equal scores."""
    rows, n = sorted_scores.shape
    position = np.arange(n)
    changes = sorted_scores[:, 1:] != sorted_scores[:, :-1]
    is_end = np.concatenate([changes, np.ones((rows, 1), bool)], axis=1)
    is_start = np.concatenate([np.ones((rows, 1), bool), changes], axis=1)
    end = np.minimum.accumulate(np.where(is_end, position, n)[:, ::-1], axis=1)[:, ::-1]
    start = np.maximum.accumulate(np.where(is_start, position, 0), axis=1)
    return np.broadcast_to(end, shape), np.broadcast_to(start, shape)


def _metric_replicates(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray, metric: Metric) -> np.ndarray:
    """A metric on each resample (weights (B, N); scores (N,) or (B, N)); NaN where one class is missing."""
    if isinstance(metric, str):
        return weighted_ranking_metric(labels, scores, weights, metric)
    scores = np.broadcast_to(scores, weights.shape)
    values = np.full(len(weights), np.nan)
    for b, counts in enumerate(weights.astype(np.int64)):
        resample = np.repeat(np.arange(labels.size), counts)
        if np.unique(labels[resample]).size == 2:
            values[b] = metric(labels[resample], scores[b][resample])
    return values


# ---- the two-level bootstrap -----------------------------------------------------------------------------
def _seed_factors(seeds: SeedFactors, n_rows: int, arm: str) -> dict[str, np.ndarray]:
    if seeds is None:  # unpaired: this arm's seeds are a factor of its own
        return {f"seed of arm {arm}": np.arange(n_rows)}
    if not isinstance(seeds, Mapping):
        seeds = {"seed": seeds}
    if not seeds:
        raise ValueError(f"seeds of arm {arm} name no seed factor; pass None for independent seeds")
    factors = {}
    for name, levels in seeds.items():
        levels = np.asarray(levels)
        if levels.shape != (n_rows,):
            raise ValueError(f"seed factor {name!r} of arm {arm} needs one level per prediction row ({n_rows}), "
                             f"got shape {levels.shape}")
        factors[name] = levels
    return factors


def two_level_resamples(patient_ids, factors_a: Mapping[str, Sequence], factors_b: Mapping[str, Sequence],
                        n_boot: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields chunks (image_weights (b, N), row_weights_a (b, rows_a), row_weights_b (b, rows_b)).

    Image weights are `patient_bootstrap`'s (same seed, same patient resamples). Independently, every
    seed factor draws as many of its levels as it has, with replacement; a factor present in both arms
    is drawn once for both (paired). A prediction row's weight is the product over its arm's factors of
    how often its level was drawn, so crossed factors (generator seed × classifier seed) stay crossed.
    """
    factors_a = {k: np.asarray(v) for k, v in factors_a.items()}
    factors_b = {k: np.asarray(v) for k, v in factors_b.items()}
    for name in sorted(factors_a.keys() & factors_b.keys()):
        if set(factors_a[name].tolist()) != set(factors_b[name].tolist()):
            raise ValueError(f"seed factor {name!r} is shared by both arms but its levels differ "
                             f"({sorted(set(factors_a[name].tolist()))} vs {sorted(set(factors_b[name].tolist()))}); "
                             "paired seeds need the same levels in both arms")
    names = sorted(factors_a.keys() | factors_b.keys())
    codes_a, codes_b, n_levels = {}, {}, {}
    for name in names:
        both = [f[name] for f in (factors_a, factors_b) if name in f]
        levels, codes = np.unique(np.concatenate(both), return_inverse=True)
        n_levels[name] = levels.size
        if name in factors_a:
            codes_a[name] = codes[:factors_a[name].size]
        if name in factors_b:
            codes_b[name] = codes[codes.size - factors_b[name].size:]
    rng = np.random.default_rng([seed, 0x5EED])  # a stream apart from the patient draws
    for image_weights in patient_bootstrap(patient_ids, n_boot, seed):
        b = len(image_weights)
        counts = {name: _draw_counts(rng, b, n_levels[name]) for name in names}
        yield image_weights, _row_weights(counts, codes_a, b), _row_weights(counts, codes_b, b)


def _draw_counts(rng: np.random.Generator, b: int, n_levels: int) -> np.ndarray:
    draws = rng.integers(0, n_levels, size=(b, n_levels))
    offsets = (np.arange(b) * n_levels)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=b * n_levels).reshape(b, n_levels)


def _row_weights(counts: Mapping[str, np.ndarray], codes: Mapping[str, np.ndarray], b: int) -> np.ndarray:
    n_rows = len(next(iter(codes.values())))
    weights = np.ones((b, n_rows), dtype=np.int64)
    for name, row_codes in codes.items():
        weights *= counts[name][:, row_codes]
    return weights


def _arm_metrics(labels: np.ndarray, probs: np.ndarray, image_weights: np.ndarray, row_weights: np.ndarray,
                 metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """(seed-ensemble metric, weighted mean single-model metric) per resample, for one arm."""
    row_weights = row_weights.astype(np.float64)
    total = row_weights.sum(axis=1)  # 0 where an incomplete seed design drew none of this arm's rows
    ensemble_probs = (row_weights @ probs) / np.maximum(total, 1)[:, None]
    ensemble = _metric_replicates(labels, ensemble_probs, image_weights, metric)
    per_row = np.stack([_metric_replicates(labels, row, image_weights, metric) for row in probs], axis=1)
    single = (row_weights * np.nan_to_num(per_row)).sum(axis=1) / np.maximum(total, 1)
    undefined = (total == 0) | np.isnan(per_row).any(axis=1)
    return np.where(total > 0, ensemble, np.nan), np.where(undefined, np.nan, single)


def _two_sided_p(replicates: np.ndarray) -> float:
    """Twice the smaller tail share of replicates at or beyond 0, counting the estimate itself (never 0)."""
    valid = replicates[~np.isnan(replicates)]
    tail = min(np.sum(valid <= 0), np.sum(valid >= 0))
    return float(min(1.0, 2 * (tail + 1) / (valid.size + 1)))


def _interval(replicates: np.ndarray, alpha: float) -> tuple[float, float]:
    valid = replicates[~np.isnan(replicates)]
    if valid.size == 0:
        raise ValueError("no bootstrap resample held both classes; the class is too rare in this set")
    lower, upper = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
    return float(lower), float(upper)


def _difference(point_a: float, point_b: float, reps_a: np.ndarray, reps_b: np.ndarray,
                alpha: float) -> BootstrapDifference:
    difference = reps_b - reps_a
    return BootstrapDifference(float(point_b - point_a), *_interval(difference, alpha), _two_sided_p(difference),
                               difference, BootstrapCI(float(point_a), *_interval(reps_a, alpha), reps_a),
                               BootstrapCI(float(point_b), *_interval(reps_b, alpha), reps_b))


def two_level_bootstrap_difference(labels, probs_a, probs_b, patient_ids, *, seeds_a: SeedFactors = None,
                                   seeds_b: SeedFactors = None, metric: Metric = "auc", n_boot: int = 1000,
                                   seed: int = 0, alpha: float = 0.05) -> ArmComparison:
    """Arm B minus arm A on the same test images, with a patients × seeds bootstrap (`two_level_resamples`).

    probs_a (rows_a, N), probs_b (rows_b, N): one row of target-class probabilities per trained model.
    seeds_a/seeds_b say which seeds made each row: None (this arm's rows are independent seeds, unpaired),
    one level per row (factor "seed": the same level in both arms is the same classifier seed, paired), or
    {factor: one level per row}, e.g. for 2 generator × 3 classifier seeds flattened,
    seeds_b={"seed": [0, 1, 2, 0, 1, 2], "generator": [0, 0, 0, 1, 1, 1]} against seeds_a=[0, 1, 2].
    metric: "auc" (default) and "auprc" are vectorised; any metric(labels, scores) callable is evaluated
    on each resample in a Python loop (slower). Point estimates are on the original data; intervals are
    percentile intervals; p-values are two-sided bootstrap p-values (`_two_sided_p`), so p < alpha goes
    (up to its +1) with an interval that excludes 0.

    Resampled seeds repeat, so a resampled ensemble has fewer distinct members than the original: when
    seeds disagree much, an arm's ensemble replicates lie below its estimate. Both arms shift alike, so
    the difference is much less affected than each arm's own interval.
    """
    _check_alpha(alpha)
    labels = _binary_labels(labels)
    _both_classes(labels, "an arm comparison")
    probs_a = _prediction_rows(probs_a, labels.size, "probs_a")
    probs_b = _prediction_rows(probs_b, labels.size, "probs_b")
    if np.shape(patient_ids) != labels.shape:
        raise ValueError(f"patient_ids has shape {np.shape(patient_ids)}; need one id per image {labels.shape}")
    factors_a = _seed_factors(seeds_a, len(probs_a), "A")
    factors_b = _seed_factors(seeds_b, len(probs_b), "B")

    def metrics(image_weights, weights_a, weights_b):
        return (*_arm_metrics(labels, probs_a, image_weights, weights_a, metric),
                *_arm_metrics(labels, probs_b, image_weights, weights_b, metric))

    point = [float(v[0]) for v in metrics(np.ones((1, labels.size)), np.ones((1, len(probs_a))),
                                          np.ones((1, len(probs_b))))]
    chunks = [metrics(*chunk) for chunk in two_level_resamples(patient_ids, factors_a, factors_b, n_boot, seed)]
    ens_a, single_a, ens_b, single_b = (np.concatenate(parts) for parts in zip(*chunks))
    return ArmComparison(ensemble=_difference(point[0], point[2], ens_a, ens_b, alpha),
                         single_model=_difference(point[1], point[3], single_a, single_b, alpha))


def _prediction_rows(probs, n_images: int, name: str) -> np.ndarray:
    probs = np.atleast_2d(np.asarray(probs, dtype=np.float64))
    if probs.ndim != 2 or probs.shape[1] != n_images or len(probs) == 0:
        raise ValueError(f"{name} must be (seeds, images) with {n_images} images, got shape {probs.shape}")
    if not np.isfinite(probs).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return probs


# ---- tidy rows for a dose-response plot ------------------------------------------------------------------
def dose_response_rows(comparisons: Mapping[str, Mapping[int, ArmComparison]]) -> list[dict]:
    """One row per (arm family, added images N, estimand), sorted by family then N, for plotting or a table.

    comparisons: family (e.g. "synthetic", "oversampled real") -> N -> the comparison against the baseline.
    """
    rows = []
    for family, by_count in comparisons.items():
        for count in sorted(by_count):
            for estimand, d in by_count[count]._asdict().items():
                rows.append({"family": family, "n_added": int(count), "estimand": estimand,
                             "difference": d.estimate, "lower": d.lower, "upper": d.upper, "p_value": d.p_value,
                             "arm": d.arm_b.estimate, "arm_lower": d.arm_b.lower, "arm_upper": d.arm_b.upper,
                             "baseline": d.arm_a.estimate})
    return rows
