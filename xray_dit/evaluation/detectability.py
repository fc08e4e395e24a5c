"""Classifier two-sample test: can a simple classifier tell synthetic images from real ones?

A cross-validated logistic regression learns real (0) versus synthetic (1) from given features
(flattened downsampled pixels, or embeddings of any network); its held-out AUC is the detectability.
0.5 means the two sets are indistinguishable to that classifier; 1.0 means every synthetic image is
recognisable. Unlike a distance between feature distributions it has a fixed, interpretable scale,
and unlike a single-split test every image is scored once by a model that never saw it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from xray_dit.evaluation.classification import bootstrap_auc_ci


class Detectability(NamedTuple):
    auc: float              # of the pooled held-out scores, synthetic as the positive class
    lower: float            # percentile (1 - alpha) interval over a bootstrap of the held-out scores
    upper: float
    fold_aucs: np.ndarray   # (folds,) each fold's held-out AUC, for the spread between fits
    n_real: int
    n_synthetic: int


def _as_features(samples, name: str) -> np.ndarray:
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim < 2:
        raise ValueError(f"{name} must hold one feature vector or image per row, got shape {samples.shape}")
    features = samples.reshape(len(samples), -1)
    if not np.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return features


def detectability_auc(real, synthetic, seed: int = 0, folds: int = 5, n_boot: int = 1000, alpha: float = 0.05,
                      regularization: float = 1.0) -> Detectability:
    """Held-out AUC of a real-vs-synthetic logistic regression, with a bootstrap interval.

    real, synthetic: (n, ...) arrays (images are flattened), the same features for both. Folds are
    stratified and shuffled by `seed`; features are standardised inside each fold (on its training part);
    `regularization` is sklearn's C (inverse L2 strength). The interval resamples the held-out scores,
    treating every image as independent: it covers the evaluation noise, not the spread between
    refits (see `fold_aucs`), and images of one patient make it somewhat narrow.
    """
    real, synthetic = _as_features(real, "real"), _as_features(synthetic, "synthetic")
    if real.shape[1] != synthetic.shape[1]:
        raise ValueError(f"real and synthetic need the same features, got {real.shape[1]} and {synthetic.shape[1]}")
    if min(len(real), len(synthetic)) < folds or folds < 2:
        raise ValueError(f"{folds}-fold cross-validation needs folds >= 2 and at least {folds} real and synthetic "
                         f"samples each, got {len(real)} real and {len(synthetic)} synthetic")
    features = np.concatenate([real, synthetic])
    is_synthetic = np.concatenate([np.zeros(len(real), np.int8), np.ones(len(synthetic), np.int8)])
    held_out = np.empty(len(features))
    fold_aucs = []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, is_synthetic):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=regularization, max_iter=2000))
        model.fit(features[train], is_synthetic[train])
        held_out[test] = model.decision_function(features[test])
        fold_aucs.append(roc_auc_score(is_synthetic[test], held_out[test]))
    ci = bootstrap_auc_ci(is_synthetic, held_out, np.arange(len(features)), n_boot=n_boot, seed=seed, alpha=alpha)
    return Detectability(ci.estimate, ci.lower, ci.upper, np.array(fold_aucs), len(real), len(synthetic))
