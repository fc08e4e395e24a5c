"""MedMNIST's chest subsets: ChestMNIST (from NIH ChestX-ray14) and PneumoniaMNIST (paediatric).

Files: `chestmnist.npz` (28 px) or `chestmnist_{64,128,224}.npz`, likewise `pneumoniamnist*.npz`,
with keys train_images, train_labels, val_images, val_labels, test_images, test_labels. Images are
stored at the file's own size (no resampling); configs are `"<subset>_<size>"`, e.g. `"chestmnist_64"`.

Labels: ChestMNIST's 14 findings are NIH ChestX-ray14's, in NIH order, followed by "No Finding"
(derived: none of the 14). PneumoniaMNIST: ("Pneumonia", "No Finding"), the latter for its "normal".

Caveats: MedMNIST's train/val/test split is its own, NOT the official NIH patient-wise split, and
the files carry no patient ids, age, sex or view; each image is its own patient (`<split>-<index>`),
so patient-level disjointness holds only by construction and patient leakage across MedMNIST's
splits cannot be ruled out.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from xray_dit.data import DataError
from xray_dit.data.builders import common
from xray_dit.data.builders import nih_chestxray14

SUBSET_LABELS = {
    "chestmnist": nih_chestxray14.LABELS,
    "pneumoniamnist": ("Pneumonia", "No Finding"),
}
SIZES = (28, 64, 128, 224)
_SPLITS = {"train": "train", "validation": "val", "test": "test"}


@dataclasses.dataclass(eq=False)
class MedmnistConfig(common.CxrConfig):
    subset: str = "chestmnist"

    def __post_init__(self):
        if self.subset not in SUBSET_LABELS:
            raise ValueError(f"MedMNIST subset must be one of {sorted(SUBSET_LABELS)}, got {self.subset!r}")
        if self.size not in SIZES:
            raise ValueError(f"MedMNIST files exist at sizes {SIZES}, got {self.size}")

    @property
    def file_name(self) -> str:
        return f"{self.subset}.npz" if self.size == 28 else f"{self.subset}_{self.size}.npz"


def _labels_from_file(subset: str, raw: np.ndarray) -> np.ndarray:
    """The npz label array → multi-hot over `SUBSET_LABELS[subset]`."""
    raw = np.asarray(raw).reshape(len(raw), -1).astype(np.float32)
    if subset == "chestmnist":
        if raw.shape[1] != 14:
            raise DataError(f"ChestMNIST labels should have 14 columns, got {raw.shape}; download the file again")
        no_finding = (raw.sum(axis=1, keepdims=True) == 0).astype(np.float32)
        return np.concatenate([raw, no_finding], axis=1)
    if raw.shape[1] != 1:
        raise DataError(f"PneumoniaMNIST labels should have 1 column, got {raw.shape}; download the file again")
    return np.concatenate([raw, 1.0 - raw], axis=1)


class Medmnist(common.CxrBuilder):
    """MedMNIST ChestMNIST / PneumoniaMNIST from their npz files; see the module docstring."""

    name = "medmnist"
    BUILDER_CONFIGS = [MedmnistConfig(name=f"{subset}_{size}", size=size, subset=subset,
                                      description=f"{subset} at {size}x{size}")
                       for subset in SUBSET_LABELS for size in SIZES]
    DEFAULT_CONFIG_NAME = "chestmnist_64"
    DESCRIPTION = ("MedMNIST v2 chest subsets. Not the official NIH split; no patient ids "
                   "(each image is its own patient).")
    HOMEPAGE = "https://medmnist.com/"
    CITATION = ("Yang et al., MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D biomedical "
                "image classification, Scientific Data 2023.")
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download chestmnist.npz / chestmnist_64.npz / chestmnist_128.npz / chestmnist_224.npz (and/or the
    pneumoniamnist*.npz files) from https://zenodo.org/records/10519652 (or `pip install medmnist` and
    its downloader) into one folder, the manual_dir.
    """

    @property
    def labels(self) -> tuple[str, ...]:
        return SUBSET_LABELS[self.builder_config.subset]

    def _split_generators(self, dl_manager):
        config: MedmnistConfig = self.builder_config
        path = self.require_file([self.manual_path(dl_manager) / config.file_name], config.file_name)
        with path.open("rb") as f, np.load(f) as npz:
            arrays = {key: npz[key] for key in npz.files}
        missing = [f"{prefix}_{kind}" for prefix in _SPLITS.values() for kind in ("images", "labels")
                   if f"{prefix}_{kind}" not in arrays]
        if missing:
            raise DataError(f"{path}: missing array(s) {missing}; found {sorted(arrays)}; download the file again")
        for split, prefix in _SPLITS.items():
            self._report.expect(split, len(arrays[f"{prefix}_labels"]))
        return {split: self._generate_from_arrays(split, arrays[f"{prefix}_images"], arrays[f"{prefix}_labels"])
                for split, prefix in _SPLITS.items()}

    def _generate_from_arrays(self, split: str, images: np.ndarray, raw_labels: np.ndarray):
        if images.shape[1:3] != (self.size, self.size) or len(images) != len(raw_labels):
            raise DataError(f"{self.builder_config.file_name}: {split} images {images.shape} and labels "
                            f"{raw_labels.shape} do not match config size {self.size}; download the file again")
        labels = _labels_from_file(self.builder_config.subset, raw_labels)
        for index, (pixels, label) in enumerate(zip(images, labels)):
            image_id = f"{split}-{index:06d}"
            gray = common.to_gray_uint8(Image.fromarray(np.asarray(pixels, dtype=np.uint8)))
            yield image_id, {
                "image": common.encode_png(gray),
                "image_id": image_id,
                "patient_id": image_id,
                "labels": label,
                "label_mask": np.ones_like(label),
                "age": common.UNKNOWN_AGE,
                "sex": "",
                "view": "",
            }
        self.finish_split(split)
