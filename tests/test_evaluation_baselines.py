"""Evaluation room, baselines: pixel downsampling, logistic regression with C chosen on validation."""

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from xray_dit.evaluation import baselines

CLASSES = ("bright", "never")


def _images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """16x16 noise images; class "bright" brightens one 2x2 block (one pixel at 8x8), "never" has no
    positives."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((count, 2), np.float32)
    labels[:, 0] = rng.random(count) < 0.4
    images = rng.normal(0.0, 1.0, (count, 16, 16, 1)).astype(np.float32)
    images[labels[:, 0] == 1, 4:6, 10:12] += 1.5
    return images, labels


def _splits(shuffle_train_labels: bool = False):
    data = {split: _images(count, seed) for split, count, seed in (("train", 300, 0), ("validation", 100, 1),
                                                                   ("test", 200, 2))}
    pixels = {split: baselines.area_downsample(images, 8) for split, (images, _) in data.items()}
    labels = {split: labels for split, (_, labels) in data.items()}
    if shuffle_train_labels:
        labels["train"] = np.random.default_rng(3).permutation(labels["train"])
    masks = {split: np.ones_like(y) for split, y in labels.items()}
    return pixels, labels, masks


def test_area_downsample_averages_blocks_in_numpy_and_jax():
    images = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 1)
    expected = np.array([[2.5, 4.5, 10.5, 12.5], [18.5, 20.5, 26.5, 28.5]], np.float32)
    np.testing.assert_allclose(baselines.area_downsample(images, 2), expected)
    np.testing.assert_allclose(np.asarray(baselines.area_downsample(jnp.asarray(images[..., 0]), 2)), expected)
    assert baselines.area_downsample(images, 4).shape == (2, 16)
    with pytest.raises(ValueError, match="cannot be downsampled to 3x3"):
        baselines.area_downsample(images, 3)


def test_baseline_names_give_sizes_and_unknown_names_are_errors():
    assert baselines.pixel_sizes(("pixel_logreg_16", "pixel_logreg_32")) == {"pixel_logreg_16": 16,
                                                                             "pixel_logreg_32": 32}
    assert baselines.pixel_sizes(()) == {}
    for bad in ("pixel_logreg", "logreg_16", "pixel_logreg_0"):
        with pytest.raises(ValueError, match="pixel_logreg_<size>"):
            baselines.pixel_sizes((bad,))


def test_pixel_logreg_learns_a_visible_class_and_skips_one_without_positives():
    pixels, labels, masks = _splits()
    result = baselines.pixel_logreg(pixels, labels, masks, CLASSES)
    assert result["test_auc"]["bright"] > 0.85, result
    assert np.isnan(result["test_auc"]["never"]) and "never" not in result["C"]
    assert result["C"]["bright"] in baselines.C_GRID and result["train_images"] == 300
    assert result["test_auc_mean"] == result["test_auc"]["bright"]


def test_c_is_the_grid_value_with_the_best_validation_auc():
    pixels, labels, _ = _splits()
    y_train, y_val = labels["train"][:, 0], labels["validation"][:, 0]
    model, chosen, val_auc = baselines.fit_logreg(pixels["train"], y_train, pixels["validation"], y_val)
    for c in baselines.C_GRID:
        other, _, _ = baselines.fit_logreg(pixels["train"], y_train, pixels["validation"], y_val, c_grid=(c,))
        assert roc_auc_score(y_val, other.decision_function(pixels["validation"])) <= val_auc + 1e-12
    assert roc_auc_score(y_val, model.decision_function(pixels["validation"])) == pytest.approx(val_auc)
    # Validation without positives cannot rank the grid: the default C, and no validation AUC.
    _, chosen, val_auc = baselines.fit_logreg(pixels["train"], y_train, pixels["validation"], np.zeros_like(y_val))
    assert chosen == baselines.DEFAULT_C and np.isnan(val_auc)


def test_shuffled_training_labels_bring_the_baseline_to_chance():
    honest = baselines.pixel_logreg(*_splits(), CLASSES)["test_auc"]["bright"]
    broken = baselines.pixel_logreg(*_splits(shuffle_train_labels=True), CLASSES)["test_auc"]["bright"]
    # Random labels leave weights spread over all 64 pixels, little of them on the informative one.
    assert honest > 0.85 and abs(broken - 0.5) < 0.2, (honest, broken)
