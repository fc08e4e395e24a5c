"""Synthesis quality: Fréchet distance, KID, precision/recall/density/coverage, SSIM and MS-SSIM diversity.

Feature inputs are (N, D) arrays from any encoder; it should be one that no filter used, or the metrics
measure the filters' own criterion. The Fréchet distance depends strongly on N, so sets are compared only
at one N (`equal_n`), beside real-vs-real reference rows (`with_reference_rows`).
Image inputs are grayscale (..., H, W) arrays (a trailing channel axis of size 1, as in NHWC, is
accepted and dropped) with values in `value_range`: (0, 1) by default, pass (-1, 1) for images in the
diffusion model's range; uint8 images are read as 0..255. Images are mapped to [0, 1] before SSIM, so
both conventions give the same numbers.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import numpy as np
import scipy.ndimage
import scipy.spatial.distance
from sklearn.neighbors import NearestNeighbors


# ---- Fréchet distance ------------------------------------------------------------------------------------
def _features(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be (N, D) features, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def trace_sqrt_product(a: np.ndarray, b: np.ndarray) -> float:
    """tr((a b)^½) for symmetric positive semi-definite a, b. a b is similar to a^½ b a^½, which is symmetric
    PSD, so the trace is the sum of the square roots of that matrix's (real, non-negative) eigenvalues: no
    general matrix square root, whose result goes complex on the singular covariances of few samples."""
    w, v = np.linalg.eigh(a)
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root_a @ b @ root_a
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum())


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """Fréchet distance between N(mu_a, cov_a) and N(mu_b, cov_b):
    |mu_a - mu_b|² + tr(cov_a + cov_b - 2 (cov_a cov_b)^½).

    Sample covariances of fewer images than feature dimensions (or of features that are always 0, as after
    a ReLU) are singular; `trace_sqrt_product` handles them without the usual diagonal offset.
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.atleast_2d(cov_a).astype(np.float64), np.atleast_2d(cov_b).astype(np.float64)
    d = mu_a.size
    if mu_a.shape != (d,) or mu_b.shape != (d,) or cov_a.shape != (d, d) or cov_b.shape != (d, d):
        raise ValueError(f"inconsistent shapes: mu_a {mu_a.shape}, cov_a {cov_a.shape}, "
                         f"mu_b {mu_b.shape}, cov_b {cov_b.shape}")
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt_product(cov_a, cov_b))


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D) (FID-style).

    Biased upwards for small N; compare values only at equal sample sizes (`equal_n`).
    """
    feats_a, feats_b = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature dimensions differ: {feats_a.shape[1]} vs {feats_b.shape[1]}")
    if min(len(feats_a), len(feats_b)) < 2:
        raise ValueError("each feature set needs at least 2 samples to estimate a covariance")
    return frechet_distance_from_stats(feats_a.mean(0), np.cov(feats_a, rowvar=False),
                                       feats_b.mean(0), np.cov(feats_b, rowvar=False))


# ---- KID ---------------------------------------------------------------------------------------------------
class KID(NamedTuple):
    value: float           # mean over subsets of the unbiased MMD²; 0 in expectation for one distribution
    sd: float              # spread of the subset values
    standard_error: float  # sd / √n_subsets; subsets drawn from one pool overlap, so a lower bound then
    subset_size: int
    n_subsets: int


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """k(x, y) = (x·y / D + 1)³, the kernel of KID (Bińkowski et al. 2018)."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD² (U-statistic): within-set kernel means over pairs i ≠ j, minus twice the cross mean."""
    m, n = len(a), len(b)
    k_aa, k_bb = polynomial_kernel(a, a), polynomial_kernel(b, b)
    within_a = (k_aa.sum() - np.trace(k_aa)) / (m * (m - 1))
    within_b = (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
    return float(within_a + within_b - 2.0 * polynomial_kernel(a, b).mean())


def kid(feats_a, feats_b, subset_size: int = 1000, n_subsets: int = 100, seed: int = 0) -> KID:
    """Kernel Inception Distance between two feature sets: unbiased MMD² with the cubic polynomial kernel,
    averaged over `n_subsets` random subsets (without replacement) of each set.

    `subset_size` is capped at the smaller set's size (the result says which size was used). Unlike the
    Fréchet distance its expectation does not depend on N, but its spread does.
    """
    feats_a, feats_b = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature dimensions differ: {feats_a.shape[1]} vs {feats_b.shape[1]}")
    size = min(subset_size, len(feats_a), len(feats_b))
    if size < 2 or n_subsets < 1:
        raise ValueError(f"KID needs subsets of at least 2 samples and n_subsets >= 1, got {size} and {n_subsets}")
    rng = np.random.default_rng(seed)
    values = np.array([mmd2_unbiased(feats_a[rng.choice(len(feats_a), size, replace=False)],
                                     feats_b[rng.choice(len(feats_b), size, replace=False)])
                       for _ in range(n_subsets)])
    sd = float(values.std(ddof=1)) if n_subsets > 1 else float("nan")
    return KID(float(values.mean()), sd, sd / np.sqrt(n_subsets), size, n_subsets)


# ---- comparisons at one sample size ----------------------------------------------------------------------
class EqualN(NamedTuple):
    mean: float
    sd: float       # over repeats: the spread from which images were drawn, not a CI (a set of exactly n
                    # samples is the same in every repeat; only the reference draw varies)
    n: int
    repeats: int


AS_GOOD_AS_REAL = "real target class, other images (as good as real)"
WRONG_CLASS = "real other classes (wrong class)"


def equal_n(metric: Callable[[np.ndarray, np.ndarray], float], reference, sets: Mapping[str, np.ndarray],
            n: int | None = None, repeats: int = 10, seed: int = 0) -> dict[str, EqualN]:
    """`metric(reference_subset, set_subset)` for every set, each drawn at the same `n` (default: the
    smallest size), repeated with seeded subsampling without replacement; mean ± sd over repeats.

    Within a repeat all sets meet the same reference subset, so differences between rows are not blurred by
    the reference draw. For KID pass e.g. `lambda a, b: kid(a, b, n_subsets=1).value`.
    """
    reference = _features(reference, "reference")
    sets = {name: _features(x, name) for name, x in sets.items()}
    sizes = {name: len(x) for name, x in sets.items()}
    n = min([len(reference), *sizes.values()]) if n is None else int(n)
    too_small = {name: size for name, size in {"reference": len(reference), **sizes}.items() if size < n}
    if not sets or n < 2 or repeats < 1 or too_small:
        raise ValueError(f"need sets of at least n={n} >= 2 samples and repeats >= 1; too small: {too_small}")
    rng = np.random.default_rng(seed)
    values = {name: [] for name in sets}
    for _ in range(repeats):
        reference_subset = reference[rng.choice(len(reference), n, replace=False)]
        for name, x in sets.items():
            values[name].append(float(metric(reference_subset, x[rng.choice(len(x), n, replace=False)])))
    return {name: EqualN(float(np.mean(v)), float(np.std(v, ddof=1)) if repeats > 1 else float("nan"), n, repeats)
            for name, v in values.items()}


def with_reference_rows(synthetic_sets: Mapping[str, np.ndarray], real_target_other, real_other_classes
                        ) -> dict[str, np.ndarray]:
    """The synthetic sets plus two real rows that frame their numbers against a reference set of real
    target-class images (e.g. the test split's): other real images of the target class (e.g. training
    images: the value a perfect generator would get) and real images of the other classes (the value
    of the wrong class altogether)."""
    clash = {AS_GOOD_AS_REAL, WRONG_CLASS} & set(synthetic_sets)
    if clash:
        raise ValueError(f"synthetic set names {sorted(clash)} are reserved for the reference rows")
    return {**synthetic_sets, AS_GOOD_AS_REAL: real_target_other, WRONG_CLASS: real_other_classes}


# ---- precision / recall / density / coverage ------------------------------------------------------------
class PRDC(NamedTuple):
    precision: float  # share of fake samples inside the real manifold (fidelity)
    recall: float  # share of real samples inside the fake manifold (diversity)
    density: float  # how many real neighbourhoods hold a fake sample, / k; ~1 for matched distributions
    coverage: float  # share of real samples whose neighbourhood holds at least one fake sample


def _kth_neighbour_radius(x: np.ndarray, k: int) -> np.ndarray:
    # k + 1 neighbours: the nearest one of each point is the point itself. A tree computes distances from
    # coordinate differences, as `cdist` does below, so a neighbour exactly on a ball's boundary is inside
    # it in both computations (the brute-force |x|²+|y|²-2x·y form disagrees in the last bits).
    distances, _ = NearestNeighbors(n_neighbors=k + 1, algorithm="ball_tree").fit(x).kneighbors(x)
    return distances[:, k]


def precision_recall_density_coverage(real, fake, k: int = 5, chunk_size: int = 1024) -> PRDC:
    """Naeem et al. (2020), "Reliable Fidelity and Diversity Metrics for Generative Models".

    Around every real sample X_i sits the ball of radius NND_k(X_i) (distance to its k-th nearest real
    neighbour), likewise for fake samples Y_j. With M fake and N real samples (balls closed):
      precision = 1/M Σ_j 1[Y_j in some real ball]          recall   = 1/N Σ_i 1[X_i in some fake ball]
      density   = 1/(kM) Σ_j #{real balls holding Y_j}       coverage = 1/N Σ_i 1[X_i's ball holds some Y_j]
    Two independent samples of one distribution give values near 1 (coverage ≈ 1 - 2^-k); for exactly
    identical sets density is (k + 1) / k, since every point also lies in its own ball. Real-fake
    distances are computed in chunks of `chunk_size` fake samples.
    """
    real, fake = _features(real, "real"), _features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k={k} samples in each set, got {len(real)} real and {len(fake)} fake")
    real_radius, fake_radius = _kth_neighbour_radius(real, k), _kth_neighbour_radius(fake, k)
    fake_in_real, balls_per_fake = [], []
    real_in_fake = np.zeros(len(real), bool)
    real_to_nearest_fake = np.full(len(real), np.inf)
    for start in range(0, len(fake), chunk_size):
        d = scipy.spatial.distance.cdist(fake[start:start + chunk_size], real)  # (chunk, N)
        inside_real_ball = d <= real_radius[None, :]
        fake_in_real.append(inside_real_ball.any(axis=1))
        balls_per_fake.append(inside_real_ball.sum(axis=1))
        real_in_fake |= (d <= fake_radius[start:start + chunk_size, None]).any(axis=0)
        real_to_nearest_fake = np.minimum(real_to_nearest_fake, d.min(axis=0))
    return PRDC(precision=float(np.concatenate(fake_in_real).mean()),
                recall=float(real_in_fake.mean()),
                density=float(np.concatenate(balls_per_fake).sum() / (k * len(fake))),
                coverage=float((real_to_nearest_fake <= real_radius).mean()))


# ---- SSIM, MS-SSIM, diversity ---------------------------------------------------------------------------
_GAUSSIAN_SIGMA = 1.5
_GAUSSIAN_TRUNCATE = 3.5  # radius int(3.5 * 1.5 + 0.5) = 5: the 11-tap window of Wang et al. (2004)
_K1, _K2 = 0.01, 0.03
# Wang, Simoncelli & Bovik (2003) weights for scales 1..5 (fine to coarse).
MS_SSIM_WEIGHTS = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333])
MIN_COARSEST_SIDE = 16


def _unit_images(x, value_range: tuple[float, float], name: str) -> np.ndarray:
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.integer):
        value_range = (0.0, 255.0)
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    x = x.astype(np.float64)
    if x.ndim >= 3 and x.shape[-1] == 1:  # NHWC grayscale
        x = x[..., 0]
    if x.ndim < 2:
        raise ValueError(f"{name} must be (..., H, W) grayscale images, got shape {x.shape}")
    tolerance = 1e-3 * (hi - lo)
    if not np.isfinite(x).all() or x.min() < lo - tolerance or x.max() > hi + tolerance:
        raise ValueError(f"{name} has values in [{np.nanmin(x):.3g}, {np.nanmax(x):.3g}], outside value_range "
                         f"{value_range}; pass value_range=(-1, 1) for images in [-1, 1], or clip")
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _luminance_and_contrast_structure(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean luminance term and mean SSIM map (l·cs) over the last two axes, plus mean cs; data range 1.

    Windows are Gaussian (σ = 1.5, 11 taps) with reflected borders and every pixel counts, so images
    smaller than the window still get a value.
    """
    sigma = (0.0,) * (a.ndim - 2) + (_GAUSSIAN_SIGMA, _GAUSSIAN_SIGMA)

    def blur(x):
        return scipy.ndimage.gaussian_filter(x, sigma, mode="reflect", truncate=_GAUSSIAN_TRUNCATE)

    c1, c2 = _K1 ** 2, _K2 ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov_ab = blur(a * b) - mu_a * mu_b
    luminance = (2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1)
    contrast_structure = (2 * cov_ab + c2) / (var_a + var_b + c2)
    return (luminance * contrast_structure).mean(axis=(-2, -1)), contrast_structure.mean(axis=(-2, -1))


def _pair(a, b, value_range) -> tuple[np.ndarray, np.ndarray]:
    a, b = _unit_images(a, value_range, "a"), _unit_images(b, value_range, "b")
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    return a, b


def _scalar_or_array(x: np.ndarray):
    return float(x) if x.ndim == 0 else x


def ssim(a, b, value_range: tuple[float, float] = (0.0, 1.0)):
    """Single-scale SSIM (Gaussian window) of two (..., H, W) images; a float, or an array per leading index."""
    a, b = _pair(a, b, value_range)
    return _scalar_or_array(_luminance_and_contrast_structure(a, b)[0])


def num_ms_ssim_scales(height: int, width: int) -> int:
    """Scales used by `ms_ssim`: up to the standard 5, halving while the coarsest side stays >= 16 px.

    A 256 px image gets 5 scales (256..16), 64 px gets 3 (64, 32, 16), 16 px or smaller gets 1 (plain SSIM):
    below 16 px an 11-tap window would cover the whole image and the scale would say nothing new.
    """
    side, scales = min(height, width), 1
    while scales < len(MS_SSIM_WEIGHTS) and side // 2 >= MIN_COARSEST_SIDE:
        side //= 2
        scales += 1
    return scales


def _halve(x: np.ndarray) -> np.ndarray:
    """2x2 average pooling (a trailing odd row/column is dropped)."""
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    return x.reshape(*x.shape[:-2], h // 2, 2, w // 2, 2).mean(axis=(-3, -1))


def ms_ssim(a, b, value_range: tuple[float, float] = (0.0, 1.0)):
    """Multi-scale SSIM (Wang, Simoncelli & Bovik 2003) of two (..., H, W) images.

    MS-SSIM = Π_{j<S} cs_j^{w_j} · ssim_S^{w_S} with S = `num_ms_ssim_scales(H, W)` and the first S standard
    weights renormalised to sum to 1 (so small images such as 64x64 use 3 scales). Negative cs/ssim values
    are clipped to 0 before the fractional powers. A float, or an array per leading index.
    """
    a, b = _pair(a, b, value_range)
    scales = num_ms_ssim_scales(*a.shape[-2:])
    weights = MS_SSIM_WEIGHTS[:scales] / MS_SSIM_WEIGHTS[:scales].sum()
    result = np.ones(a.shape[:-2])
    for scale in range(scales):
        ssim_map_mean, cs_mean = _luminance_and_contrast_structure(a, b)
        last = scale == scales - 1
        result = result * np.maximum(ssim_map_mean if last else cs_mean, 0.0) ** weights[scale]
        if not last:
            a, b = _halve(a), _halve(b)
    return _scalar_or_array(result)


def ms_ssim_diversity(images, num_pairs: int = 1000, seed: int = 0,
                      value_range: tuple[float, float] = (0.0, 1.0), chunk_size: int = 256) -> float:
    """1 - mean MS-SSIM over `num_pairs` random pairs of distinct images of (N, H, W); higher = more diverse.

    Compare it with the same number computed on real images of the same class (mode collapse shows as
    a much lower diversity than the real set's).
    """
    images = _unit_images(images, value_range, "images")
    if images.ndim != 3 or len(images) < 2:
        raise ValueError(f"images must be (N, H, W) with N >= 2, got shape {images.shape}")
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be at least 1, got {num_pairs}")
    rng = np.random.default_rng(seed)
    first = rng.integers(0, len(images), num_pairs)
    second = (first + rng.integers(1, len(images), num_pairs)) % len(images)  # never the same image
    scores = [np.atleast_1d(ms_ssim(images[first[s:s + chunk_size]], images[second[s:s + chunk_size]]))
              for s in range(0, num_pairs, chunk_size)]
    return float(1.0 - np.concatenate(scores).mean())
