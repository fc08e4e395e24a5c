"""Training augmentation of the input pipeline: small affine jitter and brightness/contrast on a uint8 image.

Grain transforms (picklable: they travel to mp_prefetch workers); `Augment` draws from the per-element
generator Grain derives from the pipeline's seed and the element's position, so a resumed iterator
augments exactly as the original would have.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation; every magnitude 0 (and hflip False) is the identity."""
    rotation_deg: float = 5.0   # uniform in ±rotation_deg
    scale: float = 0.05         # zoom factor uniform in 1 ± scale
    translate: float = 0.03     # shift uniform in ±translate × image side, per axis
    brightness: float = 0.05    # additive shift uniform in ±brightness × the full intensity range
    contrast: float = 0.05      # factor uniform in 1 ± contrast, around the image mean
    hflip: bool = False         # off by default: a mirrored chest puts the heart on the wrong side



def to_unit_range(gray: np.ndarray) -> np.ndarray:
    """uint8 (H, W) → float32 (H, W, 1) in [-1, 1], the pipeline's image convention."""
    return (gray.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0))[..., None]


class ToFloat(grain.transforms.Map):
    """uint8 image → float32 in [-1, 1], (H, W, 1): what evaluation pipelines do instead of augmenting."""

    def map(self, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**element, "image": to_unit_range(element["image"])}


class Augment(grain.transforms.RandomMap):
    """Small affine jitter (rotation, zoom, shift) on the uint8 image, then brightness/contrast."""

    def __init__(self, config: AugmentConfig):
        self._config = config

    def random_map(self, element: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        cfg = self._config
        gray = element["image"]
        angle = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg))
        zoom = rng.uniform(1.0 - cfg.scale, 1.0 + cfg.scale)
        shift = rng.uniform(-cfg.translate, cfg.translate, size=2) * np.array(gray.shape[::-1])
        if angle or zoom != 1.0 or shift.any():
            gray = _affine(gray, angle, zoom, shift)
        if cfg.hflip and rng.random() < 0.5:
            gray = gray[:, ::-1]
        image = to_unit_range(gray)
        contrast = rng.uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast)
        brightness = rng.uniform(-cfg.brightness, cfg.brightness) * 2.0  # the [-1, 1] range spans 2
        if contrast != 1.0 or brightness:
            mean = image.mean()
            image = np.clip((image - mean) * np.float32(contrast) + mean + np.float32(brightness), -1.0, 1.0)
        return {**element, "image": image.astype(np.float32)}


def _affine(gray: np.ndarray, angle: float, zoom: float, shift: np.ndarray) -> np.ndarray:
    """Rotates by `angle` and zooms by `zoom` about the centre, then shifts by `shift` (x, y) pixels.

    PIL's AFFINE maps output pixels back to input pixels, so it takes the inverse transform:
    in = c + R(-angle)/zoom · (out - c - shift).
    """
    height, width = gray.shape
    centre = np.array([width / 2.0, height / 2.0])
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    inverse = np.array([[cos, sin], [-sin, cos]])
    offset = centre - inverse @ (centre + shift)
    coefficients = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    image = Image.fromarray(gray, mode="L").transform((width, height), Image.Transform.AFFINE, coefficients,
                                                      resample=Image.Resampling.BILINEAR, fillcolor=0)
    return np.asarray(image, dtype=np.uint8)
