"""Image sets and the baseline classifier as a measuring instrument (probabilities + feature space)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image

from xray_dit import checkpoint, sharding
from xray_dit.data import pipeline
from xray_dit.data import synthetic as synthetic_lib
from xray_dit.study.phases import StudyContext
from xray_dit.train import classifier, common, model_factory


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


def real_images(context: StudyContext, split: str, *, only_class: str | None = None) -> ImageSet:
    config = context.config
    table = pipeline.metadata_table(config.data, split, data_dir=config.data.data_dir)
    batch_size = common.eval_batch_size(int(config.classifier.train.batch_size), context.mesh)
    images, labels, index = [], [], []
    for batch in common.eval_passes(config, epath.Path(config.data.data_dir), split, batch_size, only_class=only_class):
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


class ClassifierProbe:
    """The first baseline seed's selected classifier: probabilities and pooled features of any images."""

    def __init__(self, context: StudyContext):
        baseline = context.results["01_baseline"]["runs"]
        first = baseline[sorted(baseline, key=int)[0]]
        export = epath.Path(first["workdir"]) / "best"
        info = checkpoint.load_export_info(export)
        self.model = model_factory.model_from_info(info)
        size = self.model.img_size if isinstance(self.model.img_size, int) else self.model.img_size[0]
        abstract = sharding.unbox(jax.eval_shape(
            lambda: self.model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 1)))))
        state_names = sorted(set(abstract) - {"params"})
        kept, _ = checkpoint.load_export(export, classifier.export_tree(abstract), kind=info["kind"])
        self.variables = classifier.variables_from_export(kept, state_names)
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
        probs, feats = [], []
        for start in range(0, len(images), batch_size):
            chunk = jnp.asarray(images[start:start + batch_size, ..., None], jnp.float32)
            p, f = self._run(self.variables, chunk)
            probs.append(np.asarray(p))
            feats.append(np.asarray(f))
        return np.concatenate(probs), np.concatenate(feats)


def downsample_for_pixels(images: np.ndarray, max_size: int = 64) -> np.ndarray:
    """Area-average to at most max_size px per side: pixel-space NN search stays small at 256 px."""
    n, h, w = images.shape
    factor = max(1, h // max_size)
    if factor == 1:
        return images
    return images[:, : h // factor * factor, : w // factor * factor].reshape(
        n, h // factor, factor, w // factor, factor).mean(axis=(2, 4))
