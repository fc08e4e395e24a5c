"""Classification statistics: per-class AUC and ROC, AUPRC, thresholds, confusion, patient bootstrap, DeLong.

Inputs are numpy arrays: `labels` are 0/1 (multi-label: (N, C)), `probs`/`scores` are any monotone
classifier outputs (probabilities or logits) of the same shape. A score is called positive when
`score >= threshold`, the convention of `sklearn.metrics.roc_curve`.

Two ways to put an uncertainty on an AUC:
  * `bootstrap_auc_ci` resamples *patients* (every image of a drawn patient comes along), because images
    of one patient are correlated and resampling images would make intervals too narrow;
  * `delong_test` compares two classifiers scored on the same images (DeLong, DeLong & Clarke-Pearson
    1988, with the midrank algorithm of Sun & Xu 2014). It treats images as independent, so with many
    images per patient prefer the paired patient bootstrap `bootstrap_auc_difference_ci`.
"""

from __future__ import annotations

import csv
from typing import Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import scipy.sparse
import scipy.stats
from etils import epath
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score, roc_curve


class RocCurve(NamedTuple):
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    auc: float


class BootstrapCI(NamedTuple):
    estimate: float  # on the full data
    lower: float
    upper: float
    replicates: np.ndarray  # (n_boot,); NaN where a resample held only one class


class DeLongResult(NamedTuple):
    auc_a: float
    auc_b: float
    z: float  # (auc_a - auc_b) / standard error of the difference
    p_value: float  # two-sided


# ---- input checks ----------------------------------------------------------------------------------------
def _binary_labels(labels, name: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one binary label per image), got shape {labels.shape}")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1, got values {np.unique(labels)[:10]}; "
                         "binarise uncertain labels (or mask them out) first")
    return labels.astype(np.int8)


def _scores_like(scores, labels: np.ndarray, name: str = "scores") -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != labels.shape:
        raise ValueError(f"{name} has shape {scores.shape} but labels have shape {labels.shape}; "
                         "pass one score per image")
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return scores


def _both_classes(labels: np.ndarray, what: str) -> None:
    if labels.min(initial=1) == labels.max(initial=0):
        raise ValueError(f"{what} needs both positive and negative images, got only label "
                         f"{labels[0] if labels.size else 'none (empty input)'}")


def _multilabel(labels, probs, class_names: Sequence[str], mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if labels.ndim == 1 and probs.ndim == 1:  # a single class
        labels, probs = labels[:, None], probs[:, None]
    if labels.ndim != 2 or probs.shape != labels.shape:
        raise ValueError(f"labels and probs must both be (N, C); got {labels.shape} and {probs.shape}")
    if len(class_names) != labels.shape[1]:
        raise ValueError(f"{len(class_names)} class names for {labels.shape[1]} label columns")
    mask = np.ones(labels.shape, bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != labels.shape:
        raise ValueError(f"mask must have the labels' shape {labels.shape}, got {mask.shape}")
    if not np.isin(labels[mask], (0, 1)).all():
        raise ValueError("labels must be 0 or 1 wherever mask is True; mask uncertain labels out")
    return labels, probs, mask


# ---- per-class AUC, ROC, thresholds, confusion -------------------------------------------------------------
def per_class_auc(labels, probs, class_names: Sequence[str], mask=None) -> dict[str, float]:
    """ROC AUC of each class column; NaN where the (masked) column holds only one label value.

    labels, probs: (N, C); mask: optional (N, C) bool, False where a label is unknown (e.g. CheXpert's
    uncertain labels) so that image does not count for that class.
    """
    labels, probs, mask = _multilabel(labels, probs, class_names, mask)
    aucs = {}
    for c, name in enumerate(class_names):
        y, p = labels[mask[:, c], c], probs[mask[:, c], c]
        aucs[name] = float(roc_auc_score(y, p)) if np.unique(y).size == 2 else float("nan")
    return aucs


def mean_auc(aucs: Mapping[str, float] | Sequence[float] | np.ndarray) -> float:
    """Mean over the classes that have an AUC (NaN classes are left out); NaN when none has one."""
    values = np.asarray(list(aucs.values()) if isinstance(aucs, Mapping) else aucs, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def binary_roc_curve(labels, scores) -> RocCurve:
    """ROC curve and AUC of one binary problem (one class, or one arm on one class)."""
    labels = _binary_labels(labels)
    scores = _scores_like(scores, labels)
    _both_classes(labels, "a ROC curve")
    fpr, tpr, thresholds = roc_curve(labels, scores)
    return RocCurve(fpr, tpr, thresholds, float(roc_auc_score(labels, scores)))


def roc_curves(labels, probs, class_names: Sequence[str], mask=None) -> dict[str, RocCurve]:
    """Per-class ROC curves for (N, C) inputs; classes with a single label value are left out."""
    labels, probs, mask = _multilabel(labels, probs, class_names, mask)
    curves = {}
    for c, name in enumerate(class_names):
        y, p = labels[mask[:, c], c], probs[mask[:, c], c]
        if np.unique(y).size == 2:
            curves[name] = binary_roc_curve(y, p)
    return curves


def youden_threshold(labels, probs) -> float:
    """The score threshold maximising Youden's J = sensitivity + specificity - 1.

    Choose it on the validation set and apply it unchanged to the test set. Ties go to the highest
    threshold (fewest positive calls). The "nothing is positive" point of the ROC curve is not offered,
    so the result is always one of the observed scores.
    """
    labels = _binary_labels(labels)
    probs = _scores_like(probs, labels, "probs")
    _both_classes(labels, "a Youden threshold")
    # All thresholds, so that no tied optimum is dropped; index 0 is sklearn's +inf "nothing positive".
    fpr, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)
    j = (tpr - fpr)[1:]
    # Equal J values can differ in the last bit (2/3 - 0 vs 1 - 1/3), so ties are judged with a tolerance.
    return float(thresholds[1:][np.flatnonzero(j >= j.max() - 1e-12)[0]])


def threshold_at_specificity(labels, scores, specificity: float = 0.9) -> float:
    """The lowest observed score (so the highest sensitivity) whose specificity here is >= `specificity`.

    Choose it on validation predictions and apply it unchanged to the test set. Ties cannot be split, so
    the achieved specificity may exceed the target; when no observed score reaches it, the result lies
    just above the highest score (nothing is called positive)."""
    labels = _binary_labels(labels)
    scores = _scores_like(scores, labels)
    negatives = np.sort(scores[labels == 0])
    if not 0.0 <= specificity <= 1.0 or negatives.size == 0:
        raise ValueError(f"need a specificity in [0, 1] and negative images, got {specificity} and "
                         f"{negatives.size} negative images")
    candidates = np.unique(scores)
    # True negatives are the negatives strictly below a threshold (positive means score >= it).
    achieved = np.searchsorted(negatives, candidates, side="left") / negatives.size
    reaching = np.flatnonzero(achieved >= specificity - 1e-12)  # 9/10 vs 0.9 must not fail by one ulp
    return float(candidates[reaching[0]] if reaching.size else np.nextafter(scores.max(), np.inf))


def sensitivity_at_threshold(labels, scores, threshold: float) -> float:
    """Share of positive images with score >= threshold; NaN when there is no positive image."""
    labels = _binary_labels(labels)
    scores = _scores_like(scores, labels)
    positives = scores[labels == 1]
    return float(np.mean(positives >= threshold)) if positives.size else float("nan")


def auprc(labels, scores) -> float:
    """Area under the precision-recall curve as sklearn's average precision, sum_k (R_k - R_k-1) P_k.

    Not interpolated (that would be optimistic); chance level is the prevalence, so compare on the same images."""
    labels = _binary_labels(labels)
    scores = _scores_like(scores, labels)
    _both_classes(labels, "an AUPRC")
    return float(average_precision_score(labels, scores))


def confusion(labels, probs, threshold: float) -> np.ndarray:
    """2x2 counts [[TN, FP], [FN, TP]] (rows: true 0/1, columns: predicted 0/1 with probs >= threshold)."""
    labels = _binary_labels(labels)
    probs = _scores_like(probs, labels, "probs")
    return confusion_matrix(labels, (probs >= threshold).astype(np.int8), labels=[0, 1])


def _format_cell(value, digits: int) -> str:
    if isinstance(value, (tuple, list)):
        estimate, lower, upper = (float(v) for v in tuple(value)[:3])
        if np.isnan(estimate):
            return "n/a"
        return f"{estimate:.{digits}f} [{lower:.{digits}f}, {upper:.{digits}f}]"
    return "n/a" if value is None or np.isnan(value) else f"{float(value):.{digits}f}"


def auc_table_markdown(columns: Mapping[str, Mapping[str, object]], digits: int = 3,
                       include_mean: bool = True) -> str:
    """A markdown table with one row per class and one column per arm (or seed, model, ...).

    columns: column title → {class name → AUC}. A cell is a float, or an (auc, lower, upper) tuple /
    `BootstrapCI` printed as "0.812 [0.780, 0.840]"; NaN prints "n/a". A flat {class → AUC} mapping is
    taken as a single column titled "AUC". The last row is the mean over classes (`mean_auc`) of the
    point estimates.
    """
    if columns and not isinstance(next(iter(columns.values())), Mapping):
        columns = {"AUC": columns}
    if not columns:
        raise ValueError("auc_table_markdown needs at least one column of AUCs")
    class_names: list[str] = []
    for column in columns.values():
        class_names += [name for name in column if name not in class_names]
    lines = ["| class | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name in class_names:
        cells = [_format_cell(column.get(name, float("nan")), digits) for column in columns.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if include_mean:
        means = []
        for column in columns.values():
            points = [v[0] if isinstance(v, (tuple, list)) else v for v in column.values()]
            means.append(_format_cell(mean_auc(np.asarray(points, dtype=np.float64)), digits))
        lines.append("| **mean** | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def mean_sd_over_seeds(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of one metric over seeds; sd is NaN for one seed."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("mean_sd_over_seeds needs at least one value")
    sd = float(values.std(ddof=1)) if values.size > 1 else float("nan")
    return float(values.mean()), sd


# ---- predictions file ---------------------------------------------------------------------------------------
def write_predictions(path, image_ids, patient_ids, labels, probs, class_names: Sequence[str], mask=None) -> None:
    """One row per image: image_id, patient_id, then `label_<class>` and `prob_<class>` columns.

    A label that `mask` marks unknown (False) is written as an empty cell. Arms are compared later on the
    same test images (`read_predictions`, joined on image_id); the patient id travels along for the
    patient bootstrap.
    """
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    mask = np.ones(labels.shape, bool) if mask is None else np.asarray(mask, bool)
    n = len(image_ids)
    if labels.shape != (n, len(class_names)) or probs.shape != labels.shape or mask.shape != labels.shape \
            or len(patient_ids) != n:
        raise ValueError(f"need {n} image ids and patient ids and (N, C) = ({n}, {len(class_names)}) labels, probs "
                         f"and mask, got {len(patient_ids)} patient ids, labels {labels.shape}, probs {probs.shape}, "
                         f"mask {mask.shape}")
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image_id", "patient_id", *[f"label_{c}" for c in class_names],
                         *[f"prob_{c}" for c in class_names]])
        for i in range(n):
            writer.writerow([image_ids[i], patient_ids[i], *[f"{v:g}" if m else "" for v, m in zip(labels[i], mask[i])],
                             *[f"{p:.9g}" for p in probs[i]]])  # 9 digits keep float32 exact


def read_predictions(path) -> dict[str, object]:
    """A `write_predictions` file → {image_id, patient_id (N,), labels, mask, probs (N, C), class_names};
    unknown labels read as 0 with mask False."""
    with epath.Path(path).open() as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:2] != ["image_id", "patient_id"]:
        raise ValueError(f"{path} is not a predictions file (its header must start with image_id,patient_id)")
    header, body = rows[0], rows[1:]
    names = [h[len("label_"):] for h in header[2:] if h.startswith("label_")]
    c = len(names)
    if header[2:] != [f"label_{n}" for n in names] + [f"prob_{n}" for n in names]:
        raise ValueError(f"{path}: expected label_<class> then prob_<class> columns, got {header[2:]}")
    cells = np.array([row[2:2 + c] for row in body], dtype=object).reshape(len(body), c)
    mask = cells != ""
    labels = np.where(mask, cells, "0").astype(np.float32)
    probs = np.array([row[2 + c:] for row in body], dtype=np.float32).reshape(len(body), c)
    return {"image_id": np.array([row[0] for row in body], dtype=str),
            "patient_id": np.array([row[1] for row in body], dtype=str),
            "labels": labels, "mask": mask, "probs": probs, "class_names": names}


# ---- patient-level bootstrap -----------------------------------------------------------------------------
def patient_bootstrap(patient_ids, n_boot: int, seed: int, max_elements: int = 4_000_000
                      ) -> Iterator[np.ndarray]:
    """Yields bootstrap resamples by patient, in chunks, as image multiplicities.

    Each resample draws as many patients as there are, with replacement; every image of a drawn patient
    enters the resample once per draw. A chunk is an int array (b, n_images) saying how often each
    image appears in each of b resamples; images of one patient always share a value. Chunks hold at
    most about `max_elements` numbers, so memory stays small for large test sets.
    """
    patient_ids = np.asarray(patient_ids)
    if patient_ids.ndim != 1 or patient_ids.size == 0:
        raise ValueError(f"patient_ids must be a non-empty 1-D array (one id per image), got {patient_ids.shape}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    _, image_patient = np.unique(patient_ids, return_inverse=True)
    n_patients = int(image_patient.max()) + 1
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, max_elements // max(patient_ids.size, n_patients)))
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        draws = rng.integers(0, n_patients, size=(b, n_patients))
        offsets = (np.arange(b) * n_patients)[:, None]
        patient_counts = np.bincount((draws + offsets).ravel(), minlength=b * n_patients).reshape(b, n_patients)
        yield patient_counts[:, image_patient]
        done += b


def _weighted_aucs(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of each weighted resample, vectorised over resamples.

    With integer weights this equals `roc_auc_score` on the dataset with image i repeated weights[b, i]
    times (ties count 1/2); computing it for a whole chunk at once replaces thousands of sklearn calls
    (~2 ms each) by two sparse products. NaN where a resample lacks a class.
    """
    distinct, group = np.unique(scores, return_inverse=True)

    def weight_per_score(select: np.ndarray) -> np.ndarray:  # (n_distinct_scores, b)
        idx = np.flatnonzero(select)
        one_hot = scipy.sparse.csr_matrix((np.ones(idx.size), (group[idx], np.arange(idx.size))),
                                          shape=(distinct.size, idx.size))
        return np.asarray(one_hot @ weights[:, idx].T.astype(np.float64))

    positive, negative = weight_per_score(labels == 1), weight_per_score(labels == 0)
    negatives_below = np.cumsum(negative, axis=0) - negative
    wins = (positive * (negatives_below + 0.5 * negative)).sum(axis=0)
    pairs = positive.sum(axis=0) * negative.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / pairs, np.nan)


def _percentile_ci(estimate: float, replicates: np.ndarray, alpha: float) -> BootstrapCI:
    valid = replicates[~np.isnan(replicates)]
    if valid.size == 0:
        raise ValueError("no bootstrap resample held both classes; the class is too rare in this set")
    lower, upper = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
    return BootstrapCI(float(estimate), float(lower), float(upper), replicates)


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1) (0.05 gives a 95% interval), got {alpha}")


def bootstrap_auc_ci(labels, scores, patient_ids, n_boot: int = 1000, seed: int = 0,
                     alpha: float = 0.05) -> BootstrapCI:
    """AUC with a percentile (1 - alpha) interval from a bootstrap over patients (`patient_bootstrap`)."""
    _check_alpha(alpha)
    labels = _binary_labels(labels)
    scores = _scores_like(scores, labels)
    _both_classes(labels, "an AUC")
    if np.shape(patient_ids) != labels.shape:
        raise ValueError(f"patient_ids has shape {np.shape(patient_ids)}; need one id per image {labels.shape}")
    replicates = np.concatenate([_weighted_aucs(labels, scores, w)
                                 for w in patient_bootstrap(patient_ids, n_boot, seed)])
    return _percentile_ci(roc_auc_score(labels, scores), replicates, alpha)


def bootstrap_auc_difference_ci(labels, scores_a, scores_b, patient_ids, n_boot: int = 1000, seed: int = 0,
                                alpha: float = 0.05) -> BootstrapCI:
    """AUC(a) - AUC(b) for two arms scored on the same test images, with a paired patient bootstrap.

    Both arms are evaluated on the same resamples, so the interval accounts for their correlation. An
    interval excluding 0 means the arms differ at level alpha.
    """
    _check_alpha(alpha)
    labels = _binary_labels(labels)
    scores_a, scores_b = _scores_like(scores_a, labels, "scores_a"), _scores_like(scores_b, labels, "scores_b")
    _both_classes(labels, "an AUC difference")
    if np.shape(patient_ids) != labels.shape:
        raise ValueError(f"patient_ids has shape {np.shape(patient_ids)}; need one id per image {labels.shape}")
    replicates = np.concatenate([_weighted_aucs(labels, scores_a, w) - _weighted_aucs(labels, scores_b, w)
                                 for w in patient_bootstrap(patient_ids, n_boot, seed)])
    estimate = roc_auc_score(labels, scores_a) - roc_auc_score(labels, scores_b)
    return _percentile_ci(estimate, replicates, alpha)


# ---- DeLong ------------------------------------------------------------------------------------------------
def delong_covariance(labels, score_sets) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (k,) and their DeLong covariance matrix (k, k) for k score sets (k, N) on the same images.

    Sun & Xu (2014): with m positives X and n negatives Y, midranks within X, within Y and within X∪Y
    give every structural component (DeLong et al. 1988) in O((m+n) log(m+n)):
      V10_i = (rank of X_i in X∪Y - rank of X_i in X) / n   (share of negatives below X_i, ties 1/2)
      V01_j = 1 - (rank of Y_j in X∪Y - rank of Y_j in Y) / m
      AUC = mean(V10),   Cov = S10 / m + S01 / n   with S10, S01 the sample covariances of V10, V01.
    """
    labels = _binary_labels(labels)
    score_sets = np.atleast_2d(np.asarray(score_sets, dtype=np.float64))
    if score_sets.shape[1:] != labels.shape:
        raise ValueError(f"score_sets must be (k, N) with N = {labels.size} images, got {score_sets.shape}")
    if not np.isfinite(score_sets).all():
        raise ValueError("scores contain NaN or infinite values")
    m, n = int(labels.sum()), int(labels.size - labels.sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least 2 positive and 2 negative images, got {m} and {n}")
    positives, negatives = score_sets[:, labels == 1], score_sets[:, labels == 0]
    rank_all = scipy.stats.rankdata(np.concatenate([positives, negatives], axis=1), axis=1)  # midranks
    rank_pos = scipy.stats.rankdata(positives, axis=1)
    rank_neg = scipy.stats.rankdata(negatives, axis=1)
    v10 = (rank_all[:, :m] - rank_pos) / n
    v01 = 1.0 - (rank_all[:, m:] - rank_neg) / m
    aucs = v10.mean(axis=1)
    covariance = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, covariance


def delong_test(labels, scores_a, scores_b) -> DeLongResult:
    """DeLong's test for two correlated ROC curves (two classifiers scored on the same images).

    z = (AUC_a - AUC_b) / sqrt(Var_a + Var_b - 2 Cov_ab), two-sided p from the normal distribution.
    When the difference has zero variance (e.g. identical scores) z is 0 and p is 1 if the AUCs are equal,
    otherwise z is ±inf and p is 0.
    """
    labels = _binary_labels(labels)
    scores_a, scores_b = _scores_like(scores_a, labels, "scores_a"), _scores_like(scores_b, labels, "scores_b")
    aucs, cov = delong_covariance(labels, np.stack([scores_a, scores_b]))
    difference = aucs[0] - aucs[1]
    variance = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    # Relative tolerance: rounding leaves ~1e-17 of variance where the two score sets rank identically.
    if variance <= 1e-12 * (cov[0, 0] + cov[1, 1]) or variance <= 0:
        z = 0.0 if np.isclose(difference, 0.0, atol=1e-12) else float(np.copysign(np.inf, difference))
    else:
        z = float(difference / np.sqrt(variance))
    p_value = float(2 * scipy.stats.norm.sf(abs(z)))
    return DeLongResult(float(aucs[0]), float(aucs[1]), z, p_value)
