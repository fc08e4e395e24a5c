"""Generated images as a Grain source: a folder of PNGs plus `manifest.csv`.

Manifest columns: `file` (PNG path relative to the folder) and `label` (the class the image was
generated as; several as "A|B"; empty = none of the labels), then any others the generator wants
to keep (seed, guidance scale, filter scores, ...); extra columns are kept in `rows`.

Labels a manifest row does not name are negatives by default (`unlisted="negative"`: the DiT was
asked for that class only) or unknown (`unlisted="unknown"`: label_mask 0 for them).
"""

from __future__ import annotations

import csv
import os
from typing import Iterable, Mapping, Sequence

import numpy as np
from etils import epath

from xray_dit.data import DataError, splits
from xray_dit.data.builders import common

MANIFEST = "manifest.csv"
UNLISTED_POLICIES = ("negative", "unknown")
_MAX_LISTED = 20


def read_manifest(manifest: epath.Path, columns: Sequence[str], error: type[Exception]) -> list[dict[str, str]]:
    """The rows of a folder's manifest, refusing (with `error`) one that lacks any of `columns`."""
    with manifest.open() as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise error(f"{manifest}: missing column(s) {missing}; found {reader.fieldnames}")
        return list(reader)


class PngFolderSource:
    """Random access to the PNGs a manifest lists: `source[i]` → {"image": the bytes of `folder / files[i]`}."""

    folder: epath.Path
    files: list[str]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, bytes]:
        return {"image": (self.folder / self.files[index]).read_bytes()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.folder}, {len(self)} images)"


class SyntheticSource(PngFolderSource):
    """Random-access source over a synthetic folder: `source[i]` → {"image": PNG bytes, ...}."""

    def __init__(self, folder: str | os.PathLike, label_names: Sequence[str], *, unlisted: str = "negative"):
        if unlisted not in UNLISTED_POLICIES:
            raise ValueError(f"unlisted must be one of {UNLISTED_POLICIES}, got {unlisted!r}")
        self.folder = epath.Path(folder)
        self.label_names = tuple(label_names)
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            raise DataError(f"no {MANIFEST} in the synthetic folder {self.folder}; it needs columns "
                            "file,label (see xray_dit.data.synthetic.write_synthetic)")
        self.rows: list[dict[str, str]] = read_manifest(manifest, ("file", "label"), DataError)
        if not self.rows:
            raise DataError(f"{manifest} lists no images; regenerate the folder or point elsewhere")

        self.files = [row["file"] for row in self.rows]
        absent = [name for name in self.files if not (self.folder / name).is_file()]
        if absent:
            raise DataError(f"{len(absent)} file(s) listed in {manifest} do not exist: "
                            f"{absent[:_MAX_LISTED]}{' ...' if len(absent) > _MAX_LISTED else ''}. "
                            "Restore them (a rerun of the sample task regenerates missing images) or "
                            "remove their rows from the manifest")
        named = [[n.strip() for n in row["label"].split("|") if n.strip()] for row in self.rows]
        unknown = sorted({n for names in named for n in names} - set(self.label_names))
        if unknown:
            raise DataError(f"{manifest} uses label(s) {unknown} that the real dataset does not have; "
                            f"its labels are {list(self.label_names)}. Correct the manifest's label column "
                            "(several labels as 'A|B') or mix the folder into a dataset with those labels")
        self.labels = np.stack([common.multi_hot(names, self.label_names) for names in named])
        self.label_mask = np.ones_like(self.labels) if unlisted == "negative" else self.labels.copy()

    @property
    def table(self) -> splits.MetadataTable:
        count = len(self)
        return splits.MetadataTable(
            label_names=self.label_names, image_id=np.array(self.files, dtype=object),
            patient_id=np.full(count, "", dtype=object), labels=self.labels, label_mask=self.label_mask,
            age=np.full(count, common.UNKNOWN_AGE, np.float32), sex=np.full(count, "", dtype=object),
            view=np.full(count, "", dtype=object))


def write_synthetic(folder: str | os.PathLike, images: np.ndarray, labels: Sequence[str],
                    extra_columns: Mapping[str, Sequence] | None = None, *, prefix: str = "synthetic") -> epath.Path:
    """Writes images as `<prefix>_NNNNNN.png` plus `manifest.csv`; returns the manifest path.

    `images`: (N, H, W) or (N, H, W, 1), uint8, or float in [-1, 1] (the pipeline's convention),
    which is rounded to uint8. `labels`: one label string per image ("A" or "A|B").
    """
    images = to_uint8(images)
    extra_columns = dict(extra_columns or {})
    columns = {"label": labels, **extra_columns}
    for name, values in columns.items():
        if len(values) != len(images):
            raise ValueError(f"column {name!r} has {len(values)} values for {len(images)} images")
    rows = [{name: values[i] for name, values in columns.items()} for i in range(len(images))]
    return write_batches(folder, [(images, rows)], columns=tuple(columns), prefix=prefix)


def write_batches(folder: str | os.PathLike, batches: Iterable[tuple[np.ndarray, Sequence[Mapping[str, object]]]],
                  *, columns: Sequence[str], prefix: str) -> epath.Path:
    """`write_synthetic` one batch at a time (only one is ever in memory): (images, one row per image).

    Each row maps every name in `columns` ("label" among them) to its value; files are numbered on
    across batches.
    """
    if "label" not in columns:
        raise ValueError(f"a synthetic manifest needs a 'label' column; got columns {list(columns)}")
    folder = epath.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    listed = []
    for images, rows in batches:
        images = to_uint8(images)
        if len(rows) != len(images):
            raise ValueError(f"{len(rows)} manifest rows for {len(images)} images")
        for pixels, row in zip(images, rows):
            name = f"{prefix}_{len(listed):06d}.png"
            (folder / name).write_bytes(common.encode_png(pixels))
            listed.append([name, *(row[c] for c in columns)])
    # The manifest goes last and appears atomically: an interrupted write leaves no folder that loads. It
    # replaces an earlier manifest, as when a phase killed after writing is run again (epath's rename refuses).
    manifest = folder / MANIFEST
    partial = folder / (MANIFEST + ".partial")
    with partial.open("w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["file", *columns])
        writer.writerows(listed)
    partial.replace(manifest)
    return manifest


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, H, W) or (N, H, W, 1), uint8 or float in [-1, 1] (rounded, clipped) → (N, H, W) uint8."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, 1), got {images.shape}")
    if np.issubdtype(images.dtype, np.floating):
        return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 or float in [-1, 1], got {images.dtype}")
    return images
