"""The data side of the study's arms: what each retrained classifier mixes in, and which arms run.

Every arm is "real + N images of the target class" at one of the study's doses N, trained with the
baseline's seeds. Kinds:

  synthetic            N filtered DiT images, one arm per generator (variant x generator seed)
  oversampled          N real target-class training images again: what a synthetic arm must beat
  phantom_positive     N images of fresh phantom patients with the finding: perfect synthetic data, the
                       positive control (the phantom only; `write_phantom_positives`)
  vae_roundtrip        N real target-class training images passed through the VAE: "VAE-smoothed real"
                       apart from "new images" (`write_vae_roundtrip`)
  synthetic_mitigated  synthetic, while every real training image is replaced by its VAE round trip
                       with probability study.roundtrip_prob (`write_roundtrip_store` + data.roundtrip_*),
                       so that smoothness no longer tells the target class apart

The writers make folders in the synthetic-folder format (`xray_dit.data.synthetic`), which the classifier
mixes in with `synthetic=folder, synthetic_count=N`. A `roundtrip_fn` maps images (B, H, W, 1) in [-1, 1]
to their reconstructions; `vae_roundtrip_fn` makes one from a loaded VAE.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from xray_dit.data import phantom
from xray_dit.data import synthetic as synthetic_lib

ARM_KINDS = ("synthetic", "oversampled", "phantom_positive", "vae_roundtrip", "synthetic_mitigated")
_GENERATED = ("synthetic", "synthetic_mitigated")   # one arm per generator

# Positive-control patients come from cohorts drawn with this seed offset: datasets use small seeds, so the
# control's random streams are not the dataset's. Their ids carry a prefix no dataset id has.
_CONTROL_SEED_OFFSET = 1 << 40
CONTROL_ID_PREFIX = "phantom_control_"
_MAX_CONTROL_COHORT = 2_000_000


# ---- Positive control: fresh phantom patients with the finding ---------------------------------------


def phantom_positive_cohort(count: int, target_class: str, seed: int,
                            spec: phantom.PhantomSpec | None = None) -> list[phantom.PhantomImage]:
    """The first `count` images truly positive for `target_class` in a phantom cohort of new patients.

    The cohort follows `spec` (the dataset's, so the images come from its distribution conditioned on
    the finding); its patients belong to no split and their ids start with `CONTROL_ID_PREFIX`.
    """
    spec = spec or phantom.PhantomSpec()
    if target_class not in phantom.LABELS:
        raise ValueError(f"the phantom has no finding {target_class!r}; its labels are {list(phantom.LABELS)}")
    prevalence = _true_prevalence(spec, target_class)
    if count < 1 or prevalence == 0:
        raise ValueError(f"cannot draw {count} phantom images with {target_class} at prevalence {prevalence}")
    column = phantom.LABELS.index(target_class)
    num_images = math.ceil(1.5 * count / prevalence) + 32
    while True:
        cohort = phantom.make_cohort(num_images, seed=_CONTROL_SEED_OFFSET + seed, spec=spec)
        positives = [image for image in cohort if image.true_labels[column]]
        if len(positives) >= count or num_images >= _MAX_CONTROL_COHORT:
            break
        num_images *= 2   # the same seed's bigger cohort starts with the same patients
    if len(positives) < count:
        raise ValueError(f"only {len(positives)} of {num_images} phantom images show {target_class}; "
                         f"ask for fewer than {count}")
    return [dataclasses.replace(image, image_id=CONTROL_ID_PREFIX + image.image_id,
                                patient_id=CONTROL_ID_PREFIX + image.patient_id) for image in positives[:count]]


def _true_prevalence(spec: phantom.PhantomSpec, target_class: str) -> float:
    findings = {"Cardiomegaly": spec.cardiomegaly_prevalence, "Effusion": spec.effusion_prevalence,
                "Nodule": spec.nodule_prevalence}
    return findings.get(target_class, math.prod(1.0 - p for p in findings.values()))


def write_phantom_positives(folder: str | os.PathLike, *, count: int, size: int, target_class: str,
                            labels: Sequence[str], seed: int, spec: phantom.PhantomSpec | None = None,
                            batch_size: int = 64) -> epath.Path:
    """Renders `phantom_positive_cohort(count, ...)` at `size` px into a synthetic folder; the manifest path.

    Each row's label is the image's true findings among `labels` ("Cardiomegaly|Effusion"), with its
    image and patient ids, true CTR and view beside it.
    """
    cohort = phantom_positive_cohort(count, target_class, seed, spec)

    def batches():
        for start in range(0, len(cohort), batch_size):
            chunk = cohort[start:start + batch_size]
            rows = [{"label": _label_string(image.true_labels, phantom.LABELS, labels), "image_id": image.image_id,
                     "patient_id": image.patient_id, "ctr": f"{image.ctr:.4f}", "view": image.view} for image in chunk]
            yield np.stack([phantom.render(image, size) for image in chunk]), rows

    return synthetic_lib.write_batches(folder, batches(), columns=("label", "image_id", "patient_id", "ctr", "view"),
                                       prefix="phantom")


def _label_string(row: Sequence[float], row_names: Sequence[str], wanted: Sequence[str]) -> str:
    """The names in `wanted` that are positive in `row` (a multi-hot over `row_names`), as "A|B"."""
    return "|".join(name for name in wanted if name in row_names and row[list(row_names).index(name)] == 1)


# ---- VAE round trips ------------------------------------------------------------------------------


def vae_roundtrip_fn(model: Any, params: Any) -> Callable[[np.ndarray], np.ndarray]:
    """images (B, H, W, 1) in [-1, 1] → decode(encode(images).mean) with a loaded VAE (model, params).

    The latent scaling factor would multiply and divide again, so it is not needed.
    """
    @jax.jit
    def roundtrip(params, images):
        return model.apply({"params": params}, images, sample_posterior=False)[0]

    return lambda images: np.asarray(roundtrip(params, jnp.asarray(images, jnp.float32)))


def _roundtrip_batches(images: np.ndarray, roundtrip_fn: Callable[[np.ndarray], np.ndarray],
                       batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, reconstructions) per batch; the last batch is padded so `roundtrip_fn` sees one shape."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(images), batch_size):
        chunk = _unit_float(images[start:start + batch_size])
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
        out = np.asarray(roundtrip_fn(padded))
        if out.shape != padded.shape:
            raise ValueError(f"roundtrip_fn returned shape {out.shape} for images of shape {padded.shape}")
        yield start, out[:len(chunk)]


def _unit_float(images: np.ndarray) -> np.ndarray:
    """(N, H, W[, 1]) uint8 or float in [-1, 1] → float32 (N, H, W, 1) in [-1, 1]."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return images.astype(np.float32)


def write_vae_roundtrip(folder: str | os.PathLike, images: np.ndarray, labels_rows: np.ndarray,
                        ids: Sequence[str], roundtrip_fn: Callable[[np.ndarray], np.ndarray], *,
                        label_names: Sequence[str], batch_size: int) -> epath.Path:
    """Real images passed through `roundtrip_fn` into a synthetic folder, labelled with their real labels.

    `labels_rows`: (N, L) multi-hot over `label_names`; `ids`: the source image ids (kept as `source_id`).
    """
    labels_rows = np.asarray(labels_rows)
    if not len(images) == len(labels_rows) == len(ids):
        raise ValueError(f"{len(images)} images, {len(labels_rows)} label rows and {len(ids)} ids must match")
    rows = [{"label": _label_string(row, label_names, label_names), "source_id": str(i)}
            for row, i in zip(labels_rows, ids)]
    batches = ((out, rows[start:start + len(out)]) for start, out in _roundtrip_batches(images, roundtrip_fn,
                                                                                       batch_size))
    return synthetic_lib.write_batches(folder, batches, columns=("label", "source_id"), prefix="roundtrip")


def write_roundtrip_store(folder: str | os.PathLike, ids: Sequence[str], images: np.ndarray,
                          roundtrip_fn: Callable[[np.ndarray], np.ndarray], *, batch_size: int = 64) -> epath.Path:
    """The store `data.roundtrip_dir` reads: the round trip of every image, found by its image id.

    Pass every training image (`images` may be a memory-mapped array: one batch is read at a time).
    """
    ids = [str(i) for i in ids]
    if len(ids) != len(images):
        raise ValueError(f"{len(ids)} ids for {len(images)} images")
    if len(set(ids)) != len(ids):
        raise ValueError("image ids repeat; a round-trip store needs one image per id")
    batches = ((out, [{"label": "", "image_id": i} for i in ids[start:start + len(out)]])
               for start, out in _roundtrip_batches(images, roundtrip_fn, batch_size))
    return synthetic_lib.write_batches(folder, batches, columns=("label", "image_id"), prefix="roundtrip")


# ---- The arms -------------------------------------------------------------------------------------


def plan_arms(study_config: Any, *, accepted_count: int | Mapping[str, int], have_phantom: bool,
              generators: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The arms to retrain, from `config.study`: one dict per arm, in a stable order (kind, dose, generator).

    `generators`: 04_generate's entries ({"name", "seed", ...}); the generated kinds run once per entry.
    Keys: name (readable, stable: "real + 200 synthetic (class_conditional_seed1)"; the generator is named
    only when there are several), key (for folder names), kind, count, generator (the entry's name) and
    generator_seed (None unless generated), roundtrip_prob (> 0 only for synthetic_mitigated), primary (the
    dose of the primary comparison). Every arm at a dose mixes in the same number of images. A generator
    variant can supply as many as the fewest any of its seeds had accepted; doses are study.synthetic_counts
    capped at what the best-supplied variant can give, and a variant's arms run at the doses it can supply
    (a variant with too few accepted images is left out there rather than shrinking every arm). Kinds in
    study.swept_arms run at every dose, the others at study.primary_count only. phantom_positive needs
    `have_phantom`. When no variant had any image accepted, the generated kinds cannot run at all; the other
    kinds then run at the configured doses, so the controls (the positive one above all) still say what the
    study could have detected.
    """
    kinds = tuple(study_config.arms)
    unknown = [k for k in kinds + tuple(study_config.swept_arms) if k not in ARM_KINDS]
    if unknown:
        raise ValueError(f"study.arms/swept_arms name unknown kind(s) {unknown}; choose from {list(ARM_KINDS)}")
    if any(k in _GENERATED for k in kinds) and not generators:
        raise ValueError("synthetic arms need at least one generator")
    roundtrip_prob = float(study_config.roundtrip_prob)
    if "synthetic_mitigated" in kinds and not 0.0 < roundtrip_prob <= 1.0:
        raise ValueError(f"study.roundtrip_prob={roundtrip_prob} must lie in (0, 1] for synthetic_mitigated arms")
    supply = _variant_supply(accepted_count, generators)
    cap = max(supply.values(), default=0)
    none_accepted = cap == 0 and bool(generators)
    uncapped = max([int(c) for c in study_config.synthetic_counts], default=0)
    doses, primary = _doses(study_config, uncapped if none_accepted else cap)
    named = len(generators) > 1
    arms = []
    for kind in kinds:
        if (kind == "phantom_positive" and not have_phantom) or (kind in _GENERATED and none_accepted):
            continue
        counts = doses if kind in study_config.swept_arms else [primary] if primary else []
        for count in counts:
            for generator in generators if kind in _GENERATED else [None]:
                if generator is not None and supply[_variant(generator)] < count:
                    continue
                arms.append(_arm(kind, count, generator, roundtrip_prob if kind == "synthetic_mitigated" else 0.0,
                                 count == primary, named))
    return arms


def _variant(generator: Mapping[str, Any]) -> str:
    return str(generator.get("variant") or generator["name"])


def _variant_supply(accepted_count: int | Mapping[str, int], generators: Sequence[Mapping[str, Any]]
                    ) -> dict[str, int]:
    """Images each generator variant can supply at one dose: the fewest any of its seeds had accepted."""
    if not isinstance(accepted_count, Mapping):
        return {_variant(g): int(accepted_count) for g in generators} or {"": int(accepted_count)}
    supply: dict[str, int] = {}
    for g in generators:
        count = int(accepted_count[g["name"]])
        supply[_variant(g)] = min(supply.get(_variant(g), count), count)
    return supply or {"": min(map(int, accepted_count.values()), default=0)}


def _doses(study_config: Any, accepted: int) -> tuple[list[int], int]:
    """The distinct positive doses, ascending, each capped at `accepted`; and the primary one (0 = none)."""
    counts = [int(c) for c in study_config.synthetic_counts]
    primary = int(study_config.primary_count) or max(counts, default=0)
    if counts and primary not in counts:
        raise ValueError(f"study.primary_count={primary} is not one of study.synthetic_counts {counts}")
    doses = sorted({min(c, accepted) for c in counts} - {0})
    return doses, max(min(primary, accepted), 0)


def _arm(kind: str, count: int, generator: Mapping[str, Any] | None, roundtrip_prob: float, primary: bool,
         named: bool) -> dict[str, Any]:
    what = {"synthetic": "synthetic", "oversampled": "oversampled real", "phantom_positive": "phantom positives",
            "vae_roundtrip": "VAE round-trip real", "synthetic_mitigated": "synthetic"}[kind]
    name, key = f"real + {count} {what}", f"{kind}_{count}"
    if generator is not None:
        key = f"{key}_{generator['name']}"
        name = f"{name} ({generator['name']})" if named else name
    if kind == "synthetic_mitigated":
        name = f"{name}, real round-tripped p={roundtrip_prob:g}"
    return {"name": name, "key": key, "kind": kind, "count": count,
            "generator": None if generator is None else str(generator["name"]),
            "generator_seed": None if generator is None else int(generator["seed"]),
            "roundtrip_prob": roundtrip_prob, "primary": primary}
