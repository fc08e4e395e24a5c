"""Renders a phantom image: the procedural frontal radiograph of a `PhantomImage`, at any size.

Everything is numpy; the anatomy is evaluated on a 2x supersampled grid of the target size.
"""

from __future__ import annotations

import math

import numpy as np

from xray_dit.data.phantom.anatomy import Anatomy, dome_y, heart_half_extent, lung_outer_x
from xray_dit.data.phantom.cohort import PhantomImage

_SUPERSAMPLE = 2
_NUM_POSTERIOR_RIBS = 10
_NUM_ANTERIOR_RIBS = 6


def _ramp(distance, width):
    """Soft inside-indicator of a signed distance (positive inside): 0.5 exactly on the border."""
    return np.clip(distance / width + 0.5, 0.0, 1.0)


def render(image: PhantomImage, size: int) -> np.ndarray:
    """The radiograph of `image`: uint8 (size, size). The same record always gives the same bytes."""
    if not isinstance(image, PhantomImage):
        raise ValueError(f"render takes a PhantomImage (from make_cohort), got {type(image).__name__}")
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size={size!r} must be an integer >= 16 (pixels per side)")
    size = int(size)
    a = image.anatomy
    n = size * _SUPERSAMPLE
    # float32 throughout: twice as fast as float64 (transcendentals far more), precise enough for 8 bits.
    grid = ((np.arange(n) + 0.5) * (2.0 / n) - 1.0).astype(np.float32)
    u, v = grid[None, :] - image.shift_x, grid[:, None] - image.shift_y
    rot = math.radians(image.rotation_deg)
    x = (math.cos(rot) * u + math.sin(rot) * v) / image.scale
    y = (-math.sin(rot) * u + math.cos(rot) * v) / image.scale
    # One output pixel wide at small sizes (the box filter then makes edges exactly sub-pixel linear),
    # never sharper than a real radiograph's edges at large sizes.
    edge = max(2.0 / size, 0.012) / image.scale
    r = np.abs(x)
    t = a.thorax_half_width
    right_side = x < 0  # patient's right = image left

    # Body outline: neck, shoulders sloping down from it, chest wall beyond the ribs. X-rays cross less
    # tissue towards the sides, so the soft tissue darkens there.
    body_half_width = t + a.body_wall + 0.16 * _ramp(-0.3 - y, 0.6)
    span = np.clip((r - a.neck_half_width) / (body_half_width - a.neck_half_width), 0, 1)
    shoulder_top = np.where(r < a.neck_half_width, -3.0, a.shoulder_y - 0.3 * (1 - span) ** 1.5)
    body = _ramp(body_half_width - r, 0.02) * _ramp(y - shoulder_top, 0.03)
    thickness = np.sqrt(np.clip(1 - (r / (body_half_width + 0.05)) ** 2, 0, 1))
    attenuation = body * (0.35 + 0.57 * thickness)

    outer = lung_outer_x(y, t, a.apex_y, a.widest_y)
    dome = dome_y(x, t, a.dome_right_y, a.dome_left_y, a.dome_peak_fraction, a.costophrenic_depth)
    lung = _ramp(outer - r, edge) * _ramp(dome - y, edge)
    # The chest wall (ribs seen edge-on, intercostal muscles) is a dense band around the lungs, so lungs
    # and the air around the patient never touch.
    chest_wall = _ramp(r - outer, edge) * _ramp(outer + 0.06 - r, 0.03) * _ramp(y - a.apex_y, 0.05)

    heart_level, heart_inside, central = _cardiomediastinal(a, x, y, r, right_side, edge)
    lung = lung * (1 - central)
    # Pleural fluid fills the lateral base up to a meniscus climbing the chest wall, staying lateral to
    # the heart's extreme (which stays measurable).
    half_extent = heart_half_extent(a)
    for height, side, extreme_x in ((image.effusion_right, right_side, half_extent - a.heart_center_x),
                                    (image.effusion_left, ~right_side, half_extent + a.heart_center_x)):
        if height > 0:
            start = max(0.45 * t, extreme_x + 0.17)
            climb = np.clip((r - start) / (t - start), 0, 1) ** 1.5
            surface = dome - (0.25 * a.costophrenic_depth + height) * climb
            lung = lung * (1 - 0.85 * _ramp(y - surface, 0.04) * side)

    air = a.lung_air * lung * (0.72 + 0.28 * _ramp(y - a.apex_y - 0.25, 0.5) - 0.12 * _ramp(y - 0.1, 0.5))
    attenuation = attenuation - air + _lung_markings(a, x, y, heart_inside) * lung
    # Heart, mediastinum and the liver / spleen under the diaphragm: one soft-tissue density, no seams.
    attenuation += 0.12 * np.maximum(central, _ramp(y - dome, 0.06)) * body + 0.15 * chest_wall * body
    attenuation += 0.05 * np.sqrt(np.clip(1 - heart_level ** 2, 0, 1))  # the heart is thickest mid-way
    trachea = _ramp(0.032 - r, edge) * _ramp(a.knob_y + 0.05 - y, 0.05)
    bubble = _ramp(1 - np.hypot((x - 0.45 * t) / 0.15, (y - a.dome_left_y - 0.12) / 0.08), 0.6)
    attenuation -= (0.16 * trachea + a.gastric_bubble * bubble) * body
    attenuation += _bones(a, y, r, body, edge, ap=image.view == "AP")

    # Soft-tissue breast shadows over the lower lateral lungs.
    if a.breast > 0:
        breast_level = np.hypot((r - 0.55 * t) / 0.32, (y - 0.42) / 0.22)
        attenuation += a.breast * _ramp(1 - breast_level, 0.5)
    if a.nodule_radius > 0:
        nodule_distance = np.hypot(x - a.nodule_x, y - a.nodule_y)
        attenuation += 0.3 * _ramp(a.nodule_radius - nodule_distance, max(edge, 0.015))

    intensity = 1 - np.exp(-1.35 * np.clip(attenuation, 0, None))
    intensity = image.exposure_gain * intensity ** image.exposure_gamma
    # Anti-aliasing: average the supersampled grid down to the target size.
    intensity = intensity.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))
    rng = np.random.default_rng(image.render_seed)
    intensity = intensity + rng.normal(0.0, image.noise_std, intensity.shape)
    return np.round(np.clip(intensity, 0.0, 1.0) * 255).astype(np.uint8)



def _cardiomediastinal(a: Anatomy, x, y, r, right_side, edge):
    """Heart (tilted ellipse), mediastinum widening towards it, aortic knob and pulmonary trunk.

    Returns the heart's ellipse level (1 on its border), its inside-distance, and the joint silhouette's
    coverage. Inside-distances are scaled to be exact along rows at the heart's lateral extremes and the
    fillets joining the parts fade out above those, so the silhouette is exactly as wide as the heart.
    """
    tilt = math.radians(a.heart_tilt_deg)
    dx, dy = x - a.heart_center_x, y - a.heart_center_y
    along = (dx * math.cos(tilt) + dy * math.sin(tilt)) / a.heart_semi_major
    across = (-dx * math.sin(tilt) + dy * math.cos(tilt)) / a.heart_semi_minor
    heart_level = np.sqrt(along ** 2 + across ** 2)
    half_extent = heart_half_extent(a)
    heart_inside = (1 - heart_level) * half_extent
    # The leftmost point lies this far above the centre, the rightmost as far below it.
    extreme_dy = ((a.heart_semi_major ** 2 - a.heart_semi_minor ** 2) * math.sin(tilt) * math.cos(tilt)
                  / half_extent)
    mw = a.mediastinum_half_width
    # Left of the patient, below the knob, the border slopes out towards the heart (pulmonary trunk, left
    # atrial appendage), reaching 70 % of the heart's lateral reach at the heart's top.
    heart_top = a.heart_center_y - math.hypot(a.heart_semi_major * math.sin(tilt),
                                              a.heart_semi_minor * math.cos(tilt))
    slope_out = np.clip((y - a.knob_y - 0.05) / (heart_top - a.knob_y - 0.05), 0, 1)
    left_reach = half_extent + a.heart_center_x
    mediastinum_inside = mw - r + (x > 0) * (0.02 + max(0.7 * left_reach - mw - 0.02, 0) * slope_out)
    knob_inside = a.knob_radius - np.hypot(x - mw - 0.01, y - a.knob_y)
    trunk_inside = 0.05 - np.hypot(x - mw + 0.01, y - a.knob_y - 0.2)
    extreme_y = np.where(right_side, np.float32(a.heart_center_y - extreme_dy),
                         np.float32(a.heart_center_y + extreme_dy))
    fillet = (np.where(right_side, np.float32(0.12), np.float32(0.2))
              * np.clip((extreme_y - 0.08 - y) / 0.15, 0, 1) + 1e-3)
    silhouette = _smooth_max(_smooth_max(heart_inside, mediastinum_inside, fillet),
                             np.maximum(knob_inside, trunk_inside), 0.06)
    return heart_level, heart_inside, _ramp(silhouette, edge)


def _lung_markings(a: Anatomy, x, y, heart_inside):
    """Vascular markings fanning out from the hila, fading with distance and near the heart, on a mottle."""
    vessels = np.zeros_like(x)
    for sx in (-1.0, 1.0):
        hx, hy = sx * (a.mediastinum_half_width + 0.07), -0.12
        rho = np.hypot(x - hx, y - hy)
        angle = np.arctan2(y - hy, (x - hx) * sx)
        wobble = 2.5 * np.sin(7 * rho + a.vessel_phase) + 0.8 * np.sin(17 * rho - 2 * a.vessel_phase)
        branches = ((0.5 + 0.5 * np.cos(19 * angle + wobble)) ** 4
                    * (0.6 + 0.4 * np.sin(5 * angle - 9 * rho + a.vessel_phase)))
        vessels += (branches * np.exp(-rho / 0.3) + 0.6 * np.exp(-(rho / 0.12) ** 2)) * ((x * sx) > 0)
    vessels *= _ramp(-heart_inside - 0.03, 0.05)
    mottle = (np.cos(9.0 * x + 5.0 * y + a.vessel_phase) * np.cos(4.0 * x - 11.0 * y + 2 * a.vessel_phase)
              + 0.5 * np.cos(23.0 * x + 17.0 * y - a.vessel_phase))
    return 0.12 * vessels + 0.025 * mottle


def _bones(a: Anatomy, y, r, body, edge, ap: bool):
    """Ribs, clavicles, spine and humeral heads. Posterior ribs arch up from the spine and fall at the
    chest wall, with brighter cortices; anterior ribs fall medially, fainter. AP views (portable, patient
    supine) show the clavicles higher and flatter."""
    t = a.thorax_half_width
    rib_curve = a.rib_arch * (1 + 0.25 * (y - a.rib_offset_y)) * ((r - 0.35 * t) ** 2 - (0.35 * t) ** 2)
    rib_coord = (y - a.rib_offset_y - rib_curve) / a.rib_spacing
    rib_index = np.floor(rib_coord)
    rib_centre = (rib_coord - rib_index - 0.5) * a.rib_spacing
    in_chest = _ramp(t + 0.04 - r, 0.03) * _ramp(r - 0.07, 0.04)
    rib_half_width = 0.5 * a.rib_thickness * (0.8 + 0.3 * np.clip(r / t, 0, 1))
    cortex = 0.55 + 0.45 * np.clip(np.abs(rib_centre) / rib_half_width, 0, 1) ** 2
    posterior = _ramp(rib_half_width - np.abs(rib_centre), edge) * cortex
    posterior *= ((rib_index >= 0) & (rib_index < _NUM_POSTERIOR_RIBS)) * in_chest
    anterior_spacing = a.rib_spacing * 1.3
    anterior_coord = (y - a.rib_offset_y - 0.2 + 0.55 * (r - t)) / anterior_spacing
    anterior_index = np.floor(anterior_coord)
    anterior_centre = (anterior_coord - anterior_index - 0.5) * anterior_spacing
    anterior = _ramp(0.4 * a.rib_thickness - np.abs(anterior_centre), 2 * edge)
    anterior *= (((anterior_index >= 0) & (anterior_index < _NUM_ANTERIOR_RIBS)) * in_chest
                 * _ramp(r - 0.3, 0.1))
    clavicle_line = (a.clavicle_y - (0.06 if ap else 0.0) - (0.12 if ap else 0.28) * (r - 0.1)
                     + 0.35 * (r - 0.1) * (r - 0.45))
    clavicle = (_ramp(0.032 + 0.012 * r - np.abs(y - clavicle_line), edge) * _ramp(r - 0.08, 0.02)
                * _ramp(t + a.body_wall - r, 0.05))
    vertebrae = 0.8 + 0.2 * np.cos(2 * np.pi * (y - a.rib_offset_y) / a.rib_spacing)
    spine = _ramp(a.spine_half_width - r, edge) * vertebrae
    humerus = _ramp(0.15 - np.hypot(r - (t + a.body_wall + 0.04), y - a.shoulder_y - 0.12), 0.02) * body
    return 0.09 * posterior + 0.035 * anterior + 0.2 * clavicle + 0.09 * spine + 0.22 * humerus


def _smooth_max(a, b, radius):
    """Union of two regions given by inside-distances, with a fillet of about `radius` where they meet."""
    blend = np.clip(radius - np.abs(a - b), 0, None) / radius
    return np.maximum(a, b) + 0.25 * radius * blend ** 2
