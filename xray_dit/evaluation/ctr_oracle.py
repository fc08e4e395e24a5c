"""The CTR oracle: reads the cardiothoracic ratio from a frontal radiograph's pixels alone.

Made for the phantom (`xray_dit.data.phantom`), whose truth it reads back, but it never sees metadata,
so it also scores images made by a generative model trained on the phantom: label fidelity of generated
Cardiomegaly images (CTR > 0.5), and how well an autoencoder's reconstructions keep the ratio.
"""

from __future__ import annotations

import math

import numpy as np

# The phantom leaves at least this much lung (in image half-widths at the canonical pose) between each of
# the heart's lateral extremes and the chest wall; a lung narrower than (most of) that is the costophrenic
# angle, not the strip beside the heart. Mirrors `xray_dit.data.phantom.anatomy.LUNG_BESIDE_HEART`.
LUNG_BESIDE_HEART = 0.2


def measure_ctr(image: np.ndarray) -> float:
    """Reads the cardiothoracic ratio from a phantom-style frontal radiograph's pixels alone.

    Accepts uint8 (H, W) or (H, W, 1), or float in [0, 1] or [-1, 1] (detected: any value below -0.01
    means [-1, 1]). Returns NaN, never raises, when the image shows no measurable thorax: no two lung
    fields of a plausible size, no heart border between them, or a ratio outside (0.2, 0.9). Made for
    64 px and larger; below that the borders are too coarse.

    How: the lungs are the dark regions inside the body (dark regions touching the image border are the
    air around the patient). On every row the lungs' lateral and medial borders are located to sub-pixel
    precision where the row profile crosses the lung / soft-tissue threshold. The thoracic width is the
    mean of the widest rows; each heart border's extreme is the most lateral point of the lung's medial
    border above the cardiophrenic angle (see `_heart_extreme`).
    """
    pixels = _unit_float(image)
    height, width = pixels.shape
    if min(height, width) < 16:
        return float("nan")
    # Averaging three rows leaves near-vertical borders in place and divides the noise by about 1.6.
    profile = np.concatenate([pixels[:1], pixels, pixels[-1:]], axis=0)
    profile = 0.25 * profile[:-2] + 0.5 * profile[1:-1] + 0.25 * profile[2:]

    split = _otsu(profile)
    if math.isnan(split):  # a flat image
        return float("nan")
    outside = _border_connected(profile < split)
    threshold = _otsu(profile[~outside]) if not outside.all() else float("nan")
    if math.isnan(threshold):
        return float("nan")
    dark = profile < threshold
    lungs = dark & ~_border_connected(dark)
    labels = _label(lungs)
    ids, areas = np.unique(labels[lungs], return_counts=True)
    if len(ids) == 0:
        return float("nan")
    # Lung fields are big and compact; specks, bubbles and noise clusters are not.
    fields = [i for i, area in zip(ids, areas)
              if area >= max(0.2 * areas.max(), 0.04 * lungs.size) and _fill(labels == i) >= 0.4]
    lungs &= np.isin(labels, fields)
    rows = np.flatnonzero(lungs.any(axis=1))
    if len(rows) < 8:
        return float("nan")

    columns = np.arange(width)
    first = np.argmax(lungs, axis=1)
    last = width - 1 - np.argmax(lungs[:, ::-1], axis=1)
    midline = float(np.median(0.5 * (first[rows] + last[rows])))
    left = lungs & (columns[None, :] < midline)
    right = lungs & (columns[None, :] >= midline)
    if min(left.sum(), right.sum()) < 0.04 * lungs.size:
        return float("nan")

    widths = _border_positions(profile, right, threshold, outward=+1) - _border_positions(
        profile, left, threshold, outward=-1)
    widths = np.sort(widths[np.isfinite(widths)])
    if len(widths) < 0.15 * height:
        return float("nan")
    thorax = float(np.mean(widths[-max(3, height // 20):]))
    if thorax < 0.25 * width:
        return float("nan")

    # The heart's extremes lie in the lower part of the lung fields; higher up, bones over the apices can
    # break the lung mask into lateral islands.
    top_row = rows[0] + 0.35 * (rows[-1] - rows[0])
    left_extreme = _heart_extreme(profile, left, threshold, outward=+1, midline=midline, top_row=top_row)
    right_extreme = _heart_extreme(profile, right, threshold, outward=-1, midline=midline, top_row=top_row)
    ratio = (left_extreme + right_extreme) / thorax
    return float(ratio) if 0.2 < ratio < 0.9 else float("nan")


def _fill(region: np.ndarray) -> float:
    """Share of its bounding box a region covers."""
    rows, columns = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    return float(region.sum() / ((rows[-1] - rows[0] + 1) * (columns[-1] - columns[0] + 1)))


def _unit_float(image) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"measure_ctr takes one grayscale image (H, W) or (H, W, 1), got shape "
                         f"{array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"measure_ctr takes uint8 or float pixels, got {array.dtype}")
    array = np.nan_to_num(array.astype(np.float64))
    if array.min() < -0.01:
        array = (array + 1.0) / 2.0
    return np.clip(array, 0.0, 1.0)


def _otsu(values: np.ndarray) -> float:
    """The threshold best splitting `values` (in [0, 1]) into a dark and a bright class; NaN if flat."""
    histogram, edges = np.histogram(values, bins=256, range=(0.0, 1.0))
    centres = 0.5 * (edges[1:] + edges[:-1])
    weight = np.cumsum(histogram)
    total = weight[-1]
    moment = np.cumsum(histogram * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_low = moment / weight
        mean_high = (moment[-1] - moment) / (total - weight)
        between = weight * (total - weight) * (mean_low - mean_high) ** 2
    between = np.nan_to_num(between[:-1], nan=-1.0)
    return float(edges[1:][np.argmax(between)]) if between.max() > 0 else float("nan")


def _run_minimum(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each horizontal run of `mask` takes the smallest of its `values`."""
    starts = mask & ~np.concatenate([np.zeros_like(mask[:, :1]), mask[:, :-1]], axis=1)
    flat_mask = mask.ravel()
    run_of_pixel = np.cumsum(starts.ravel())[flat_mask] - 1
    in_mask = values.ravel()[flat_mask]
    first_of_run = np.flatnonzero(np.diff(np.concatenate([[-1], run_of_pixel])))
    result = values.copy().ravel()
    result[flat_mask] = np.minimum.reduceat(in_mask, first_of_run)[run_of_pixel]
    return result.reshape(values.shape)


def _label(mask: np.ndarray) -> np.ndarray:
    """4-connected components: every pixel of `mask` gets its component's smallest flat index."""
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), mask.size)
    if not mask.any():
        return labels
    while True:
        updated = _run_minimum(labels, mask)
        updated = _run_minimum(updated.T.copy(), mask.T.copy()).T
        if np.array_equal(updated, labels):
            return labels
        labels = updated


def _border_connected(mask: np.ndarray) -> np.ndarray:
    """The pixels of `mask` connected to the image border through `mask`."""
    labels = _label(mask)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return mask & np.isin(labels, border[border < mask.size])


def _border_positions(profile, side_mask, threshold, outward):
    """Per row, the sub-pixel column where the lung of `side_mask` ends towards `outward` (NaN: no lung).

    The border lies between the lung's last pixel in the `outward` direction (±1 along the row) and its
    neighbour there, where the profile crosses the threshold.
    """
    height, width = side_mask.shape
    present = side_mask.any(axis=1)
    from_left = np.argmax(side_mask, axis=1)
    from_right = width - 1 - np.argmax(side_mask[:, ::-1], axis=1)
    column = from_right if outward > 0 else from_left
    neighbour = column + outward
    valid = present & (neighbour >= 0) & (neighbour < width)
    rows = np.arange(height)
    neighbour = np.clip(neighbour, 0, width - 1)
    inside = profile[rows, column]
    beyond = profile[rows, neighbour]
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.clip((threshold - inside) / (beyond - inside), 0.0, 1.0)
    fraction = np.where(beyond > inside, fraction, 0.5)
    return np.where(valid, column + outward * fraction, np.nan)


def _heart_extreme(profile, side_mask, threshold, outward, midline, top_row) -> float:
    """Distance from the midline to the heart border's most lateral point, seen from one lung.

    `outward` points from this lung's medial border into the heart. Walking up from the lung base, the
    medial border first follows the diaphragm, flatter than 53 degrees from the horizontal except in the
    narrow costophrenic angle; from the cardiophrenic angle up it follows the heart, which is steep
    around its extreme. The extreme is the largest distance between `top_row` and the lowest steep row,
    refined by a parabola.
    """
    height = side_mask.shape[0]
    positions = _border_positions(profile, side_mask, threshold, outward)
    lateral = -outward * (positions - midline)
    rows = np.flatnonzero(np.isfinite(lateral))
    if len(rows) < 5:
        return float("nan")
    width = side_mask.shape[1]
    # Slope of the border in pixels per row, over +-0.025 image half-widths: the heart's border near its
    # extreme is steep (under 0.75); the diaphragm is that steep only near the costophrenic angle, where
    # the lung is a narrow strip at the chest wall (beside the heart's extreme it is wider, see
    # LUNG_BESIDE_HEART).
    span = max(1, round(0.025 * height / 2))
    slope = np.full(height, np.inf)
    slope[span:-span] = np.abs(positions[2 * span:] - positions[:-2 * span]) / (2 * span)
    outer = _border_positions(profile, side_mask, threshold, -outward)
    with np.errstate(invalid="ignore"):
        heart_side = (slope <= 0.75) & (np.abs(outer - positions) >= 0.7 * LUNG_BESIDE_HEART * width / 2)
    steep_rows = rows[heart_side[rows]]
    if len(steep_rows) == 0:
        return float("nan")
    above = rows[(rows <= steep_rows.max()) & (rows >= top_row)]
    if len(above) == 0:
        return float("nan")
    best = above[np.argmax(lateral[above])]
    peak = lateral[best]
    if best - 1 in above and best + 1 in above:
        up, down = lateral[best - 1], lateral[best + 1]
        curvature = up - 2 * peak + down
        if curvature < -1e-9:  # the vertex of the parabola through the three rows, at most half a pixel up
            peak += min(-0.125 * (down - up) ** 2 / curvature, 0.5)
    return float(peak)
