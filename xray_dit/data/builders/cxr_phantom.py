"""The procedural phantom (`xray_dit.data.phantom`) as a TFDS dataset: no download, deterministic.

The cohort (`make_cohort(num_images, seed, spec)`) fixes patients, labels and the patient-wise
train/validation/test assignment; every image is rendered at the config's size. The same config
always prepares the same bytes.
Labels: phantom.LABELS = ("Cardiomegaly", "Effusion", "Nodule", "No Finding"), as recorded (with
the spec's label noise). Extras: `ctr` (true cardiothoracic ratio), `true_labels` (noise-free).
Configs: `"<size>"` = 3,000 images (the quickstart), `"<size>_10k"`, `"<size>_100k"`, `"<size>_study"`
(6,000 images, 60 % of the patients in test: `configs/phantom_full.py`), sizes 64/128/256;
`"<size>_n<count>"` (e.g. `"64_n300"`) for any size >= 16 and count; build a `PhantomConfig` for other
seeds or `PhantomSpec`s.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow_datasets as tfds

from xray_dit.data import phantom, splits
from xray_dit.data.builders import common

SIZES = (64, 128, 256)
_COUNTS = {"": 3_000, "_10k": 10_000, "_100k": 100_000}
_ANY_COUNT = re.compile(r"(\d+)_n(\d+)")   # "<size>_n<count>"
# "<size>_study": the quickstart's training and validation sizes (2,100 and 300 images of 6,000) and a test
# split five times its size (~180 Cardiomegaly images, not ~37). An arm's AUC gain over real only is read
# off the test split; with few test positives its patient-level CI is too wide to show a true gain of a
# few AUC points (phantom_full's first run: +0.033 from 180 fresh positives, CI [-0.014, +0.080]).
STUDY_SPEC = phantom.PhantomSpec(split_fractions=(0.35, 0.05, 0.60))


@dataclasses.dataclass(eq=False)
class PhantomConfig(common.CxrConfig):
    num_images: int = 3_000
    seed: int = 0
    spec: phantom.PhantomSpec = phantom.PhantomSpec()


@dataclasses.dataclass(frozen=True)
class RenderPng:
    """PhantomImage → (image, PNG at `size`, ""): the converter `common.convert_rows` runs in workers."""
    size: int

    def __call__(self, image: phantom.PhantomImage) -> tuple[phantom.PhantomImage, bytes, str]:
        return image, common.encode_png(phantom.render(image, self.size)), ""


class CxrPhantom(common.CxrBuilder):
    """Procedural chest radiographs with a known cardiothoracic ratio; see the module docstring."""

    name = "cxr_phantom"
    LABELS = phantom.LABELS
    BUILDER_CONFIGS = [PhantomConfig(name=f"{size}{suffix}", size=size, num_images=count,
                                     description=f"{count} phantom images at {size}x{size}")
                       for size in SIZES for suffix, count in _COUNTS.items()] + [
        PhantomConfig(name=f"{size}_study", size=size, num_images=6_000, spec=STUDY_SPEC,
                      description=f"6000 phantom images at {size}x{size}, 60 % of the patients in test")
        for size in SIZES]
    DEFAULT_CONFIG_NAME = "64"
    DESCRIPTION = "Procedural frontal chest radiographs (xray_dit.data.phantom) with a known CTR."

    @classmethod
    def named_config(cls, name: str) -> PhantomConfig:
        """A listed config, or `<size>_n<count>`: `count` images at `size` px, the default seed and spec."""
        match = _ANY_COUNT.fullmatch(name)
        if not match:
            try:
                return super().named_config(name)
            except ValueError as e:
                raise ValueError(f"{e}, or <size>_n<count> for any count, e.g. 64_n300") from None
        size, count = int(match.group(1)), int(match.group(2))
        if size < 16 or count < 1:
            raise ValueError(f"cxr_phantom config {name!r}: the size must be >= 16 px and the count >= 1, "
                             f"e.g. 64_n300")
        return PhantomConfig(name=name, size=size, num_images=count,
                             description=f"{count} phantom images at {size}x{size}")

    def _extra_features(self):
        return {"ctr": tfds.features.Scalar(dtype=np.float32),
                "true_labels": tfds.features.Tensor(shape=(len(self.labels),), dtype=np.float32)}

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        config: PhantomConfig = self.builder_config
        # Kept with the data: whoever reads it back (e.g. the study's positive control) needs the cohort's spec.
        self.info.metadata["phantom"] = {"seed": config.seed, "num_images": config.num_images,
                                         "spec": dataclasses.asdict(config.spec)}
        cohort = phantom.make_cohort(config.num_images, seed=config.seed, spec=config.spec)
        by_split = {split: [image for image in cohort if image.split == split] for split in phantom.SPLITS}
        splits.check_patient_disjoint({s: (i.patient_id for i in images) for s, images in by_split.items()},
                                      dataset=f"{self.name}/{config.name}")
        for split, images in by_split.items():
            self._report.expect(split, len(images))
        return {split: self._generate_phantom(split, images) for split, images in by_split.items() if images}

    def _generate_phantom(self, split: str, images: list[phantom.PhantomImage]):
        for image, png, _ in common.convert_rows(images, RenderPng(self.size), self.prepare_workers):
            labels = np.asarray(image.labels, np.float32)
            yield image.image_id, {
                "image": png,
                "image_id": image.image_id,
                "patient_id": image.patient_id,
                "labels": labels,
                "label_mask": np.ones_like(labels),
                "age": float(image.age),
                "sex": image.sex,
                "view": image.view,
                "ctr": image.ctr,
                "true_labels": np.asarray(image.true_labels, np.float32),
            }
        self.finish_split(split)


def prepared_spec(builder: tfds.core.DatasetBuilder, config_name: str) -> phantom.PhantomSpec:
    """The `PhantomSpec` a prepared phantom was drawn with: from its metadata, or (prepared before the
    metadata held it) from the named config `config_name`."""
    saved = builder.info.metadata.get("phantom")
    if saved:
        return phantom.PhantomSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["spec"].items()})
    return CxrPhantom.named_config(config_name).spec
