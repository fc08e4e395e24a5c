"""Every figure of the project. Each function writes one PNG (120 dpi) and returns its path.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas directly, never through pyplot: no
global backend switch, no display needed, and nothing left open between calls. `save_grid` is the
exception: a pixel-exact grid of samples (no axes, no resampling) written with PIL, as the trainers log it.
"""

from __future__ import annotations

import math
import pathlib
from typing import Mapping, Sequence

import numpy as np
from absl import logging
from etils import epath
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

DPI = 120


def _save(fig: Figure, path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _colours(n: int) -> list:
    return [colormaps["tab20" if n > 10 else "tab10"](i % 20) for i in range(n)]


def plot_roc_curves(curves_by_name: Mapping[str, object], path, title: str = "ROC curves") -> pathlib.Path:
    """ROC curves, one per class or per arm: {name → curve with .fpr, .tpr, .auc} (e.g. `RocCurve`)."""
    if not curves_by_name:
        raise ValueError("plot_roc_curves needs at least one curve")
    fig = Figure(figsize=(6.5, 6))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance (AUC 0.500)")
    colours = _colours(len(curves_by_name))
    for colour, (name, curve) in zip(colours, curves_by_name.items()):
        ax.plot(curve.fpr, curve.tpr, color=colour, linewidth=1.5, label=f"{name} (AUC {curve.auc:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 - specificity)",
           ylabel="True positive rate (sensitivity)", title=title, aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7 if len(curves_by_name) > 6 else 9, framealpha=0.9)
    return _save(fig, path)


def plot_confusion_matrix(cm, class_labels: Sequence[str], path, title: str = "Confusion matrix"
                          ) -> pathlib.Path:
    """A confusion matrix (rows true, columns predicted) with counts and row percentages in the cells."""
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(class_labels):
        raise ValueError(f"need a square confusion matrix with one row per label ({len(class_labels)}), "
                         f"got shape {cm.shape}")
    row_sums = cm.sum(axis=1, keepdims=True)
    row_share = np.divide(cm, row_sums, out=np.zeros(cm.shape), where=row_sums > 0)
    size = 2.2 + 1.1 * len(class_labels)
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.add_subplot()
    image = ax.imshow(row_share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    for (i, j), count in np.ndenumerate(cm):
        shown = f"{count:,.0f}" if float(count).is_integer() else f"{count:.3g}"
        ax.text(j, i, f"{shown}\n({100 * row_share[i, j]:.1f}%)", ha="center", va="center",
                color="white" if row_share[i, j] > 0.5 else "black", fontsize=10)
    ticks = np.arange(len(class_labels))
    ax.set_xticks(ticks, labels=class_labels)
    ax.set_yticks(ticks, labels=class_labels)
    ax.set(xlabel="Predicted", ylabel="True", title=title)
    return _save(fig, path)


def plot_auc_with_ci(arms: Mapping[str, Sequence[float]], path, title: str = "AUC with 95% CI",
                     xlabel: str = "AUC", reference: float | None = None) -> pathlib.Path:
    """Forest plot: one row per arm from {arm → (auc, lower, upper)}, value printed beside each point;
    `reference`: a dashed vertical line there (0 for differences)."""
    if not arms:
        raise ValueError("plot_auc_with_ci needs at least one arm")
    names = list(arms)
    auc, lower, upper = (np.array([float(arms[n][i]) for n in names]) for i in range(3))
    if np.any(lower > auc) or np.any(upper < auc):
        raise ValueError("every arm needs lower <= auc <= upper")
    fig = Figure(figsize=(7, 1.2 + 0.55 * len(names)))
    ax = fig.add_subplot()
    rows = np.arange(len(names))[::-1]
    ax.errorbar(auc, rows, xerr=[auc - lower, upper - auc], fmt="o", color="tab:blue", ecolor="tab:blue",
                capsize=4)
    for row, a, lo, hi in zip(rows, auc, lower, upper):
        ax.annotate(f"{a:.3f} [{lo:.3f}, {hi:.3f}]", (hi, row), xytext=(6, 0), textcoords="offset points",
                    va="center", fontsize=9)
    ax.set_yticks(rows, labels=names)
    if reference is not None:
        ax.axvline(reference, color="grey", linestyle="--", linewidth=1)
        lower, upper = np.minimum(lower, reference), np.maximum(upper, reference)
    span = max(upper.max() - lower.min(), 0.02)
    ax.set(xlim=(lower.min() - 0.1 * span, upper.max() + 0.6 * span), ylim=(-0.7, len(names) - 0.3),
           xlabel=xlabel, title=title)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_difference_curves(series: Mapping[str, Sequence[Sequence[float]]], path, *, xlabel: str,
                           ylabel: str = "difference", title: str = "",
                           xtick_labels: Mapping[float, str] | None = None) -> pathlib.Path:
    """Differences against a numeric axis (dose, data fraction): one line per series of (x, estimate, lower,
    upper) points with interval bars, a dashed line at 0. Series sharing an x are drawn slightly apart."""
    if not series or not any(len(points) for points in series.values()):
        raise ValueError("plot_difference_curves needs at least one series with a point")
    xs = np.array([float(p[0]) for points in series.values() for p in points])
    dodge = 0.012 * max(float(np.ptp(xs)), 1.0)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    for i, (colour, (name, points)) in enumerate(zip(_colours(len(series)), series.items())):
        points = sorted((tuple(float(v) for v in p[:4]) for p in points))
        if not points:
            continue
        x, estimate, lower, upper = (np.array(column) for column in zip(*points))
        if np.any(lower > estimate) or np.any(upper < estimate):
            raise ValueError(f"series {name!r} needs lower <= estimate <= upper at every point")
        x = x + dodge * (i - (len(series) - 1) / 2)
        ax.errorbar(x, estimate, yerr=[estimate - lower, upper - estimate], fmt="o-", color=colour, capsize=4,
                    label=name)
    if xtick_labels:
        ax.set_xticks(list(xtick_labels), labels=list(xtick_labels.values()))
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, framealpha=0.9)
    return _save(fig, path)


def plot_distance_histograms(distances_by_name: Mapping[str, np.ndarray], threshold: float | None, path,
                             title: str = "Nearest-training-image distances", xlabel: str = "distance",
                             bins: int = 50) -> pathlib.Path:
    """Overlaid density histograms on shared bins, e.g. synthetic→train vs held-out→train, and the threshold."""
    if not distances_by_name:
        raise ValueError("plot_distance_histograms needs at least one set of distances")
    arrays = {name: np.asarray(d, np.float64).ravel() for name, d in distances_by_name.items()}
    everything = np.concatenate(list(arrays.values()))
    edges = np.histogram_bin_edges(everything, bins=bins)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for colour, (name, d) in zip(_colours(len(arrays)), arrays.items()):
        ax.hist(d, bins=edges, density=True, alpha=0.45, color=colour, label=f"{name} (n={d.size})")
    if threshold is not None:
        ax.axvline(threshold, color="crimson", linestyle="--", linewidth=1.5, label=f"threshold {threshold:.4g}")
    ax.set(xlabel=xlabel, ylabel="density", title=title)
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _grayscale_stack(images, name: str) -> tuple[np.ndarray, float, float]:
    """(N, H, W) float images and the display range: 0..255 for integers, else [0, 1] or [-1, 1]."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:  # NHWC grayscale
        images = images[..., 0]
    if images.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W) or (N, H, W, 1) grayscale images, got shape {images.shape}")
    if np.issubdtype(images.dtype, np.integer):
        return images.astype(np.float64), 0.0, 255.0
    low = -1.0 if images.min(initial=0.0) < 0 else 0.0
    return images.astype(np.float64), low, 1.0


def image_grid(images, path, nrow: int = 8, titles: Sequence[str] | None = None,
               title: str | None = None) -> pathlib.Path:
    """A grid of grayscale images with `nrow` images per row (torchvision's make_grid convention).

    images: (N, H, W) or (N, H, W, 1); uint8 shown as 0..255, floats as [0, 1], or [-1, 1] when any
    value is negative. Optional per-image `titles` and a figure `title`.
    """
    images, vmin, vmax = _grayscale_stack(images, "images")
    if nrow < 1 or not len(images):
        raise ValueError(f"need at least one image and nrow >= 1, got {len(images)} images and nrow={nrow}")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    columns = min(nrow, len(images))
    rows = -(-len(images) // columns)
    fig = Figure(figsize=(1.6 * columns, 1.6 * rows + (0.4 if titles is not None else 0) + (0.4 if title else 0)))
    axes = fig.subplots(rows, columns, squeeze=False)
    for index, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if index < len(images):
            ax.imshow(images[index], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[index], fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_nn_pairs(query_images, neighbour_images, distances, path,
                  query_label: str = "synthetic", neighbour_label: str = "nearest training image",
                  title: str = "Nearest training neighbours") -> pathlib.Path:
    """Each query image (top row) above its nearest neighbour (bottom row), the distance between them."""
    query, vmin, vmax = _grayscale_stack(query_images, "query_images")
    neighbours, nvmin, nvmax = _grayscale_stack(neighbour_images, "neighbour_images")
    distances = np.asarray(distances, np.float64).ravel()
    if not len(query) or len(neighbours) != len(query) or distances.size != len(query):
        raise ValueError(f"need as many neighbours and distances as query images, got {len(query)}, "
                         f"{len(neighbours)} and {distances.size}")
    fig = Figure(figsize=(1.8 * len(query) + 1.0, 4.2))
    axes = fig.subplots(2, len(query), squeeze=False)
    for i in range(len(query)):
        axes[0, i].imshow(query[i], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
        axes[0, i].set_title(f"d = {distances[i]:.4g}", fontsize=9)
        axes[1, i].imshow(neighbours[i], cmap="gray", vmin=nvmin, vmax=nvmax, interpolation="nearest")
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel(query_label)
    axes[1, 0].set_ylabel(neighbour_label)
    fig.suptitle(title)
    return _save(fig, path)


def plot_ctr_distributions(real, synthetic, path, title: str = "Cardiothoracic ratio: real vs synthetic",
                           bins: int = 30) -> pathlib.Path:
    """Histograms of the cardiothoracic ratio measured on real and on synthetic images, means in the legend."""
    real, synthetic = np.asarray(real, np.float64).ravel(), np.asarray(synthetic, np.float64).ravel()
    if not real.size or not synthetic.size:
        raise ValueError("plot_ctr_distributions needs at least one real and one synthetic value")
    edges = np.histogram_bin_edges(np.concatenate([real, synthetic]), bins=bins)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for values, name, colour in ((real, "real", "tab:blue"), (synthetic, "synthetic", "tab:orange")):
        ax.hist(values, bins=edges, density=True, alpha=0.5, color=colour,
                label=f"{name}: {values.mean():.3f} ± {values.std():.3f} (n={values.size})")
    ax.set(xlabel="cardiothoracic ratio", ylabel="density", title=title)
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_training_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path,
                         ylabel: str = "loss", title: str = "Training curves", log_y: bool = False
                         ) -> pathlib.Path:
    """Lines from {name → (steps, values)}, e.g. train and validation loss."""
    if not curves:
        raise ValueError("plot_training_curves needs at least one curve")
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for colour, (name, (steps, values)) in zip(_colours(len(curves)), curves.items()):
        ax.plot(steps, values, color=colour, label=name, linewidth=1.5)
    if log_y:
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] float images (N, H, W, 1) or (N, H, W) → uint8 (N, H, W)."""
    images = np.asarray(images, np.float32)
    if images.ndim == 4:
        images = images[..., 0]
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_grid(images_uint8: np.ndarray, path: epath.PathLike, *, ncol: int | None = None, pad: int = 2) -> epath.Path:
    """A grayscale grid PNG of (N, H, W) uint8 images, pixel for pixel, on a white background."""
    n, h, w = images_uint8.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad), 255, np.uint8)
    for i, image in enumerate(images_uint8):
        r, c = divmod(i, ncol)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = image
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        Image.fromarray(canvas).save(f, format="PNG")
    logging.info("wrote %s", path)
    return path
