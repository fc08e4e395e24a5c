"""Simple baselines the classifier has to beat: logistic regression on downsampled pixels.

A network that does no better than a linear model on 16x16 pixels has learned nothing beyond what the image's
coarse layout (view, exposure, positioning, body size) already gives away, so every classifier run reports
these beside its own AUC. Named `pixel_logreg_<size>`: the images are area-averaged to size x size, each
pixel is standardised on the training images, and one L2-regularised logistic regression per class is fitted;
its inverse regularisation strength C is the grid value with the best validation AUC. The test split is only
scored.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from xray_dit.evaluation import classification

PIXEL_LOGREG = re.compile(r"pixel_logreg_(\d+)")
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# A class whose validation AUC is undefined (one label value there) gets this C: the grid's middle.
DEFAULT_C = 1e-2
# At most this many training images (a seeded random subset) are fitted, so that the baseline stays cheap on
# full-size datasets; the LR's AUC barely moves beyond a few thousand images.
MAX_TRAIN_IMAGES = 20_000


def pixel_sizes(names: Sequence[str]) -> dict[str, int]:
    """Baseline name → the side its images are downsampled to; unknown names are an error listing the form."""
    sizes = {}
    for name in names:
        match = PIXEL_LOGREG.fullmatch(name)
        if not match or int(match.group(1)) < 1:
            raise ValueError(f"unknown classifier baseline {name!r}; baselines are named pixel_logreg_<size> "
                             "(e.g. pixel_logreg_16), or give () for none")
        sizes[name] = int(match.group(1))
    return sizes


def area_downsample(images, size: int):
    """(N, H, W) or (N, H, W, 1) images → (N, size·size) area averages; H and W must be multiples of size.

    NumPy or JAX arrays alike (the classifier runs it on the devices, so only the small result is gathered).
    """
    if images.ndim == 4:
        images = images[..., 0]
    n, height, width = images.shape
    if height % size or width % size:
        raise ValueError(f"pixel baselines average whole blocks: {height}x{width} images cannot be downsampled "
                         f"to {size}x{size}; choose a size that divides {height}")
    blocks = images.reshape(n, size, height // size, size, width // size)
    return blocks.mean(axis=(2, 4)).reshape(n, size * size)


def fit_logreg(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
               c_grid: Sequence[float] = C_GRID):
    """Standardise + logistic regression, C chosen by validation AUC (the smallest C among ties).

    Returns (the fitted model, its C, its validation AUC); NaN validation AUC and `DEFAULT_C` where the
    validation labels hold one value only.
    """
    def fit(c):
        # liblinear's primal Newton solver: several times faster here than lbfgs, which crawls on the nearly
        # separable problems of large C and few images.
        model = LogisticRegression(C=c, solver="liblinear", max_iter=1000)
        return make_pipeline(StandardScaler(), model).fit(x_train, y_train)

    if np.unique(y_val).size < 2:
        return fit(DEFAULT_C), DEFAULT_C, float("nan")
    best = None
    for c in sorted(c_grid):
        model = fit(c)
        auc = classification.per_class_auc(y_val[:, None], model.decision_function(x_val)[:, None], ["y"])["y"]
        if best is None or auc > best[2]:
            best = (model, float(c), auc)
    return best


def pixel_logreg(pixels: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                 masks: Mapping[str, np.ndarray], class_names: Sequence[str], *,
                 c_grid: Sequence[float] = C_GRID, seed: int = 0) -> dict:
    """One pixel baseline on "train", "validation", "test" (pixels (N, P); labels, masks (N, C) per split).

    Returns {"C", "validation_auc", "test_auc": {class → value}, "test_auc_mean", "train_images"}. A class
    without both label values among its known training labels is left out of "C" and has NaN AUCs.
    """
    train_rows = np.arange(len(pixels["train"]))
    if len(train_rows) > MAX_TRAIN_IMAGES:
        train_rows = np.sort(np.random.default_rng(seed).choice(train_rows, MAX_TRAIN_IMAGES, replace=False))
    result: dict = {"C": {}, "validation_auc": {}, "test_auc": {}, "train_images": int(len(train_rows))}
    for c, name in enumerate(class_names):
        known = {split: masks[split][:, c] > 0 for split in ("validation", "test")}
        train = train_rows[masks["train"][train_rows, c] > 0]
        y_train = labels["train"][train, c]
        if np.unique(y_train).size < 2:
            result["validation_auc"][name] = result["test_auc"][name] = float("nan")
            continue
        model, chosen, val_auc = fit_logreg(pixels["train"][train], y_train, pixels["validation"][known["validation"]],
                                            labels["validation"][known["validation"], c], c_grid)
        test_scores = model.decision_function(pixels["test"][known["test"]])
        result["C"][name] = chosen
        result["validation_auc"][name] = val_auc
        result["test_auc"][name] = classification.per_class_auc(
            labels["test"][known["test"], c][:, None], test_scores[:, None], [name])[name]
    result["test_auc_mean"] = classification.mean_auc(result["test_auc"])
    return result
