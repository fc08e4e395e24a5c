"""Quality of the synthetic sets, for 08_privacy: measured with an encoder the filters did not use.

  encoder        the baseline classifier of another seed than the filters' (`probe.quality_encoder_seed`);
                 with a single seed there is no other, and the result says the metrics are circular
  equal n        Fréchet distance and KID to real target-class *test* images, every row drawn at one n
                 (the Fréchet distance grows as n shrinks), mean ± sd over redraws, beside two real rows:
                 other real images of the class (as good as real) and real images of other classes
  detectability  can a logistic regression tell held-out real target-class images from synthetic ones
                 (downsampled pixels, and the encoder's features)? 0.5 = no
  diversity      1 − mean MS-SSIM of random pairs, synthetic vs real training images of the class
  CTR oracle     on the phantom: the share of generated images with an enlarged heart
"""

from __future__ import annotations

import numpy as np
from etils import epath

from xray_dit.evaluation import ctr_oracle, detectability, plots, synthesis
from xray_dit.study import probe
from xray_dit.study.context import StudyContext

MIN_SET = 10                 # smaller sets are left out of the equal-n table (its n is the smallest set's)
OTHER_CLASS_MAX = 512        # real images of other classes embedded for the "wrong class" row
DETECT_PIXELS = 32           # detectability on pixels at this many px per side
DETECT_SYNTHETIC_RATIO = 2   # at most this many synthetic images per real one in a detectability fit
REPEATS = 10


def encoder(context: StudyContext) -> tuple[probe.ClassifierProbe, dict]:
    """The quality encoder and what the report must say about it."""
    filters_probe = context.probe()
    seed = probe.quality_encoder_seed(list(context.results["01_baseline"]["runs"]))
    if seed is None:
        return filters_probe, {
            "name": f"baseline classifier (seed {filters_probe.seed})", "circular": True,
            "note": "only one baseline seed: the quality metrics use the very features the filters selected "
                    "with, so they are circular (they grade the filters by their own criterion)"}
    model = probe.ClassifierProbe(context.results, seed=seed)
    return model, {"name": f"baseline classifier of seed {model.seed}", "circular": False,
                   "note": f"another seed than the filters' classifier (seed {filters_probe.seed}): "
                           "same data, another model"}


def other_class_images(train: probe.ImageSet, t: int, seed: int = 0) -> np.ndarray:
    """Up to OTHER_CLASS_MAX training images without the target finding, in a seeded random choice."""
    others = np.flatnonzero(train.labels[:, t] == 0)
    chosen = np.random.default_rng(seed).permutation(others)[:OTHER_CLASS_MAX]
    return train.images[np.sort(chosen)]


def equal_n_table(synthetic_feats: dict[str, np.ndarray], reference: np.ndarray, real_target_other: np.ndarray,
                  real_other_classes: np.ndarray, seed: int = 0) -> dict:
    """Fréchet distance and KID of every set to `reference`, all rows at one n (mean ± sd over REPEATS)."""
    rows = synthesis.with_reference_rows(synthetic_feats, real_target_other, real_other_classes)
    left_out = {name: len(x) for name, x in rows.items() if len(x) < MIN_SET}
    rows = {name: x for name, x in rows.items() if len(x) >= MIN_SET}
    if len(reference) < MIN_SET or not set(rows) & set(synthetic_feats):
        return {"rows": {}, "left_out": left_out, "reference_n": len(reference),
                "reason": f"fewer than {MIN_SET} reference or synthetic images"}
    fd = synthesis.equal_n(synthesis.frechet_distance, reference, rows, repeats=REPEATS, seed=seed)
    kid = synthesis.equal_n(lambda a, b: synthesis.kid(a, b, n_subsets=1).value, reference, rows,
                            repeats=REPEATS, seed=seed)
    n = next(iter(fd.values())).n
    return {"n": n, "repeats": REPEATS, "reference_n": len(reference), "left_out": left_out,
            "rows": {name: {"frechet_distance": {"mean": fd[name].mean, "sd": fd[name].sd},
                            "kid": {"mean": kid[name].mean, "sd": kid[name].sd}, "n": n,
                            "available": len(rows[name]),
                            "kind": "synthetic" if name in synthetic_feats else "real reference"}
                     for name in rows}}


def _detect(real: np.ndarray, synthetic: np.ndarray, n_boot: int, seed: int) -> dict | None:
    keep = min(len(synthetic), DETECT_SYNTHETIC_RATIO * len(real))
    synthetic = synthetic[np.sort(np.random.default_rng(seed).permutation(len(synthetic))[:keep])]
    if min(len(real), len(synthetic)) < 5:
        return None
    d = detectability.detectability_auc(real, synthetic, seed=seed, n_boot=n_boot)
    return {"auc": d.auc, "lower": d.lower, "upper": d.upper, "n_real": d.n_real, "n_synthetic": d.n_synthetic,
            "fold_aucs": d.fold_aucs.tolist()}


def detectability_table(real_images: np.ndarray, real_feats: np.ndarray, synthetic_images: dict[str, np.ndarray],
                        synthetic_feats: dict[str, np.ndarray], encoder_name: str, n_boot: int) -> dict:
    """Per set: the pixel-space detectability (its own keys) and the encoder-space one (under "encoder")."""
    size = probe.downsample_for_pixels(real_images[:1], DETECT_PIXELS).shape[1] if len(real_images) else DETECT_PIXELS
    real_px = probe.downsample_for_pixels(real_images, DETECT_PIXELS)
    out = {}
    for name, images in synthetic_images.items():
        pixels = _detect(real_px, probe.downsample_for_pixels(images, DETECT_PIXELS), n_boot, 0)
        if pixels is None:
            continue
        out[name] = {**pixels, "features": f"pixels downsampled to {size} x {size}",
                     "encoder": {**(_detect(real_feats, synthetic_feats[name], n_boot, 0) or {}),
                                 "features": encoder_name}}
    return out


def diversity(synthetic: np.ndarray, real_target: np.ndarray) -> dict:
    def one(images):
        return (synthesis.ms_ssim_diversity(images, num_pairs=500, value_range=(-1.0, 1.0))
                if len(images) >= 2 else float("nan"))
    return {"synthetic": one(synthetic), "real minority (train)": one(real_target)}


def ctr_fidelity(synthetic: np.ndarray, real_minority: np.ndarray, out_dir: epath.Path) -> dict:
    """Label fidelity by the phantom's CTR oracle: does a generated 'Cardiomegaly' image have CTR > 0.5?"""
    syn = np.array([ctr_oracle.measure_ctr(im) for im in synthetic])
    real = np.array([ctr_oracle.measure_ctr(im) for im in real_minority])
    measurable = np.isfinite(syn)
    figure = None
    if measurable.any() and np.isfinite(real).any():
        figure = plots.plot_ctr_distributions(real[np.isfinite(real)], syn[measurable],
                                              out_dir / "ctr_distributions.png")
    return {"fraction_ctr_above_0.5": float(np.mean(syn[measurable] > 0.5)) if measurable.any() else float("nan"),
            "fraction_of_all_generated_ctr_above_0.5": float(np.mean(np.where(measurable, syn, 0) > 0.5)),
            "measurable": int(measurable.sum()), "generated": int(len(syn)),
            "synthetic_ctr_mean": float(np.nanmean(syn)) if measurable.any() else float("nan"),
            "real_minority_ctr_mean": float(np.nanmean(real)) if np.isfinite(real).any() else float("nan"),
            "figure": str(figure) if figure else None}
