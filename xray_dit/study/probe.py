"""Image sets and the baseline classifier as a measuring instrument (probabilities + feature space)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from xray_dit.data import pipeline
from xray_dit.data import synthetic as synthetic_lib
from xray_dit.models import factory
from xray_dit.train import classifier, eval_pass


@dataclasses.dataclass
class ImageSet:
    """Images in [-1, 1] (N, H, W) with what is known about them."""
    images: np.ndarray
    labels: np.ndarray          # (N, L) over config.data.labels (synthetic: the generated class)
    ids: np.ndarray             # image ids (synthetic: file names)
    patients: np.ndarray        # patient ids ("" for synthetic)

    def __len__(self):
        return len(self.images)

    def subset(self, keep: np.ndarray) -> "ImageSet":
        return ImageSet(self.images[keep], self.labels[keep], self.ids[keep], self.patients[keep])


def real_images(config: ml_collections.ConfigDict, mesh, split: str, *, only_class: str | None = None) -> ImageSet:
    """Every image of `split` in `config.data.data_dir` (or only those of `only_class`), read once in order."""
    table = pipeline.metadata_table(config.data, split, data_dir=config.data.data_dir)
    batch_size = eval_pass.eval_batch_size(int(config.classifier.train.batch_size), mesh)
    images, labels, index = [], [], []
    for batch in eval_pass.eval_passes(config, epath.Path(config.data.data_dir), split, batch_size, only_class=only_class):
        valid = batch["valid"].astype(bool)
        images.append(batch["image"][valid][..., 0])
        labels.append(batch["labels"][valid])
        index.append(batch["index"][valid])
    index = np.concatenate(index)
    return ImageSet(np.concatenate(images), np.concatenate(labels), np.asarray(table.image_id)[index],
                    np.asarray(table.patient_id)[index])


def synthetic_images(folder: str | epath.PathLike, label_names) -> ImageSet:
    source = synthetic_lib.SyntheticSource(folder, label_names)
    images = []
    for name in source.files:
        with Image.open(epath.Path(folder) / name) as image:
            images.append(np.asarray(image.convert("L"), np.float32) / 127.5 - 1.0)
    return ImageSet(np.stack(images), source.labels, np.asarray(source.files), np.full(len(source), ""))


def quality_encoder_seed(baseline_seeds):
    """The baseline seed whose classifier should embed images for the quality metrics, or None.

    `ClassifierProbe` (the filters' instrument) uses the lowest seed; measuring quality with the features
    that chose the accepted images would grade the filters by their own criterion. The next seed's
    classifier saw the same data but is another model. None when there is only one seed: then every
    available feature space is the filters' own, and a report must say so.
    """
    ordered = sorted(baseline_seeds, key=int)
    return ordered[1] if len(ordered) > 1 else None


class ClassifierProbe:
    """A baseline seed's selected classifier (from the study's `results`): probabilities and pooled features
    of any images. `seed` None takes the lowest seed, the one the filters measure with."""

    def __init__(self, results: dict, seed=None):
        baseline = results["01_baseline"]["runs"]
        chosen = str(sorted(baseline, key=int)[0] if seed is None else seed)
        if chosen not in baseline:
            raise ValueError(f"no baseline run of seed {chosen!r}; the seeds are {sorted(baseline, key=int)}")
        export = epath.Path(baseline[chosen]["workdir"]) / "best"
        self.seed = chosen
        self.model, kept, info = factory.load_export(export)
        self.variables = classifier.variables_from_export(kept, factory.state_collections(self.model))
        self.class_names = list(info["class_names"])
        self.source = str(export)
        model = self.model

        @jax.jit
        def run(variables, images):
            features = model.apply(variables, images, method=model.features)
            logits = model.apply(variables, images)
            return jax.nn.sigmoid(logits), features.astype(jnp.float32)
        self._run = run

    def __call__(self, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (N, L), features (N, D)); N may be 0."""
        probs, feats = [], []
        for start in range(0, max(len(images), 1), batch_size):
            chunk = np.asarray(images[start:start + batch_size], np.float32)
            # Padded to the full batch: every set size reuses the one compiled program.
            rows = np.zeros((batch_size, *images.shape[1:]), np.float32)
            rows[:len(chunk)] = chunk
            p, f = self._run(self.variables, jnp.asarray(rows[..., None]))
            probs.append(np.asarray(p)[:len(chunk)])
            feats.append(np.asarray(f)[:len(chunk)])
        return np.concatenate(probs), np.concatenate(feats)


def downsample_for_pixels(images: np.ndarray, max_size: int = 64) -> np.ndarray:
    """Area-average to at most max_size px per side: pixel-space NN search stays small at 256 px."""
    n, h, w = images.shape
    factor = max(1, h // max_size)
    if factor == 1:
        return images
    return images[:, : h // factor * factor, : w // factor * factor].reshape(
        n, h // factor, factor, w // factor, factor).mean(axis=(2, 4))
