"""Evaluation room, figures: every plot writes a readable PNG of plausible size (kept in test_artifacts/)."""

import numpy as np
import pytest
from PIL import Image

from xray_dit.evaluation import classification as cls
from xray_dit.evaluation import plots


def _check_png(path, min_width=300, min_height=200):
    assert path.exists() and path.stat().st_size > 2000
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width >= min_width and height >= min_height, image.size
    assert width <= 4000 and height <= 4000, image.size
    return width, height


def _phantom_like_images(rng, n, size=32):
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    images = []
    for _ in range(n):
        heart = ((x - 0.1) ** 2 / rng.uniform(0.1, 0.25) + (y - 0.2) ** 2 / 0.15) < 1
        lungs = ((np.abs(x) - 0.45) ** 2 / 0.08 + y ** 2 / 0.5) < 1
        images.append(np.clip(0.8 - 0.5 * lungs + 0.4 * heart + 0.05 * rng.normal(size=(size, size)), 0, 1))
    return np.stack(images)


@pytest.fixture
def drawn_figures(monkeypatch):
    """The matplotlib figures the plot functions save, kept for their data (they are saved as usual)."""
    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    return figures


def _grey_levels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L")).ravel()


def test_roc_curves_per_class(artifacts_dir, drawn_figures):
    rng = np.random.default_rng(0)
    names = ["Atelectasis", "Cardiomegaly", "Effusion", "Pneumothorax"]
    labels = rng.integers(0, 2, (200, 4))
    probs = rng.random((200, 4)) + np.array([0.2, 0.5, 0.8, 1.2]) * labels
    curves = cls.roc_curves(labels, probs, names)
    path = plots.plot_roc_curves(curves, artifacts_dir / "roc.png", title="Per-class ROC (test set)")
    _check_png(path)
    # The figure shows each class's ROC as computed: false positive rate across, true positive rate up.
    (ax,) = drawn_figures[-1].axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"chance (AUC 0.500)"} | {f"{n} (AUC {curves[n].auc:.3f})" for n in names}
    for name in names:
        line = lines[f"{name} (AUC {curves[name].auc:.3f})"]
        np.testing.assert_array_equal(line.get_xdata(), curves[name].fpr)
        np.testing.assert_array_equal(line.get_ydata(), curves[name].tpr)
        assert curves[name].auc == pytest.approx(np.trapezoid(curves[name].tpr, curves[name].fpr))
    assert ax.get_xlim() == (0, 1) and ax.get_ylim()[0] == 0
    with pytest.raises(ValueError, match="at least one curve"):
        plots.plot_roc_curves({}, artifacts_dir / "empty.png")


def test_confusion_matrix(artifacts_dir, drawn_figures):
    _check_png(plots.plot_confusion_matrix(np.array([[50, 7], [3, 40]]), ["no finding", "effusion"],
                                           artifacts_dir / "confusion.png", title="Effusion @ Youden threshold"))
    ax = drawn_figures[-1].axes[0]
    np.testing.assert_allclose(ax.get_images()[0].get_array(), [[50 / 57, 7 / 57], [3 / 43, 40 / 43]])
    assert [t.get_text() for t in ax.texts] == ["50\n(87.7%)", "7\n(12.3%)", "3\n(7.0%)", "40\n(93.0%)"]
    with pytest.raises(ValueError, match="square"):
        plots.plot_confusion_matrix(np.zeros((2, 3)), ["a", "b"], artifacts_dir / "bad.png")


def test_auc_with_ci(artifacts_dir, drawn_figures):
    arms = {"real only": (0.81, 0.78, 0.84), "real + oversampled": (0.82, 0.79, 0.85),
            "real + synthetic": cls.BootstrapCI(0.85, 0.82, 0.88, None)}
    _check_png(plots.plot_auc_with_ci(arms, artifacts_dir / "auc_ci.png", title="Effusion AUC, 95% CI"))
    ax = drawn_figures[-1].axes[0]
    rows = {label.get_text(): y for label, y in zip(ax.get_yticklabels(), ax.get_yticks())}
    points = dict(zip(ax.get_lines()[0].get_ydata(), ax.get_lines()[0].get_xdata()))
    assert {name: points[rows[name]] for name in arms} == pytest.approx({n: v[0] for n, v in arms.items()})
    assert [t.get_text() for t in ax.texts] == ["0.810 [0.780, 0.840]", "0.820 [0.790, 0.850]",
                                                "0.850 [0.820, 0.880]"]
    with pytest.raises(ValueError, match="lower <= auc <= upper"):
        plots.plot_auc_with_ci({"bad": (0.9, 0.95, 0.99)}, artifacts_dir / "bad.png")


def test_forest_of_differences_shows_zero_and_difference_curves(artifacts_dir):
    differences = {"real + 200 synthetic": (0.02, 0.005, 0.04), "real + 200 oversampled real": (0.01, -0.01, 0.03)}
    _check_png(plots.plot_auc_with_ci(differences, artifacts_dir / "forest.png", xlabel="AUC difference",
                                      reference=0.0))
    series = {"synthetic": [(100, 0.01, -0.02, 0.04), (400, 0.03, 0.0, 0.06), (200, 0.02, -0.01, 0.05)],
              "oversampled real": [(100, 0.0, -0.03, 0.03), (200, 0.01, -0.02, 0.04)]}
    _check_png(plots.plot_difference_curves(series, artifacts_dir / "dose.png", xlabel="images added",
                                            xtick_labels={100: "100", 200: "200", 400: "400"}))
    with pytest.raises(ValueError, match="lower <= estimate <= upper"):
        plots.plot_difference_curves({"bad": [(1, 0.5, 0.6, 0.7)]}, artifacts_dir / "bad.png", xlabel="x")
    with pytest.raises(ValueError, match="at least one series"):
        plots.plot_difference_curves({"empty": []}, artifacts_dir / "bad.png", xlabel="x")


def test_distance_histograms_ctr_and_training_curves(artifacts_dir):
    rng = np.random.default_rng(1)
    _check_png(plots.plot_distance_histograms(
        {"held-out → train": rng.gamma(5, 0.02, 500), "synthetic → train": rng.gamma(4, 0.02, 500)},
        threshold=0.03, path=artifacts_dir / "distances.png", xlabel="cosine distance"))
    _check_png(plots.plot_ctr_distributions(rng.normal(0.45, 0.05, 300), rng.normal(0.47, 0.06, 300),
                                            artifacts_dir / "ctr.png"))
    steps = np.arange(0, 1000, 10)
    _check_png(plots.plot_training_curves({"train": (steps, 1 / (1 + steps / 100)),
                                           "validation": (steps, 1.1 / (1 + steps / 120))},
                                          artifacts_dir / "curves.png", log_y=True))


def test_image_grid_from_float_uint8_and_nhwc(artifacts_dir):
    rng = np.random.default_rng(2)
    images = _phantom_like_images(rng, 10)
    width, height = _check_png(plots.image_grid(images, artifacts_dir / "grid.png", nrow=5,
                                                titles=[f"#{i}" for i in range(10)], title="synthetic"))
    assert width > height  # 5 per row, 2 rows
    uint8 = (images * 255).astype(np.uint8)[..., None]
    _check_png(plots.image_grid(uint8, artifacts_dir / "grid_uint8.png", nrow=10), min_height=100)
    _check_png(plots.image_grid(images * 2 - 1, artifacts_dir / "grid_signed.png", nrow=4))
    with pytest.raises(ValueError, match="titles"):
        plots.image_grid(images, artifacts_dir / "bad.png", nrow=5, titles=["one"])


@pytest.mark.parametrize("kind", ["float [0, 1]", "float [-1, 1]", "uint8", "uint8 NHWC"])
def test_image_grid_maps_each_value_range_onto_black_to_white(artifacts_dir, kind):
    """Three bands at the low end, middle and high end of the image's range: black, mid-grey, white."""
    bands = np.repeat(np.array([0.0, 0.5, 1.0]), 16)[None, :].repeat(48, axis=0)[None]   # (1, 48, 48)
    images = {"float [0, 1]": bands, "float [-1, 1]": 2 * bands - 1,
              "uint8": np.round(bands * 255).astype(np.uint8),
              "uint8 NHWC": np.round(bands * 255).astype(np.uint8)[..., None]}[kind]
    grey = _grey_levels(plots.image_grid(images, artifacts_dir / f"bands_{kind.replace(' ', '_')}.png", nrow=1))
    # Each band covers about a third of the drawn image; the figure's border is white.
    band = grey.size * 0.15
    assert (grey <= 10).sum() > band, kind
    assert (np.abs(grey.astype(int) - 128) <= 10).sum() > band, kind
    assert (grey >= 245).sum() > band, kind


def test_nn_pairs(artifacts_dir):
    rng = np.random.default_rng(3)
    synthetic, train = _phantom_like_images(rng, 4), _phantom_like_images(rng, 4)
    _check_png(plots.plot_nn_pairs(synthetic, train, np.array([0.01, 0.02, 0.05, 0.1]),
                                   artifacts_dir / "nn_pairs.png"))
    with pytest.raises(ValueError, match="as many neighbours"):
        plots.plot_nn_pairs(synthetic, train[:3], np.zeros(4), artifacts_dir / "bad.png")


def test_save_grid_keeps_every_pixel(tmp_path):
    images = plots.to_uint8(np.stack([np.full((4, 3, 1), -1.0), np.full((4, 3, 1), 1.0), np.zeros((4, 3, 1))]))
    assert images.dtype == np.uint8 and images.shape == (3, 4, 3)
    assert [int(image[0, 0]) for image in images] == [0, 255, 128]
    path = plots.save_grid(images, tmp_path / "grid" / "samples.png", ncol=2, pad=1)
    with Image.open(path) as saved:
        canvas = np.asarray(saved)
    assert canvas.shape == (2 * (4 + 1) + 1, 2 * (3 + 1) + 1)
    np.testing.assert_array_equal(canvas[1:5, 1:4], images[0])
    np.testing.assert_array_equal(canvas[1:5, 5:8], images[1])
    np.testing.assert_array_equal(canvas[6:10, 1:4], images[2])
    assert (canvas[6:10, 5:8] == 255).all()   # the unused cell stays background


def test_to_uint8_maps_minus_one_to_black_and_one_to_white():
    images = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, -3.0, 2.0], np.float32).reshape(1, 1, 7, 1)
    assert plots.to_uint8(images).tolist() == [[[0, 64, 128, 191, 255, 0, 255]]]
    assert plots.to_uint8(images[..., 0]).dtype == np.uint8
