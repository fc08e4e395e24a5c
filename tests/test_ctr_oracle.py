"""The CTR oracle: reads the phantom's true cardiothoracic ratio back from pixels alone."""

import math

import numpy as np
import pytest

from xray_dit.data import phantom
from xray_dit.data.phantom import anatomy
from xray_dit.evaluation import ctr_oracle


def _oracle_hits(cohort, size: int) -> tuple[float, np.ndarray]:
    measured = np.array([ctr_oracle.measure_ctr(phantom.render(image, size)) for image in cohort])
    truth = np.array([image.ctr for image in cohort])
    return float(np.mean(np.abs(measured - truth) <= 0.03)), measured


def test_oracle_within_003_on_95_percent_at_64px():
    cohort = phantom.make_cohort(240, seed=21)
    hits, measured = _oracle_hits(cohort, 64)
    assert hits >= 0.95, f"only {hits:.1%} of 240 images within 0.03"
    assert np.isfinite(measured).mean() >= 0.98


@pytest.mark.parametrize("size, count", [(128, 40), (256, 12)])
def test_oracle_within_003_at_larger_sizes(size, count):
    hits, _ = _oracle_hits(phantom.make_cohort(count, seed=size), size)
    assert hits >= 0.95, f"only {hits:.1%} of {count} images within 0.03 at {size} px"


def test_oracle_holds_up_under_strong_pose_and_exposure_jitter():
    spec = phantom.PhantomSpec(pose_jitter=2.0, exposure_jitter=0.25, cardiomegaly_prevalence=0.5)
    hits, _ = _oracle_hits(phantom.make_cohort(60, seed=3, spec=spec), 64)
    assert hits >= 0.9


def test_oracle_reads_every_pixel_format_alike():
    image = phantom.make_cohort(3, seed=6)[2]
    pixels = phantom.render(image, 64)
    reference = ctr_oracle.measure_ctr(pixels)
    assert abs(reference - image.ctr) <= 0.03
    unit, symmetric = pixels.astype(np.float32) / 255, pixels.astype(np.float64) / 127.5 - 1
    for variant in (pixels[..., None], unit, symmetric):
        assert ctr_oracle.measure_ctr(variant) == pytest.approx(reference, abs=1e-4)


def test_oracle_is_nan_without_a_thorax():
    rng = np.random.default_rng(0)
    for blank in (np.zeros((64, 64), np.uint8), np.full((64, 64), 255, np.uint8), np.full((128, 128), 0.5),
                  rng.integers(0, 256, (64, 64)).astype(np.uint8), rng.uniform(-1, 1, (128, 128)),
                  np.zeros((8, 8), np.uint8)):
        assert math.isnan(ctr_oracle.measure_ctr(blank))


def test_oracle_refuses_colour_images():
    with pytest.raises(ValueError, match="grayscale"):
        ctr_oracle.measure_ctr(np.zeros((64, 64, 3), np.uint8))


def test_oracle_assumes_the_lung_the_phantom_leaves_beside_the_heart():
    assert ctr_oracle.LUNG_BESIDE_HEART == anatomy.LUNG_BESIDE_HEART
