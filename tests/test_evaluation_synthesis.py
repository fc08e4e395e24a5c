"""Evaluation room, synthesis quality: Fréchet distance, precision/recall/density/coverage, (MS-)SSIM."""

import numpy as np
import pytest

from xray_dit.evaluation import synthesis as syn


# ---- Fréchet distance ------------------------------------------------------------------------------------
def test_frechet_distance_from_stats_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    sd_a, sd_b = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((sd_a - sd_b) ** 2)
    got = syn.frechet_distance_from_stats(mu_a, np.diag(sd_a ** 2), mu_b, np.diag(sd_b ** 2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_samples_is_zero_for_identical_sets_and_near_the_closed_form():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4000, 4)) * [1.0, 2.0, 0.5, 1.0]
    b = rng.normal(size=(4000, 4)) * [1.5, 1.0, 0.5, 1.0] + [1.0, 0.0, 0.0, -1.0]
    assert abs(syn.frechet_distance(a, a)) < 1e-8
    expected = 1.0 + 1.0 + 0.25 + 1.0  # |Δμ|² = 2, Σ(σa - σb)² = 0.25 + 1
    assert syn.frechet_distance(a, b) == pytest.approx(expected, rel=0.1)


def test_frechet_distance_survives_singular_covariances():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(10, 40)), rng.normal(size=(10, 40))  # fewer samples than dimensions
    value = syn.frechet_distance(a, b)
    assert np.isfinite(value) and value > 0
    with pytest.raises(ValueError, match="feature dimensions differ"):
        syn.frechet_distance(a, b[:, :5])


# ---- KID and equal-n comparisons --------------------------------------------------------------------------
def brute_force_mmd2(a, b):
    def k(x, y):
        return (sum(x[d] * y[d] for d in range(len(x))) / len(x) + 1.0) ** 3
    m, n = len(a), len(b)
    within_a = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    within_b = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    cross = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return within_a + within_b - 2 * cross


def test_kid_is_the_unbiased_mmd2_of_the_cubic_kernel():
    rng = np.random.default_rng(10)
    a, b = rng.normal(size=(7, 3)), rng.normal(0.5, 1.0, size=(9, 3))
    assert syn.mmd2_unbiased(a, b) == pytest.approx(brute_force_mmd2(a, b), rel=1e-10)
    whole = syn.kid(a, b, subset_size=7, n_subsets=1)   # a subset of all of a is a permutation of it
    assert whole.subset_size == 7 and whole.n_subsets == 1
    subsets = syn.kid(a, b, subset_size=5, n_subsets=4, seed=3)
    draw = np.random.default_rng(3)
    expected = [brute_force_mmd2(a[draw.choice(7, 5, replace=False)], b[draw.choice(9, 5, replace=False)])
                for _ in range(4)]
    assert subsets.value == pytest.approx(np.mean(expected), rel=1e-10)
    assert subsets.sd == pytest.approx(np.std(expected, ddof=1), rel=1e-10)
    assert subsets.standard_error == pytest.approx(subsets.sd / 2)


def test_kid_expectation_is_zero_for_one_distribution_where_the_biased_estimate_is_not():
    rng = np.random.default_rng(11)
    unbiased, biased = [], []
    for _ in range(300):
        a, b = rng.normal(size=(15, 4)), rng.normal(size=(15, 4))
        unbiased.append(syn.kid(a, b, subset_size=15, n_subsets=1).value)
        biased.append(syn.polynomial_kernel(a, a).mean() + syn.polynomial_kernel(b, b).mean()
                      - 2 * syn.polynomial_kernel(a, b).mean())
    standard_error = np.std(unbiased) / np.sqrt(300)
    assert abs(np.mean(unbiased)) < 3 * standard_error
    assert np.mean(biased) > 10 * np.std(biased) / np.sqrt(300)   # the V-statistic's O(1/n) bias, visible
    shifted = syn.kid(rng.normal(size=(200, 4)), rng.normal(1.0, 1.0, size=(200, 4)), subset_size=100, n_subsets=20)
    assert shifted.value > 20 * shifted.standard_error


def test_equal_n_draws_every_set_and_the_shared_reference_at_one_size():
    rng = np.random.default_rng(12)
    reference, big, small = rng.normal(size=(50, 2)), rng.normal(size=(40, 2)), rng.normal(size=(12, 2))
    calls = []

    def record(ref, x):
        calls.append((ref, x))
        return float(ref.sum() - x.sum())

    result = syn.equal_n(record, reference, {"big": big, "small": small}, repeats=5, seed=1)
    assert all(r.n == 12 and r.repeats == 5 for r in result.values())
    for i in range(0, 10, 2):
        (ref_big, x_big), (ref_small, x_small) = calls[i], calls[i + 1]
        assert ref_big is ref_small and len(ref_big) == len(x_big) == len(x_small) == 12
        for subset, pool in ((ref_big, reference), (x_big, big), (x_small, small)):
            rows = [np.flatnonzero((pool == row).all(axis=1)) for row in subset]
            assert all(len(r) == 1 for r in rows) and len({int(r[0]) for r in rows}) == 12  # no repeats
    big_values = [record_ref.sum() - x.sum() for record_ref, x in calls[0::2]]
    assert result["big"] == (pytest.approx(np.mean(big_values)), pytest.approx(np.std(big_values, ddof=1)), 12, 5)
    with pytest.raises(ValueError, match="too small"):
        syn.equal_n(record, reference, {"small": small}, n=20)


def test_equal_n_removes_the_sample_size_bias_of_the_frechet_distance():
    rng = np.random.default_rng(13)
    reference, many, few = rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8)), rng.normal(size=(40, 8))
    shifted = rng.normal(0.5, 1.0, size=(2000, 8))
    raw_many, raw_few = syn.frechet_distance(reference, many), syn.frechet_distance(reference, few)
    assert raw_few > 10 * raw_many   # the same distribution looks far worse at n = 40
    rows = syn.equal_n(syn.frechet_distance, reference, {"many": many, "few": few, "shifted": shifted}, n=40,
                       repeats=30, seed=0)
    # At one n the two samples of the reference distribution agree within their subsampling spread, and a
    # set from a shifted distribution (true distance 8 · 0.5² = 2) stands out beyond it.
    assert abs(rows["many"].mean - rows["few"].mean) < max(rows["many"].sd, rows["few"].sd)
    assert rows["shifted"].mean > rows["many"].mean + 2 * rows["many"].sd
    kid_rows = syn.equal_n(lambda a, b: syn.kid(a, b, n_subsets=1).value, reference, {"many": many, "few": few},
                           n=40, repeats=30)
    assert abs(kid_rows["few"].mean) < kid_rows["few"].sd and abs(kid_rows["many"].mean) < kid_rows["many"].sd


def test_reference_rows_are_added_under_reserved_names():
    rows = syn.with_reference_rows({"accepted": np.zeros((3, 2))}, np.ones((4, 2)), np.full((5, 2), 2.0))
    assert list(rows) == ["accepted", syn.AS_GOOD_AS_REAL, syn.WRONG_CLASS]
    assert rows[syn.WRONG_CLASS].shape == (5, 2)
    with pytest.raises(ValueError, match="reserved"):
        syn.with_reference_rows({syn.WRONG_CLASS: np.zeros((3, 2))}, np.ones((4, 2)), np.ones((4, 2)))


# ---- precision / recall / density / coverage ------------------------------------------------------------
def test_prdc_identical_sets():
    points = np.random.default_rng(3).normal(size=(300, 3))
    result = syn.precision_recall_density_coverage(points, points.copy(), k=5, chunk_size=64)
    assert (result.precision, result.recall, result.coverage) == (1.0, 1.0, 1.0)
    # Each point lies in its own ball and in the k balls its k-th neighbour radius spans: (k + 1) / k.
    assert result.density == pytest.approx(6 / 5)


def test_prdc_same_distribution_is_near_one_and_far_apart_sets_are_zero():
    rng = np.random.default_rng(4)
    real, fake = rng.normal(size=(1500, 3)), rng.normal(size=(1500, 3))
    same = syn.precision_recall_density_coverage(real, fake, k=5)
    assert same.precision > 0.95 and same.recall > 0.95
    assert 0.9 < same.density < 1.1
    assert same.coverage > 0.93  # expected ≈ 1 - 2^-5
    far = syn.precision_recall_density_coverage(real, fake + 100.0, k=5)
    assert far == (0.0, 0.0, 0.0, 0.0)


def test_prdc_mode_collapse_keeps_fidelity_but_loses_diversity():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(1000, 2))
    collapsed = 0.2 * rng.normal(size=(1000, 2))  # all fakes near the centre of the real data
    result = syn.precision_recall_density_coverage(real, collapsed, k=5)
    assert result.precision > 0.95
    assert result.recall < 0.3 and result.coverage < 0.3


# ---- SSIM, MS-SSIM ---------------------------------------------------------------------------------------
def _smooth_image(rng, size=64):
    y, x = np.mgrid[0:size, 0:size] / size
    return np.clip(0.5 + 0.3 * np.sin(6 * x + rng.uniform(0, 3)) * np.cos(4 * y) + 0.05 * rng.normal(size=(size, size)),
                   0, 1)


def test_ssim_is_one_for_equal_images_symmetric_and_decreasing_with_noise():
    rng = np.random.default_rng(6)
    image = _smooth_image(rng)
    assert syn.ssim(image, image) == pytest.approx(1.0)
    assert syn.ms_ssim(image, image) == pytest.approx(1.0)
    noisy = [np.clip(image + s * rng.normal(size=image.shape), 0, 1) for s in (0.02, 0.1, 0.3)]
    for metric in (syn.ssim, syn.ms_ssim):
        values = [metric(image, n) for n in noisy]
        assert values[0] > values[1] > values[2], (metric.__name__, values)
        assert metric(image, noisy[1]) == pytest.approx(metric(noisy[1], image), rel=1e-12)


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = np.full((16, 16), 0.2), np.full((16, 16), 0.6)
    c1 = 0.01 ** 2
    luminance = (2 * 0.2 * 0.6 + c1) / (0.2 ** 2 + 0.6 ** 2 + c1)
    assert syn.ssim(a, b) == pytest.approx(luminance)
    # No structure, so every cs is 1 and only the coarsest scale's luminance counts, with its weight.
    a64, b64 = np.full((64, 64), 0.2), np.full((64, 64), 0.6)
    weights = syn.MS_SSIM_WEIGHTS[:3] / syn.MS_SSIM_WEIGHTS[:3].sum()
    assert syn.ms_ssim(a64, b64) == pytest.approx(luminance ** weights[-1])


def test_ssim_value_ranges_batches_and_channel_axis_agree():
    rng = np.random.default_rng(7)
    a, b = _smooth_image(rng), _smooth_image(rng)
    reference = syn.ms_ssim(a, b)
    assert syn.ms_ssim(2 * a - 1, 2 * b - 1, value_range=(-1, 1)) == pytest.approx(reference)
    a8, b8 = np.round(a * 255).astype(np.uint8), np.round(b * 255).astype(np.uint8)
    assert syn.ms_ssim(a8, b8) == pytest.approx(syn.ms_ssim(a8 / 255.0, b8 / 255.0))
    batch = syn.ms_ssim(np.stack([a, a])[..., None], np.stack([b, a])[..., None])  # NHWC, C = 1
    np.testing.assert_allclose(batch, [reference, 1.0])
    with pytest.raises(ValueError, match="value_range"):
        syn.ssim(2 * a - 1, 2 * b - 1)


def test_number_of_ms_ssim_scales_adapts_to_small_images():
    assert syn.num_ms_ssim_scales(256, 256) == 5
    assert syn.num_ms_ssim_scales(64, 64) == 3
    assert syn.num_ms_ssim_scales(64, 32) == 2
    assert syn.num_ms_ssim_scales(8, 8) == 1
    tiny = np.random.default_rng(8).random((2, 8, 8))
    assert syn.ms_ssim(tiny[0], tiny[1]) == pytest.approx(max(syn.ssim(tiny[0], tiny[1]), 0.0))


def test_ms_ssim_diversity_orders_collapsed_and_diverse_sets():
    rng = np.random.default_rng(9)
    base = _smooth_image(rng, 32)
    collapsed = np.stack([np.clip(base + 0.01 * rng.normal(size=base.shape), 0, 1) for _ in range(12)])
    diverse = np.stack([_smooth_image(rng, 32) for _ in range(12)])
    assert syn.ms_ssim_diversity(np.stack([base] * 4), num_pairs=10) == pytest.approx(0.0, abs=1e-12)
    low = syn.ms_ssim_diversity(collapsed, num_pairs=40, seed=1, chunk_size=16)
    high = syn.ms_ssim_diversity(diverse, num_pairs=40, seed=1)
    assert 0 <= low < 0.1 and high > low + 0.2
    with pytest.raises(ValueError, match="N >= 2"):
        syn.ms_ssim_diversity(base[None], num_pairs=3)


# ---- values against independent computations --------------------------------------------------------------
def test_frechet_distance_with_correlated_features_matches_an_eigenvalue_computation():
    # tr((Σa Σb)^½) = Σ √λ over the eigenvalues λ of Σa Σb (real and positive for SPD Σa, Σb): no matrix
    # square root involved, unlike the implementation.
    rng = np.random.default_rng(10)
    d = 6
    mixing_a, mixing_b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    cov_a, cov_b = mixing_a @ mixing_a.T + 0.5 * np.eye(d), mixing_b @ mixing_b.T + 0.5 * np.eye(d)
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)

    def by_eigenvalues(mu_a, cov_a, mu_b, cov_b):
        root_trace = np.sum(np.sqrt(np.linalg.eigvals(cov_a @ cov_b).real))
        return np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * root_trace

    assert syn.frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) == pytest.approx(
        by_eigenvalues(mu_a, cov_a, mu_b, cov_b), rel=1e-9)
    # From samples: the Gaussians fitted with the unbiased sample covariance.
    a = rng.normal(size=(300, d)) @ mixing_a.T + mu_a
    b = rng.normal(size=(200, d)) @ mixing_b.T + mu_b
    want = by_eigenvalues(a.mean(0), np.cov(a.T), b.mean(0), np.cov(b.T))
    assert syn.frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    assert want > 1.0   # far from the diagonal case: the off-diagonal terms matter


_REFERENCE_RADIUS, _REFERENCE_SIGMA = 5, 1.5   # Wang et al. (2004): 11-tap Gaussian window, σ = 1.5


def _reference_blur(image: np.ndarray) -> np.ndarray:
    """Separable Gaussian window with mirrored borders (…c b a | a b c…), written out with np.convolve."""
    x = np.arange(-_REFERENCE_RADIUS, _REFERENCE_RADIUS + 1)
    taps = np.exp(-x ** 2 / (2 * _REFERENCE_SIGMA ** 2))
    taps /= taps.sum()
    padded = np.pad(image, _REFERENCE_RADIUS, mode="symmetric")
    rows = np.stack([np.convolve(row, taps, mode="valid") for row in padded])
    return np.stack([np.convolve(column, taps, mode="valid") for column in rows.T]).T


def _reference_ssim_terms(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean SSIM map, mean contrast-structure map) from the formula, data range 1."""
    c1, c2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2
    mu_a, mu_b = _reference_blur(a), _reference_blur(b)
    var_a = _reference_blur(a * a) - mu_a ** 2
    var_b = _reference_blur(b * b) - mu_b ** 2
    cov = _reference_blur(a * b) - mu_a * mu_b
    cs = (2 * cov + c2) / (var_a + var_b + c2)
    luminance = (2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1)
    return float(np.mean(luminance * cs)), float(np.mean(cs))


def _reference_ms_ssim(a: np.ndarray, b: np.ndarray, scales: int) -> float:
    """Wang, Simoncelli & Bovik (2003): Π_{j<S} cs_j^{w_j} · ssim_S^{w_S}, 2x2 averages between scales."""
    weights = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333])[:scales]
    weights = weights / weights.sum()
    value = 1.0
    for j in range(scales):
        ssim_mean, cs_mean = _reference_ssim_terms(a, b)
        value *= (ssim_mean if j == scales - 1 else cs_mean) ** weights[j]
        a = 0.25 * (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2])
        b = 0.25 * (b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2])
    return value


def _structured_pair(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two deterministic images with edges and texture at several scales (no random numbers)."""
    y, x = np.mgrid[0:size, 0:size] / size
    disc = (x - 0.5) ** 2 + (y - 0.45) ** 2 < 0.06
    a = 0.5 + 0.3 * np.sin(2 * np.pi * 3 * x) * np.cos(2 * np.pi * 2 * y) + 0.15 * disc
    b = 0.45 + 0.35 * np.sin(2 * np.pi * 3 * x + 0.4) * np.cos(2 * np.pi * 2 * y) + 0.1 * (np.abs(x - 0.3) < 0.1)
    b += 0.05 * np.sin(2 * np.pi * 11 * x) * np.sin(2 * np.pi * 7 * y)
    return np.clip(a, 0, 1), np.clip(b, 0, 1)


# The mean of scikit-image 0.26's full SSIM map for `_structured_pair(64)`:
# structural_similarity(a, b, data_range=1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
# full=True)[1].mean() (its own mean crops the borders; ours keeps every pixel).
SKIMAGE_SSIM_MAP_MEAN_64 = 0.7949142346863312


def test_ssim_and_ms_ssim_equal_the_formula_on_structured_images():
    for size, scales in ((64, 3), (256, 5), (40, 2)):
        a, b = _structured_pair(size)
        ssim_mean, _ = _reference_ssim_terms(a, b)
        assert 0.1 < ssim_mean < 0.9   # a pair that is neither alike nor unrelated
        assert syn.num_ms_ssim_scales(size, size) == scales
        assert syn.ssim(a, b) == pytest.approx(ssim_mean, rel=1e-10), size
        assert syn.ms_ssim(a, b) == pytest.approx(_reference_ms_ssim(a, b, scales), rel=1e-10), size
    assert syn.ssim(*_structured_pair(64)) == pytest.approx(SKIMAGE_SSIM_MAP_MEAN_64, rel=1e-9)


def test_frechet_distance_of_few_samples_with_dead_features_is_finite_real_and_exact():
    """ReLU features of 8 images in 128 dimensions (a tiny ResNet's pooled features at the micro study's equal n),
    a third of them always 0: singular covariances, where a general matrix square root comes out with a large
    imaginary part. The value is still the eigenvalue formula's, and a set against itself is 0."""
    rng = np.random.default_rng(20)
    a, b = np.maximum(rng.normal(size=(8, 128)), 0) * 0.3, np.maximum(rng.normal(0.3, 1.0, size=(8, 128)), 0) * 0.3
    a[:, :42] = b[:, :42] = 0.0
    cov_a, cov_b = np.cov(a.T), np.cov(b.T)
    root_trace = np.sum(np.sqrt(np.clip(np.linalg.eigvals(cov_a @ cov_b).real, 0, None)))
    want = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * root_trace
    got = syn.frechet_distance(a, b)
    assert isinstance(got, float) and got == pytest.approx(want, rel=1e-6)
    assert abs(syn.frechet_distance(a, a)) < 1e-6 * np.trace(cov_a)   # sqrt of rounding-level eigenvalues
