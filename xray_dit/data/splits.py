"""Patient-level split safety: carving a validation split by patient, refusing leaked patients, and
the per-split metadata table (image id, patient id, labels per record index).

A patient whose images sit in two splits makes every held-out metric optimistic (the model has
seen that chest) and breaks the privacy study (a "held-out" neighbour is the same person), so the
check runs when a dataset is prepared and again every time the pipeline loads one.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Sequence

import numpy as np

from xray_dit.data import DataError

# How many leaked patients an error message lists before summarising the rest as a count.
_MAX_LISTED = 20


class PatientLeakError(DataError):
    """The same patient appears in more than one split."""


def check_patient_disjoint(patients_by_split: Mapping[str, Iterable[str]], *, dataset: str = "dataset") -> None:
    """Raises `PatientLeakError` naming every patient found in two or more splits (and which splits)."""
    splits_of: dict[str, list[str]] = {}
    for split, patients in patients_by_split.items():
        for patient in set(patients):
            splits_of.setdefault(patient, []).append(split)
    leaked = {p: sorted(s) for p, s in splits_of.items() if len(s) > 1}
    if not leaked:
        return
    listed = sorted(leaked)[:_MAX_LISTED]
    names = "; ".join(f"{p}: {', '.join(leaked[p])}" for p in listed)
    more = f"; and {len(leaked) - len(listed)} more" if len(leaked) > len(listed) else ""
    raise PatientLeakError(
        f"{dataset}: {len(leaked)} patient(s) appear in more than one split, which would leak patients between "
        f"training and evaluation ({names}{more}). Re-prepare the dataset (its split lists or CSVs are "
        "inconsistent) or fix the split assignment.")


def carve_validation_patients(patient_ids: Iterable[str], fraction: float, seed: int) -> frozenset[str]:
    """Picks round(fraction × #patients) patients (at least one when fraction > 0) for validation.

    Patients are sorted before the seeded permutation, so the result depends only on the set of
    patients, the fraction and the seed, never on row order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    patients = np.array(sorted(set(patient_ids)), dtype=object)
    if fraction == 0.0 or len(patients) == 0:
        return frozenset()
    if len(patients) < 2:
        raise DataError(f"cannot carve a validation split by patient out of {len(patients)} patient(s); "
                        "set the validation fraction to 0 or provide more patients")
    count = min(len(patients) - 1, max(1, round(fraction * len(patients))))
    chosen = np.random.default_rng(seed).permutation(len(patients))[:count]
    return frozenset(patients[chosen].tolist())


@dataclasses.dataclass(frozen=True)
class MetadataTable:
    """Per-record facts of one split (or of a synthetic folder), indexed like the records themselves.

    The pipeline's batches carry only numbers; a batch's `index` (with `is_synthetic`) maps back
    to image and patient ids through the table of the source the record came from.
    """
    label_names: tuple[str, ...]
    image_id: np.ndarray      # (N,) str
    patient_id: np.ndarray    # (N,) str; "" for synthetic images
    labels: np.ndarray        # (N, L) float32 multi-hot over label_names
    label_mask: np.ndarray    # (N, L) float32, 1 = known
    age: np.ndarray           # (N,) float32, -1 = unknown
    sex: np.ndarray           # (N,) str
    view: np.ndarray          # (N,) str

    def __len__(self) -> int:
        return len(self.image_id)

    def label_columns(self, names: Sequence[str]) -> np.ndarray:
        """Column indices of `names` in this table's labels, or a ValueError listing the known names."""
        unknown = [n for n in names if n not in self.label_names]
        if unknown:
            raise DataError(f"unknown label(s) {unknown}; this dataset's labels are {list(self.label_names)} "
                            "(--config.data.labels=...)")
        return np.array([self.label_names.index(n) for n in names], dtype=np.int64)

    def take(self, indices: np.ndarray) -> MetadataTable:
        """The records at `indices`, in that order."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[indices] for f in dataclasses.fields(self)
                                            if f.name != "label_names"})

    @staticmethod
    def concatenate(tables: Sequence[MetadataTable]) -> MetadataTable:
        """The records of `tables` one after another; they must share their label names."""
        if not tables:
            raise ValueError("nothing to concatenate: no tables given")
        names = {t.label_names for t in tables}
        if len(names) > 1:
            raise ValueError(f"tables with different label names cannot be concatenated: {sorted(names)}")
        return dataclasses.replace(tables[0], **{f.name: np.concatenate([getattr(t, f.name) for t in tables])
                                                 for f in dataclasses.fields(MetadataTable) if f.name != "label_names"})

    def positives(self, name: str) -> np.ndarray:
        """Indices of the records known to be positive for `name`."""
        column = self.label_columns([name])[0]
        return np.flatnonzero((self.labels[:, column] == 1) & (self.label_mask[:, column] == 1))


def target_fraction_patients(table: MetadataTable, target_class: str, fraction: float, seed: int) -> np.ndarray:
    """Record indices of a training table kept when only `fraction` of the target class's patients remain.

    Simulates scarcity of the finding: of the patients with at least one image known positive for
    `target_class`, round(fraction × #patients) (at least one when fraction > 0) are kept and the others
    leave with *all* their images, negatives included. Whole patients go because a site with fewer
    such patients would not hold their other images either, because a patient's images are correlated
    (keeping the negatives would keep most of that chest in training), and because a follow-up image of a
    patient with, say, cardiomegaly is often a mislabelled negative. Patients never positive for the
    target (uncertain labels included) are all kept. Validation and test are not this function's
    business: pass the training table only, and evaluate on the untouched other splits.

    The choice depends only on the set of positive patients, the fraction and the seed (patients are
    sorted before the seeded permutation), and for one seed a smaller fraction keeps a subset of the
    patients a larger one keeps, so a dose-response over fractions is nested.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction of target patients to keep must lie in [0, 1], got {fraction}")
    patients = np.array(sorted(set(table.patient_id[table.positives(target_class)].tolist())), dtype=object)
    count = round(fraction * len(patients))
    if fraction > 0 and len(patients):
        count = max(1, count)
    dropped = patients[np.random.default_rng(seed).permutation(len(patients))[count:]]
    return np.flatnonzero(~np.isin(table.patient_id.astype(str), dropped.astype(str)))
