"""CheXpert (Stanford; 224,316 radiographs of 65,240 patients, 14 report-mined observations).

Layouts: `CheXpert-v1.0-small/` (the 11 GB downsampled release) or `CheXpert-v1.0/` (full
resolution), each with `train.csv`, `valid.csv`, `train/` and `valid/`; the CSV `Path` column reads
like `CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`. The manual_dir may be the
release folder itself or the folder holding it.

Splits: `train` and `validation` divide `train.csv` by patient (a seeded `validation_fraction` of
its patients); `test` is `valid.csv` (234 images of 200 patients labelled by radiologists; the
official test set is not public). The patient id is the `patientNNNNN` part of the path.

Labels, per observation: 1 positive; 0 or blank (not mentioned) negative; -1 (uncertain) follows
the config's uncertainty policy: "ones" → 1, "zeros" → 0, "ignore" → label 0 with label_mask 0.
`uncertain` (extra feature) records where the CSV said -1, whatever the policy.
Configs: `"<size>"` (frontal views, policy "ignore"), `"<size>_ones"`, `"<size>_zeros"`; build a
`ChexpertConfig` for per-label policies (`uncertainty_overrides`) or lateral views.
"""

from __future__ import annotations

import csv
import io
import dataclasses
import re
from typing import Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from xray_dit.data import DataError, splits
from xray_dit.data.builders import common

LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
          "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
          "Fracture", "Support Devices")
POLICIES = ("ones", "zeros", "ignore")
_RELEASES = ("CheXpert-v1.0-small", "CheXpert-v1.0")
_REQUIRED_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") + LABELS
_PATIENT = re.compile(r"(patient\d+)")
SIZES = (64, 128, 224, 256, 320, 512)


@dataclasses.dataclass(eq=False)
class ChexpertConfig(common.CxrConfig):
    frontal_only: bool = True
    uncertainty: str = "ignore"                        # policy for every label not overridden
    uncertainty_overrides: Mapping[str, str] = dataclasses.field(default_factory=dict)
    validation_fraction: float = 0.1                   # of train.csv's patients
    split_seed: int = 0

    def __post_init__(self):
        for label, policy in {"*": self.uncertainty, **self.uncertainty_overrides}.items():
            if policy not in POLICIES:
                raise ValueError(f"CheXpert uncertainty policy for {label!r} must be one of {POLICIES}, "
                                 f"got {policy!r}")
            if label != "*" and label not in LABELS:
                raise ValueError(f"uncertainty_overrides names {label!r}, which is not a CheXpert label {LABELS}")

    def policy(self, label: str) -> str:
        return self.uncertainty_overrides.get(label, self.uncertainty)


def _configs() -> list[ChexpertConfig]:
    configs = []
    for size in SIZES:
        for policy in ("ignore", "ones", "zeros"):
            name = str(size) if policy == "ignore" else f"{size}_{policy}"
            configs.append(ChexpertConfig(name=name, size=size, uncertainty=policy,
                                          description=f"{size}x{size}, frontal views, uncertain → {policy}"))
    return configs


def patient_from_path(path: str) -> str | None:
    match = _PATIENT.search(path)
    return match.group(1) if match else None


def encode_labels(values: Mapping[str, str], config: ChexpertConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSV cells → (labels, label_mask, uncertain) under the config's per-label policy."""
    labels = np.zeros(len(LABELS), np.float32)
    mask = np.ones(len(LABELS), np.float32)
    uncertain = np.zeros(len(LABELS), np.float32)
    for i, name in enumerate(LABELS):
        cell = values[name].strip()
        try:
            value = float(cell) if cell else 0.0
        except ValueError:
            value = float("nan")   # reported below, with the label's name
        if value == 1.0:
            labels[i] = 1.0
        elif value == -1.0:
            uncertain[i] = 1.0
            policy = config.policy(name)
            labels[i] = 1.0 if policy == "ones" else 0.0
            mask[i] = 0.0 if policy == "ignore" else 1.0
        elif value != 0.0:
            raise ValueError(f"label {name!r} has value {cell!r}; expected 1, 0, -1 or blank")
    return labels, mask, uncertain


class Chexpert(common.CxrBuilder):
    """CheXpert v1.0 (small or full) as PNG at one resolution; see the module docstring."""

    name = "chexpert"
    LABELS = LABELS
    BUILDER_CONFIGS = _configs()
    DEFAULT_CONFIG_NAME = "224"
    DESCRIPTION = "CheXpert: chest radiographs with 14 observations mined from reports, with uncertainty."
    HOMEPAGE = "https://stanfordmlgroup.github.io/competitions/chexpert/"
    CITATION = ("Irvin et al., CheXpert: A Large Chest Radiograph Dataset with Uncertainty Labels and "
                "Expert Comparison, AAAI 2019.")
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Register at https://stanfordmlgroup.github.io/competitions/chexpert/ (Stanford AIMI), download
    CheXpert-v1.0-small.zip (or the full CheXpert-v1.0) and extract it, so that the manual_dir holds
    CheXpert-v1.0-small/train.csv, CheXpert-v1.0-small/valid.csv, CheXpert-v1.0-small/train/patient*/...
    and CheXpert-v1.0-small/valid/patient*/... (or pass the CheXpert-v1.0-small folder itself).
    """

    def _extra_features(self):
        return {"uncertain": tfds.features.Tensor(shape=(len(LABELS),), dtype=np.float32)}

    def _release_dir(self, root: epath.Path) -> epath.Path:
        for candidate in (root, *(root / r for r in _RELEASES)):
            if (candidate / "train.csv").is_file():
                return candidate
        raise common.ManualDataMissingError(self.missing_message(
            ", ".join(str(c / "train.csv") for c in (root, *(root / r for r in _RELEASES))), "train.csv"))

    def _split_generators(self, dl_manager):
        config: ChexpertConfig = self.builder_config
        release = self._release_dir(self.manual_path(dl_manager))
        train_rows = self._read_csv(release / "train.csv")
        test_rows = self._read_csv(self.require_file([release / "valid.csv"], "valid.csv"))

        validation_patients = splits.carve_validation_patients(
            (p for r in train_rows if (p := patient_from_path(r["Path"]))), config.validation_fraction,
            config.split_seed)
        rows_by_split: dict[str, list[common.ImageRow]] = {"train": [], "validation": [], "test": []}
        for group, rows in (("train", train_rows), ("test", test_rows)):
            for row in rows:
                relative = self._relative_path(row["Path"])
                patient = patient_from_path(row["Path"])
                if patient is None:
                    self.record_bad_row(group, relative, str(release / relative), "no patientNNNNN in Path")
                    continue
                split = "validation" if group == "train" and patient in validation_patients else group
                lateral = row["Frontal/Lateral"].strip().lower() == "lateral"
                if config.frontal_only and lateral:
                    continue
                try:
                    labels, mask, uncertain = encode_labels(row, config)
                except ValueError as e:
                    self.record_bad_row(split, relative, str(release / relative), str(e))
                    continue
                example = {
                    "image_id": relative,
                    "patient_id": patient,
                    "labels": labels,
                    "label_mask": mask,
                    "uncertain": uncertain,
                    "age": common.parse_age(row["Age"]),
                    "sex": common.normalise_sex(row["Sex"]),
                    "view": row["AP/PA"].strip().upper() or ("LATERAL" if lateral else ""),
                }
                rows_by_split[split].append(common.ImageRow(key=relative, path=str(release / relative),
                                                            example=example))
        splits.check_patient_disjoint(
            {s: (r.example["patient_id"] for r in rows) for s, rows in rows_by_split.items()},
            dataset=f"{self.name}/{config.name}")
        return {split: self._generate_examples(split, rows) for split, rows in rows_by_split.items() if rows}

    @staticmethod
    def _relative_path(path: str) -> str:
        """'CheXpert-v1.0-small/train/patient00001/...' → 'train/patient00001/...' (relative to the release)."""
        parts = path.strip().split("/")
        return "/".join(parts[1:] if parts[0] not in ("train", "valid") else parts)

    def _read_csv(self, path: epath.Path) -> list[dict[str, str]]:
        with io.TextIOWrapper(path.open("rb"), encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in _REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
            return [row for row in reader if row.get("Path")]
