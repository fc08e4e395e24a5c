"""NIH ChestX-ray14 (112,120 frontal radiographs, 30,805 patients, 14 NLP-mined findings).

Splits: `test` is the official `test_list.txt`; `train` and `validation` divide the official
`train_val_list.txt` by patient (a seeded `validation_fraction` of its patients), so the three are
patient-disjoint (checked while preparing and on every load).
Labels: the 14 findings in NIH order, then "No Finding" (set exactly when the row says so).
Configs: `"<size>"` keeps every view; `"<size>_pa"` / `"<size>_ap"` keep one view position.
Images are centre-cropped to a square (NIH images are nearly square already) and resized with
area + Lanczos resampling at prepare time.
"""

from __future__ import annotations

import csv
import io
import dataclasses

import numpy as np
from etils import epath

from xray_dit.data import DataError, splits
from xray_dit.data.builders import common

FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
            "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
NO_FINDING = "No Finding"
LABELS = FINDINGS + (NO_FINDING,)

# The 2017 release and the 2020 revision (`Data_Entry_2017_v2020.csv`) agree on these first seven
# columns; they differ after them (the 2017 header splits "OriginalImage[Width,Height]" into two
# fields and ends with an empty column), so rows are read by position after checking these names.
_LEADING_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                    "Patient Gender", "View Position")
_CSV_NAMES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
_VIEWS = ("all", "PA", "AP")
SIZES = (64, 128, 224, 256, 512, 1024)


@dataclasses.dataclass(eq=False)
class NihConfig(common.CxrConfig):
    view: str = "all"                  # "all" | "PA" | "AP"
    validation_fraction: float = 0.1   # of train_val's patients
    split_seed: int = 0

    def __post_init__(self):
        if self.view not in _VIEWS:
            raise ValueError(f"NIH view must be one of {_VIEWS}, got {self.view!r}")


def _configs() -> list[NihConfig]:
    configs = []
    for size in SIZES:
        configs.append(NihConfig(name=str(size), size=size, description=f"{size}x{size}, all views"))
        for view in ("PA", "AP"):
            configs.append(NihConfig(name=f"{size}_{view.lower()}", size=size, view=view,
                                     description=f"{size}x{size}, {view} views only"))
    return configs


def read_data_entry(path: epath.Path) -> list[dict[str, str]]:
    """Rows of `Data_Entry_2017.csv` (either header variant) as dicts of the seven leading columns."""
    with io.TextIOWrapper(path.open("rb"), encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        if tuple(h.strip() for h in header[:len(_LEADING_COLUMNS)]) != _LEADING_COLUMNS:
            raise DataError(f"{path}: unexpected header {header}; expected it to start with "
                             f"{list(_LEADING_COLUMNS)} (the 2017 or the 2020 NIH label table)")
        return [dict(zip(_LEADING_COLUMNS, (v.strip() for v in row))) for row in reader if row]


def _index_images(root: epath.Path) -> dict[str, epath.Path]:
    """File name → path over `images/` and the twelve `images_0NN/images/` folders of the download."""
    folders = [root / "images", *sorted(root.glob("images_*/images")), *sorted(root.glob("images_*"))]
    found: dict[str, epath.Path] = {}
    for folder in folders:
        if folder.is_dir():
            for path in folder.iterdir():
                if path.suffix.lower() == ".png":
                    found.setdefault(path.name, path)
    return found


def _patient_id(raw: str) -> str:
    """'00061' and '61' are the same NIH patient."""
    raw = raw.strip()
    return str(int(raw)) if raw.isdigit() else raw


def _read_list(path: epath.Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


class NihChestxray14(common.CxrBuilder):
    """NIH ChestX-ray14 as PNG at one resolution; see the module docstring for splits and labels."""

    name = "nih_chestxray14"
    LABELS = LABELS
    BUILDER_CONFIGS = _configs()
    DEFAULT_CONFIG_NAME = "256"
    DESCRIPTION = "NIH ChestX-ray14: frontal chest radiographs with 14 NLP-mined finding labels."
    HOMEPAGE = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
    CITATION = ("Wang et al., ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks on "
                "Weakly-Supervised Classification and Localization of Common Thorax Diseases, CVPR 2017.")
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    From https://nihcc.app.box.com/v/ChestXray-NIHCC download into one folder (the manual_dir):
      Data_Entry_2017.csv (or Data_Entry_2017_v2020.csv), train_val_list.txt, test_list.txt,
      and images_001.tar.gz ... images_012.tar.gz extracted there, giving
      images_001/images/*.png ... images_012/images/*.png (a single images/ folder also works).
    """

    def _split_generators(self, dl_manager):
        config: NihConfig = self.builder_config
        root = self.manual_path(dl_manager)
        csv_path = self.require_file([root / name for name in _CSV_NAMES], "the label table Data_Entry_2017.csv")
        train_val = _read_list(self.require_file([root / "train_val_list.txt"], "train_val_list.txt"))
        test = _read_list(self.require_file([root / "test_list.txt"], "test_list.txt"))
        images = _index_images(root)
        if not images:
            raise common.ManualDataMissingError(self.missing_message(
                f"{root}/images and {root}/images_*/images", "any PNG image"))

        rows_by_split: dict[str, list[common.ImageRow]] = {"train": [], "validation": [], "test": []}
        official: dict[str, list[dict[str, str]]] = {"train_val": [], "test": []}
        for row in read_data_entry(csv_path):
            image_id = row.get("Image Index", "")
            if image_id in test:
                official["test"].append(row)
            elif image_id in train_val:
                official["train_val"].append(row)
            # Rows in neither official list are not part of any split; the full release has none.

        validation_patients = splits.carve_validation_patients(
            (_patient_id(r.get("Patient ID", "")) for r in official["train_val"]),
            config.validation_fraction, config.split_seed)
        for group, rows in official.items():
            for row in rows:
                image_id = row["Image Index"]
                if group == "test":
                    split = "test"
                else:
                    patient = _patient_id(row.get("Patient ID", ""))
                    split = "validation" if patient in validation_patients else "train"
                if config.view != "all" and row.get("View Position", "").upper() != config.view:
                    continue
                example = self._example(row)
                if isinstance(example, str):
                    self.record_bad_row(split, image_id, str(root), example)
                    continue
                path = images.get(image_id)
                rows_by_split[split].append(common.ImageRow(
                    key=image_id, path=str(path) if path else str(root / "images" / image_id), example=example))

        splits.check_patient_disjoint(
            {s: (r.example["patient_id"] for r in rows) for s, rows in rows_by_split.items()},
            dataset=f"{self.name}/{config.name}")
        # A split with no rows at all (e.g. validation_fraction=0) is left out rather than written empty.
        return {split: self._generate_examples(split, rows) for split, rows in rows_by_split.items() if rows}

    def _example(self, row: dict[str, str]) -> dict | str:
        """The non-image features of a CSV row, or the reason the row is unusable."""
        missing = [c for c in _LEADING_COLUMNS if not row.get(c)]
        if missing:
            return f"row has no value for {missing}"
        findings = [f.strip() for f in row["Finding Labels"].split("|") if f.strip()]
        unknown = [f for f in findings if f not in LABELS]
        if unknown:
            return f"unknown finding label(s) {unknown}"
        labels = common.multi_hot(findings, LABELS)
        return {
            "image_id": row["Image Index"],
            "patient_id": _patient_id(row["Patient ID"]),
            "labels": labels,
            "label_mask": np.ones_like(labels),
            "age": common.parse_age(row["Patient Age"]),
            "sex": common.normalise_sex(row["Patient Gender"]),
            "view": row["View Position"].upper(),
        }
