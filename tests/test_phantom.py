"""The procedural chest-radiograph phantom: cohort structure, labels, rendering."""

import collections
import dataclasses
import math
import time

import numpy as np
import pytest
from PIL import Image

from xray_dit.data import phantom
from xray_dit.evaluation import ctr_oracle

CARDIOMEGALY, EFFUSION, NODULE, NO_FINDING = range(4)


@pytest.fixture(scope="module")
def large_cohort():
    return phantom.make_cohort(10_000, seed=11)


def _to_pixel(image: phantom.PhantomImage, x: float, y: float, size: int) -> tuple[int, int]:
    """(row, column) of the anatomy point (x, y) in `image` rendered at `size` (the pose applied)."""
    angle = math.radians(image.rotation_deg)
    u = (math.cos(angle) * x - math.sin(angle) * y) * image.scale + image.shift_x
    v = (math.sin(angle) * x + math.cos(angle) * y) * image.scale + image.shift_y
    return round((v + 1) / 2 * size - 0.5), round((u + 1) / 2 * size - 0.5)


def _patch_mean(pixels: np.ndarray, row: int, column: int) -> float:
    return float(pixels[row - 1:row + 2, column - 1:column + 2].mean())


# ---------------------------------------------------------------------------------------------------------
# Cohort: determinism, patients, splits, labels
# ---------------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_cohort_and_bytes():
    first, second = phantom.make_cohort(40, seed=3), phantom.make_cohort(40, seed=3)
    assert first == second
    assert phantom.render(first[5], 64).tobytes() == phantom.render(second[5], 64).tobytes()
    other = phantom.make_cohort(40, seed=4)
    assert [image.ctr for image in other] != [image.ctr for image in first]
    # A bigger cohort with the same seed starts with the same patients.
    assert phantom.make_cohort(200, seed=3)[0].anatomy == first[0].anatomy


def test_render_is_uint8_of_the_requested_size():
    image = phantom.make_cohort(1, seed=0)[0]
    for size in (32, 64, 100):
        pixels = phantom.render(image, size)
        assert pixels.dtype == np.uint8 and pixels.shape == (size, size)


def test_patients_keep_their_anatomy_and_have_one_to_four_differing_images():
    cohort = phantom.make_cohort(600, seed=5)
    by_patient = collections.defaultdict(list)
    for image in cohort:
        by_patient[image.patient_id].append(image)
    assert len({image.image_id for image in cohort}) == len(cohort)
    counts = collections.Counter(len(images) for images in by_patient.values())
    assert set(counts) == {1, 2, 3, 4}
    assert counts[1] > counts[4]  # fewer images more likely
    several = [images for images in by_patient.values() if len(images) > 1]
    for images in several:
        assert len({image.anatomy for image in images}) == 1
        assert len({(image.ctr, image.sex, image.split, image.true_labels[NODULE]) for image in images}) == 1
        assert len({(image.rotation_deg, image.scale, image.render_seed) for image in images}) == len(images)
    pixels = [phantom.render(image, 64) for image in several[0]]
    assert not np.array_equal(pixels[0], pixels[1])


def test_max_images_per_patient_is_respected():
    cohort = phantom.make_cohort(300, seed=1, spec=phantom.PhantomSpec(max_images_per_patient=2))
    assert max(collections.Counter(image.patient_id for image in cohort).values()) == 2
    cohort = phantom.make_cohort(50, seed=1, spec=phantom.PhantomSpec(max_images_per_patient=1))
    assert len({image.patient_id for image in cohort}) == 50


@pytest.mark.parametrize("fractions", [(0.7, 0.1, 0.2), (0.5, 0.25, 0.25)])
def test_splits_are_disjoint_by_patient_and_near_the_fractions(fractions):
    cohort = phantom.make_cohort(4000, seed=2, spec=phantom.PhantomSpec(split_fractions=fractions))
    splits_of_patient = collections.defaultdict(set)
    for image in cohort:
        splits_of_patient[image.patient_id].add(image.split)
    assert all(len(splits) == 1 for splits in splits_of_patient.values())
    shares = collections.Counter(image.split for image in cohort)
    for split, fraction in zip(phantom.SPLITS, fractions):
        assert shares[split] / len(cohort) == pytest.approx(fraction, abs=0.03)


def test_tiny_cohort_still_fills_every_split():
    cohort = phantom.make_cohort(6, seed=0, spec=phantom.PhantomSpec(max_images_per_patient=1))
    assert {image.split for image in cohort} == set(phantom.SPLITS)


def test_true_labels_follow_the_anatomy(large_cohort):
    for image in large_cohort:
        assert len(image.labels) == len(image.true_labels) == len(phantom.LABELS)
        assert image.true_labels[CARDIOMEGALY] == int(image.ctr > 0.5)
        assert image.true_labels[EFFUSION] == int(image.effusion_left > 0 or image.effusion_right > 0)
        assert image.true_labels[NODULE] == int(image.anatomy.nodule_radius > 0)
        for labels in (image.labels, image.true_labels):
            assert labels[NO_FINDING] == int(not any(labels[:NO_FINDING]))
        assert image.sex in ("M", "F") and image.view in phantom.VIEWS and 18 <= image.age <= 95


def test_prevalence_matches_the_spec(large_cohort):
    truth = np.array([image.true_labels for image in large_cohort])
    spec = phantom.PhantomSpec()
    expected = (spec.cardiomegaly_prevalence, spec.effusion_prevalence, spec.nodule_prevalence)
    np.testing.assert_allclose(truth[:, :NO_FINDING].mean(axis=0), expected, atol=0.015)
    rare = phantom.make_cohort(3000, seed=1, spec=phantom.PhantomSpec(cardiomegaly_prevalence=0.3))
    assert np.mean([image.true_labels[CARDIOMEGALY] for image in rare]) == pytest.approx(0.3, abs=0.04)


def test_label_noise_rate_is_observed(large_cohort):
    recorded = np.array([image.labels for image in large_cohort])[:, :NO_FINDING]
    truth = np.array([image.true_labels for image in large_cohort])[:, :NO_FINDING]
    positives = truth == 1
    missed = (recorded[positives] == 0).mean()
    assert missed == pytest.approx(phantom.PhantomSpec().label_noise, abs=0.03)
    # Negatives are flipped just enough to keep the recorded prevalence the true one.
    np.testing.assert_allclose(recorded.mean(axis=0), truth.mean(axis=0), atol=0.01)
    clean = phantom.make_cohort(500, seed=1, spec=phantom.PhantomSpec(label_noise=0.0))
    assert all(image.labels == image.true_labels for image in clean)


def test_ctr_overlap_knob():
    spec = phantom.PhantomSpec(ctr_std=0.0, cardiomegaly_prevalence=0.5)
    ctrs = {round(image.ctr, 6) for image in phantom.make_cohort(200, seed=0, spec=spec)}
    assert ctrs == {spec.ctr_normal_mean, spec.ctr_enlarged_mean}
    # Means nearer the 0.5 threshold: more patients near it, a harder task.
    near = [np.mean([abs(image.ctr - 0.5) < 0.03 for image in phantom.make_cohort(
        2000, seed=0, spec=phantom.PhantomSpec(ctr_normal_mean=0.5 - gap, ctr_enlarged_mean=0.5 + gap))])
        for gap in (0.08, 0.03)]
    assert near[0] + 0.15 < near[1]


def test_pose_exposure_and_noise_knobs():
    still = phantom.PhantomSpec(pose_jitter=0.0, exposure_jitter=0.0, noise_std=0.0)
    images = phantom.make_cohort(20, seed=0, spec=still)
    for image in images:
        assert (image.rotation_deg, image.shift_x, image.shift_y, image.scale) == (0.0, 0.0, 0.0, 1.0)
        assert (image.exposure_gamma, image.exposure_gain, image.noise_std) == (1.0, 1.0, 0.0)
    # Without noise the render seed changes nothing; with it, it changes the pixels.
    reseeded = dataclasses.replace(images[0], render_seed=images[0].render_seed + 1)
    assert np.array_equal(phantom.render(images[0], 64), phantom.render(reseeded, 64))
    noisy = dataclasses.replace(images[0], noise_std=0.03)
    assert not np.array_equal(phantom.render(noisy, 64), phantom.render(dataclasses.replace(
        noisy, render_seed=noisy.render_seed + 1), 64))


def test_findings_show_in_the_picture():
    cohort = phantom.make_cohort(3000, seed=7)
    with_nodule = next(image for image in cohort if image.true_labels[NODULE])
    clear = dataclasses.replace(with_nodule.anatomy, nodule_radius=0.0)
    without = dataclasses.replace(with_nodule, anatomy=clear)
    row, column = _to_pixel(with_nodule, with_nodule.anatomy.nodule_x, with_nodule.anatomy.nodule_y, 128)
    brighter = phantom.render(with_nodule, 128).astype(float) - phantom.render(without, 128)
    assert brighter[row, column] > 25  # a round opacity over the lung

    dry = next(image for image in cohort if not image.true_labels[EFFUSION])
    wet = dataclasses.replace(dry, effusion_right=0.25)
    anatomy = dry.anatomy
    base = anatomy.dome_right_y + anatomy.costophrenic_depth - 0.06
    row, column = _to_pixel(dry, -0.95 * anatomy.thorax_half_width, base, 128)
    # The costophrenic angle fills with fluid: blunted, bright.
    wet_mean = _patch_mean(phantom.render(wet, 128), row, column)
    assert wet_mean > _patch_mean(phantom.render(dry, 128), row, column) + 30


def test_spec_and_inputs_are_checked():
    for bad in (dict(cardiomegaly_prevalence=1.5), dict(label_noise=1.0), dict(ctr_normal_mean=0.2),
                dict(split_fractions=(0.7, 0.2, 0.2)), dict(pose_jitter=3.0), dict(noise_std=-0.1),
                dict(max_images_per_patient=0)):
        with pytest.raises(ValueError, match="PhantomSpec"):
            phantom.PhantomSpec(**bad)
    with pytest.raises(ValueError, match="num_images"):
        phantom.make_cohort(0)
    image = phantom.make_cohort(1)[0]
    with pytest.raises(ValueError, match="size"):
        phantom.render(image, 8)
    with pytest.raises(ValueError, match="PhantomImage"):
        phantom.render("00000000_000", 64)


# ---------------------------------------------------------------------------------------------------------
# Rendering: speed, intensities, pictures
# ---------------------------------------------------------------------------------------------------------


def test_render_speed():
    cohort = phantom.make_cohort(500, seed=9)
    start = time.perf_counter()
    for image in cohort:
        phantom.render(image, 64)
    elapsed = time.perf_counter() - start
    # 10,000 images then take well under two minutes, even on a shared 2-core machine.
    assert elapsed < 6.0, f"500 renders at 64 px took {elapsed:.1f} s"


def test_intensities_look_like_a_radiograph():
    cohort = phantom.make_cohort(60, seed=4)
    means, spreads = [], []
    for image in cohort:
        pixels = phantom.render(image, 64).astype(float)
        means.append(pixels.mean())
        spreads.append(pixels.std())
        anatomy = image.anatomy
        right_lung = (-0.6 * anatomy.thorax_half_width, anatomy.widest_y - 0.1)
        heart_middle = (anatomy.heart_center_x, anatomy.heart_center_y - 0.05)
        lung = _patch_mean(pixels, *_to_pixel(image, *right_lung, 64))
        heart = _patch_mean(pixels, *_to_pixel(image, *heart_middle, 64))
        background = pixels[:2, :2].mean()  # above the shoulders: air
        assert background < 40 < lung + 20 < heart - 40, (image.image_id, background, lung, heart)
    # The real NIH sample: mean 142, standard deviation 57 (of 255).
    assert 115 < np.mean(means) < 170 and 45 < np.mean(spreads) < 80


def _grid(tiles: list[np.ndarray], columns: int) -> np.ndarray:
    rows = [np.concatenate(tiles[i:i + columns], axis=1) for i in range(0, len(tiles), columns)]
    return np.concatenate(rows, axis=0)


def test_picture_of_patients_with_and_without_cardiomegaly(artifacts_dir):
    cohort = phantom.make_cohort(2000, seed=1)
    firsts = {}
    for image in cohort:
        firsts.setdefault(image.patient_id, image)
    normal = [image for image in firsts.values() if image.ctr < 0.45][:4]
    enlarged = [image for image in firsts.values() if image.ctr > 0.55][:4]
    assert len(normal) == len(enlarged) == 4
    tiles = {size: [phantom.render(image, size) for image in normal + enlarged] for size in (64, 256)}
    name = "top_normal_bottom_cardiomegaly.png"
    Image.fromarray(_grid(tiles[256], 4)).save(artifacts_dir / f"phantom_256_{name}")
    Image.fromarray(_grid(tiles[64], 4)).resize((1024, 512), Image.NEAREST).save(
        artifacts_dir / f"phantom_64_{name}")
    # The oracle sees which row is which.
    for image, pixels in zip(normal + enlarged, tiles[64]):
        assert (ctr_oracle.measure_ctr(pixels) > 0.5) == (image.ctr > 0.5)


def test_side_by_side_with_real_nih_images(nih_sample_dir, artifacts_dir):
    paths = sorted((nih_sample_dir / "images").glob("*.png"))[:40]
    real = np.stack([np.asarray(Image.open(path).convert("L")) for path in paths])
    size = real.shape[1]
    cohort = phantom.make_cohort(40, seed=2)
    fake = np.stack([phantom.render(image, size) for image in cohort])
    Image.fromarray(_grid(list(real[:4]) + list(fake[:4]), 4)).save(
        artifacts_dir / "top_nih_bottom_phantom.png")
    real_means, fake_means = real.reshape(len(real), -1).mean(1), fake.reshape(len(fake), -1).mean(1)
    real_spreads, fake_spreads = real.reshape(len(real), -1).std(1), fake.reshape(len(fake), -1).std(1)
    assert abs(fake_means.mean() - real_means.mean()) < 25
    assert abs(fake_spreads.mean() - real_spreads.mean()) < 20
    # Like a radiograph: dark air and lungs, bright bone and mediastinum, mid-grey in between.
    for pixels in fake:
        low, middle, high = np.percentile(pixels, [2, 50, 98])
        assert low < 80 and 90 < middle < 210 and high > 160 and high - low > 120
