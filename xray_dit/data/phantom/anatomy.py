"""A phantom patient's body and the geometry that both drawing the cohort and rendering need.

Geometry lives in *anatomy units*: the image spans [-1, 1] in x (left to right as displayed) and y (top to
bottom) at the canonical pose. As in every radiograph, the patient's right is the image's left. Truth:

    CTR = (max horizontal extent of the heart silhouette) / (max inner thoracic width)

where the inner thoracic width is the distance between the outer (lateral) lung borders. The phantom is
built so both are visible: the lateral lung borders run vertically over a stretch of rows (the widest rows
of the thorax, above the costophrenic angles) and the heart's lateral extremes always sit in lung, above
the diaphragm. Cardiomegaly ⇔ CTR > 0.5.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Lung left between each of the heart's lateral extremes and the chest wall, in anatomy units; pleural
# fluid stays 0.17 lateral to the extremes. The CTR oracle (`xray_dit.evaluation.ctr_oracle`) relies on it
# to tell the heart's border from the costophrenic angle.
LUNG_BESIDE_HEART = 0.2


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """A patient's body, in anatomy units (see the module docstring). Stable across the patient's images."""

    thorax_half_width: float       # lateral lung border distance from the midline (over the widest rows)
    apex_y: float                  # top of the lungs
    widest_y: float                # from here down to the costophrenic angles the lateral borders run
                                   # vertically
    dome_right_y: float            # top of the right hemidiaphragm (image left)
    dome_left_y: float             # top of the left hemidiaphragm (image right)
    dome_peak_fraction: float      # where the dome peaks, as a fraction of thorax_half_width from the midline
    costophrenic_depth: float      # how far the costophrenic angle lies below the dome top
    body_wall: float               # soft tissue beyond the lateral lung borders
    neck_half_width: float
    shoulder_y: float
    mediastinum_half_width: float
    knob_radius: float             # aortic knob (image right of the upper mediastinum)
    knob_y: float
    heart_center_x: float
    heart_center_y: float
    heart_semi_major: float
    heart_semi_minor: float
    heart_tilt_deg: float          # long axis, degrees below the +x axis (apex down, to image right)
    lung_air: float                # how dark the lungs are
    rib_spacing: float
    rib_offset_y: float            # the first posterior rib's height at the spine
    rib_arch: float                # curvature of the posterior rib arcs
    rib_thickness: float
    clavicle_y: float
    spine_half_width: float
    vessel_phase: float
    breast: float                  # soft-tissue shadow over the lung bases (0 = none)
    gastric_bubble: float          # gas in the stomach under the left hemidiaphragm (0 = none)
    nodule_x: float                # nodule centre; nodule_radius 0 = no nodule
    nodule_y: float
    nodule_radius: float


def lung_outer_x(y, t, apex_y, widest_y):
    """The lungs' lateral border: rounds off to the apex above `widest_y`, runs vertically below it."""
    above = np.clip((widest_y - y) / (widest_y - apex_y), 0.0, None)
    return t * np.power(np.clip(1 - above ** 2.2, 0, 1), 1 / 2.2)


def dome_y(x, t, dome_right_y, dome_left_y, dome_peak_fraction, costophrenic_depth):
    """Height of the diaphragm (the lung's lower border) under x: peaked domes meeting the chest wall at
    the costophrenic angles."""
    r = np.abs(x)
    top = np.where(x < 0, np.float32(dome_right_y), np.float32(dome_left_y))
    peak = dome_peak_fraction * t
    lateral = np.maximum(r - peak, 0.0) / (t - peak)
    medial = np.maximum(peak - r, 0.0)
    return top + costophrenic_depth * lateral ** 2 + 0.6 * medial ** 2


def heart_half_extent(a: Anatomy) -> float:
    """Half the heart's horizontal extent: its lateral extremes lie this far either side of its centre."""
    tilt = math.radians(a.heart_tilt_deg)
    return math.hypot(a.heart_semi_major * math.cos(tilt), a.heart_semi_minor * math.sin(tilt))
