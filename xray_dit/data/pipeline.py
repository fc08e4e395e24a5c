"""The Grain input pipeline: prepared array_record → decoded, augmented, batched numpy → global arrays.

    prepared split (tfds data source, PNG bytes)     [+ synthetic folder (SyntheticSource)]
      → epoch plan: which records, in which order (class filter, balancing, mixing, seeded shuffle)
      → this process's share (process_index :: process_count)
      → read + decode PNG → (train) augment → float32 in [-1, 1], (H, W, 1)
      → batch of batch_size / process_count → [mp_prefetch workers]
      → numpy batches; `to_global(batch, mesh)` makes them sharded global arrays

A batch holds numeric arrays only:
    image         (B, H, W, 1) float32 in [-1, 1]
    labels        (B, L) float32 multi-hot over the chosen labels (config `labels`, in that order)
    label_mask    (B, L) float32, 1 = known
    index         (B,) int32: record index in its source (`metadata_table(...)` or the synthetic table)
    is_synthetic  (B,) int32, 1 = from the synthetic folder
    valid         (B,) int32, 0 = padding (only in the last evaluation batch, so that every image
                  is evaluated exactly once however the batch divides the split)

Determinism: the order and the augmentation depend only on (seed, process index and count,
batch size, dataset), not on the number of worker processes (batches are formed before the
workers split the work). The iterator is a `grain.DatasetIterator`: checkpoint it with Orbax via
`grain.checkpoint.CheckpointSave/CheckpointRestore` (or `get_state`/`set_state`); a restored
iterator continues with exactly the batches the original would have produced.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from typing import Any, Mapping, Sequence

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from xray_dit import sharding
from xray_dit.data import builders, splits
from xray_dit.data.builders import common
from xray_dit.data.synthetic import MANIFEST, SyntheticSource

# Entry kinds of the epoch plan: (kind, index) pairs.
_REAL, _SYNTHETIC, _PADDING = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation; every magnitude 0 (and hflip False) is the identity."""
    rotation_deg: float = 5.0   # uniform in ±rotation_deg
    scale: float = 0.05         # zoom factor uniform in 1 ± scale
    translate: float = 0.03     # shift uniform in ±translate × image side, per axis
    brightness: float = 0.05    # additive shift uniform in ±brightness × the full intensity range
    contrast: float = 0.05      # factor uniform in 1 ± contrast, around the image mean
    hflip: bool = False         # off by default: a mirrored chest puts the heart on the wrong side


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `config.data` fields the pipeline reads (others, e.g. manual_dir, are ignored here)."""
    name: str                                # "nih_chestxray14" or "nih_chestxray14/256"
    builder_config: str = ""                 # e.g. "256"; "" = in the name or the builder's default
    data_dir: str = ""                       # where prepared datasets live
    image_size: int = 0                      # 0 = whatever was prepared; else must match it
    labels: tuple[str, ...] = ()             # () = all the dataset's labels
    balanced_sampling: bool = False
    num_workers: int = 0                     # Grain worker processes; 0 = this process
    augment: AugmentConfig = AugmentConfig()
    split_file: str = ""                     # "" = the prepared splits; else a CSV redrawing them (see below)

    @classmethod
    def from_config(cls, config: Any) -> DataConfig:
        """From a DataConfig, a mapping or an ml_collections.ConfigDict (e.g. `config.data`)."""
        if isinstance(config, DataConfig):
            return config
        values = _as_dict(config)
        if not values.get("name"):
            raise ValueError("the data config needs a dataset name (config.data.name)")
        augment = _as_dict(values.get("augment") or {})
        return cls(
            name=str(values["name"]),
            builder_config=str(values.get("builder_config") or ""),
            data_dir=os.fspath(values.get("data_dir") or ""),
            image_size=int(values.get("image_size") or 0),
            labels=tuple(values.get("labels") or ()),
            balanced_sampling=bool(values.get("balanced_sampling", False)),
            num_workers=int(values.get("num_workers") or 0),
            split_file=os.fspath(values.get("split_file") or ""),
            augment=AugmentConfig(**{f.name: augment[f.name] for f in dataclasses.fields(AugmentConfig)
                                     if f.name in augment}),
        )


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
        return config.to_dict()
    if dataclasses.is_dataclass(config):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    raise ValueError(f"expected a mapping, ConfigDict or dataclass as data config, got {type(config).__name__}")


# ---- Prepared datasets and their metadata tables ------------------------------------------------

# A split's table costs one read of all its records (images included: a record is read whole), so it
# is kept per process, keyed by the prepared files' identity.
_TABLE_CACHE: dict[tuple[str, int, str], splits.MetadataTable] = {}
_TABLE_READ_CHUNK = 1024


def load_builder(config: Any, *, data_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
    """The prepared dataset named by the data config (read-only), or a clear error saying how to prepare it."""
    cfg = DataConfig.from_config(config)
    builder = builders.load_prepared(cfg.name, cfg.builder_config or None, data_dir=data_dir or cfg.data_dir)
    size = builders.image_size(builder)
    if cfg.image_size and cfg.image_size != size:
        raise ValueError(f"config.data.image_size={cfg.image_size} but {_name(builder)} holds {size}x{size} "
                         "images; choose the builder config of that size")
    return builder


def _name(builder: tfds.core.DatasetBuilder) -> str:
    return f"{builder.name}/{builder.builder_config.name}"


def _read_table(builder: tfds.core.DatasetBuilder, split: str) -> splits.MetadataTable:
    info_file = builder.data_path / "dataset_info.json"
    key = (os.fspath(builder.data_path), os.stat(info_file).st_mtime_ns, split)
    if key in _TABLE_CACHE:
        return _TABLE_CACHE[key]
    source = builder.as_data_source(split=split, decoders=builders.SKIP_IMAGE_DECODING)
    columns: dict[str, list] = {k: [] for k in ("image_id", "patient_id", "labels", "label_mask", "age", "sex", "view")}
    for start in range(0, len(source), _TABLE_READ_CHUNK):
        for record in source.__getitems__(range(start, min(len(source), start + _TABLE_READ_CHUNK))):
            for k, values in columns.items():
                value = record[k]
                values.append(value.decode() if isinstance(value, bytes) else value)
    labels = builders.label_names(builder)
    text = {k: np.array(columns[k], dtype=object) for k in ("image_id", "patient_id", "sex", "view")}
    table = splits.MetadataTable(
        label_names=labels, **text,
        labels=np.array(columns["labels"], np.float32).reshape(-1, len(labels)),
        label_mask=np.array(columns["label_mask"], np.float32).reshape(-1, len(labels)),
        age=np.array(columns["age"], np.float32))
    _TABLE_CACHE[key] = table
    return table


def check_dataset(builder: tfds.core.DatasetBuilder, split_file: str = "") -> None:
    """No patient in two splits (`splits.PatientLeakError` naming them); runs on every pipeline load.

    With a split file, the splits it draws are checked too: they are what training and evaluation read.
    """
    tables = {split: _read_table(builder, split) for split in builder.info.splits}
    splits.check_patient_disjoint({s: t.patient_id for s, t in tables.items()},
                                  dataset=_name(builder))
    if split_file:
        drawn = {split: _table(builder, split, split_file) for split in _split_names(builder, split_file)}
        splits.check_patient_disjoint({s: t.patient_id for s, t in drawn.items()},
                                      dataset=f"{_name(builder)} as split by {split_file}")


def metadata_table(config: Any, split: str, *, data_dir: str | os.PathLike | None = None) -> splits.MetadataTable:
    """Image id, patient id, labels, age, sex, view of every record of `split`, by record index."""
    cfg = DataConfig.from_config(config)
    builder = load_builder(cfg, data_dir=data_dir)
    _require_split(builder, split, cfg.split_file)
    return _table(builder, split, cfg.split_file)


def lookup_ids(batch: Mapping[str, np.ndarray], table: splits.MetadataTable,
               synthetic_table: splits.MetadataTable | None = None) -> list[tuple[str, str]]:
    """(image_id, patient_id) of every valid element of a batch, via its `index` and `is_synthetic`."""
    ids = []
    for index, is_synthetic, valid in zip(batch["index"], batch["is_synthetic"], batch["valid"]):
        if not valid:
            continue
        source = table
        if is_synthetic:
            if synthetic_table is None:
                raise ValueError("the batch holds synthetic images; pass the synthetic source's table")
            source = synthetic_table
        ids.append((str(source.image_id[index]), str(source.patient_id[index])))
    return ids


def _require_split(builder: tfds.core.DatasetBuilder, split: str, split_file: str = "") -> None:
    names = _split_names(builder, split_file)
    if split not in names:
        where = f" as split by {split_file}" if split_file else ""
        raise ValueError(f"{_name(builder)}{where} has no split {split!r}; it has {names}")


# ---- Splits redrawn by a split file --------------------------------------------------------------
#
# A split file (`config.data.split_file`) is a CSV with the columns `image_id,split`: it assigns images of
# the prepared dataset, from whichever prepared split they are in, to the splits a run reads (e.g. the folds
# of a cross-validation). Images it does not list are not read at all. Within a split, records keep the
# prepared order (prepared split by prepared split, record index within each), so a split's record index
# is a position in that order. The drawn splits are checked for patients in two of them like prepared ones.

SPLIT_FILE_COLUMNS = ("image_id", "split")
_SPLIT_FILE_CACHE: dict[tuple[str, int], dict[str, str]] = {}


def write_split_file(path: str | os.PathLike, split_of: Mapping[str, str]) -> None:
    """Writes an image id → split assignment as a split file (rows sorted by image id)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(SPLIT_FILE_COLUMNS)
        writer.writerows(sorted(split_of.items()))


def read_split_file(path: str | os.PathLike) -> dict[str, str]:
    """A split file as image id → split; errors name the file and the offending rows."""
    key = (os.fspath(path), os.stat(path).st_mtime_ns)
    if key in _SPLIT_FILE_CACHE:
        return _SPLIT_FILE_CACHE[key]
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or tuple(h.strip() for h in rows[0]) != SPLIT_FILE_COLUMNS:
        raise ValueError(f"split file {path}: the header must be {','.join(SPLIT_FILE_COLUMNS)}, "
                         f"got {rows[0] if rows else 'an empty file'}")
    split_of: dict[str, str] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise ValueError(f"split file {path}, line {number}: expected image_id,split, got {row}")
        image_id, split = row[0].strip(), row[1].strip()
        if image_id in split_of:
            raise ValueError(f"split file {path}, line {number}: image {image_id!r} is listed twice")
        split_of[image_id] = split
    _SPLIT_FILE_CACHE[key] = split_of
    return split_of


def _split_names(builder: tfds.core.DatasetBuilder, split_file: str) -> list[str]:
    if not split_file:
        return list(builder.info.splits)
    return sorted(set(read_split_file(split_file).values()))


def _split_members(builder: tfds.core.DatasetBuilder, split: str, split_file: str) -> list[tuple[str, np.ndarray]]:
    """The records of `split`: (prepared split, record indices in it) pairs, in the prepared order."""
    if not split_file:
        return [(split, np.arange(len(_read_table(builder, split)), dtype=np.int64))]
    split_of = read_split_file(split_file)
    members, found = [], 0
    for prepared in builder.info.splits:
        image_ids = _read_table(builder, prepared).image_id
        assigned = np.array([split_of.get(i) for i in image_ids], dtype=object)
        members.append((prepared, np.flatnonzero(assigned == split).astype(np.int64)))
        found += int(np.sum(assigned != None))  # noqa: E711 (element-wise)
    if found < len(split_of):
        known = {i for prepared in builder.info.splits for i in _read_table(builder, prepared).image_id}
        unknown = sorted(set(split_of) - known)
        raise ValueError(f"split file {split_file} lists {len(unknown)} image(s) that {_name(builder)} does not hold, "
                         f"e.g. {unknown[:5]}; was it written for another dataset or builder config?")
    return [(prepared, indices) for prepared, indices in members if len(indices)]


def _table(builder: tfds.core.DatasetBuilder, split: str, split_file: str) -> splits.MetadataTable:
    if not split_file:
        return _read_table(builder, split)
    parts = [_read_table(builder, prepared).take(indices)
             for prepared, indices in _split_members(builder, split, split_file)]
    return splits.MetadataTable.concatenate(parts)


class _RecordSource:
    """The records of one split as a single indexable source, over one or more prepared splits.

    Picklable (it travels to mp_prefetch workers): it holds the TFDS data sources and index arrays only.
    """

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str, split_file: str):
        members = _split_members(builder, split, split_file)
        self._sources = [builder.as_data_source(split=prepared, decoders=builders.SKIP_IMAGE_DECODING)
                         for prepared, _ in members]
        self._where = np.concatenate(
            [np.stack([np.full(len(indices), part), indices], axis=1) for part, (_, indices) in enumerate(members)]
        ) if members else np.zeros((0, 2), np.int64)

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, index: int):
        part, record = self._where[index]
        return self._sources[part][int(record)]


# ---- The epoch plan ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _EpochPlan:
    """Which (kind, index) entries an epoch holds and in which order; a pure function of the epoch."""
    real: np.ndarray                          # record indices of the real images in play
    groups: tuple[np.ndarray, ...] | None     # balanced sampling: record indices per class group
    synthetic: np.ndarray                     # synthetic indices included in every epoch
    shuffle: bool
    seed: int
    pad_to: int                               # pad each epoch to a multiple of this (evaluation)

    @property
    def unpadded_length(self) -> int:
        return len(self.real) + len(self.synthetic)

    @property
    def length(self) -> int:
        return math.ceil(self.unpadded_length / self.pad_to) * self.pad_to

    def entries(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        real = self.real
        if self.groups is not None:
            # Each draw picks a class group uniformly, then an image of that group uniformly.
            choice = rng.integers(len(self.groups), size=len(self.real))
            real = np.empty(len(self.real), np.int64)
            for g, members in enumerate(self.groups):
                where = np.flatnonzero(choice == g)
                real[where] = members[rng.integers(len(members), size=len(where))]
        kinds = np.concatenate([np.full(len(real), _REAL), np.full(len(self.synthetic), _SYNTHETIC)])
        entries = np.stack([kinds, np.concatenate([real, self.synthetic])], axis=1).astype(np.int64)
        if self.shuffle:
            entries = entries[rng.permutation(len(entries))]
        padding = np.tile(np.array([[_PADDING, -1]], np.int64), (self.length - len(entries), 1))
        return np.concatenate([entries, padding])


class _PlannedEntries(grain.MapDataset):
    """The plan's entries; index e·length + i is entry i of epoch e (what `repeat` passes down)."""

    def __init__(self, plan: _EpochPlan):
        super().__init__()
        self._plan = plan
        # Two epochs, because reader threads straddle an epoch boundary for a few batches.
        self._epochs: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self._plan.length

    def __str__(self) -> str:
        return f"PlannedEntries(length={self._plan.length})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(index, self._plan.length)
        entries = self._epochs.get(epoch)
        if entries is None:  # threads may race here; they compute the same array
            entries = self._epochs[epoch] = self._plan.entries(epoch)
            for old in [e for e in list(self._epochs) if e < epoch - 1]:
                self._epochs.pop(old, None)
        return entries[position]


# ---- Per-element transforms (picklable: they travel to mp_prefetch workers) ----------------------


def _decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return common.to_gray_uint8(image)


class _ReadAndDecode(grain.transforms.Map):
    """(kind, index) → image (H, W) uint8 and the numeric fields."""

    def __init__(self, real_source, real_labels, real_mask, synthetic: SyntheticSource | None,
                 synthetic_labels, synthetic_mask, size: int):
        self._real_source = real_source
        self._real_labels, self._real_mask = real_labels, real_mask
        self._synthetic = synthetic
        self._synthetic_labels, self._synthetic_mask = synthetic_labels, synthetic_mask
        self._size = size

    def map(self, entry: np.ndarray) -> dict[str, np.ndarray]:
        kind, index = int(entry[0]), int(entry[1])
        if kind == _PADDING:
            num_labels = self._real_labels.shape[1]
            return {"image": np.zeros((self._size, self._size), np.uint8),
                    "labels": np.zeros(num_labels, np.float32), "label_mask": np.zeros(num_labels, np.float32),
                    "index": np.int32(-1), "is_synthetic": np.int32(0), "valid": np.int32(0)}
        if kind == _REAL:
            gray = _decode_png(self._real_source[index]["image"])
            labels, mask = self._real_labels[index], self._real_mask[index]
        else:
            gray = self._decode_synthetic(index)
            if gray.shape != (self._size, self._size):  # generated at another resolution
                gray = common.center_square_resize(gray, self._size)
            labels, mask = self._synthetic_labels[index], self._synthetic_mask[index]
        return {"image": gray, "labels": labels, "label_mask": mask, "index": np.int32(index),
                "is_synthetic": np.int32(kind == _SYNTHETIC), "valid": np.int32(1)}

    def _decode_synthetic(self, index: int) -> np.ndarray:
        # Prepared records were decoded once already; a synthetic folder is whatever someone put there, and
        # PIL's own error names neither the file nor the folder.
        try:
            return _decode_png(self._synthetic[index]["image"])
        except (OSError, SyntaxError, ValueError) as e:
            path = self._synthetic.folder / self._synthetic.files[index]
            raise common.BadImageError(
                f"synthetic image {path} cannot be decoded ({type(e).__name__}: {e}); regenerate it (delete it "
                f"and rerun the task that wrote {self._synthetic.folder}) or remove its row from "
                f"{self._synthetic.folder / MANIFEST}") from e


def _to_unit_range(gray: np.ndarray) -> np.ndarray:
    return (gray.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0))[..., None]


class _ToFloat(grain.transforms.Map):
    def map(self, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**element, "image": _to_unit_range(element["image"])}


class _Augment(grain.transforms.RandomMap):
    """Small affine jitter (rotation, zoom, shift) on the uint8 image, then brightness/contrast."""

    def __init__(self, config: AugmentConfig):
        self._config = config

    def random_map(self, element: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        cfg = self._config
        gray = element["image"]
        angle = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg))
        zoom = rng.uniform(1.0 - cfg.scale, 1.0 + cfg.scale)
        shift = rng.uniform(-cfg.translate, cfg.translate, size=2) * np.array(gray.shape[::-1])
        if angle or zoom != 1.0 or shift.any():
            gray = _affine(gray, angle, zoom, shift)
        if cfg.hflip and rng.random() < 0.5:
            gray = gray[:, ::-1]
        image = _to_unit_range(gray)
        contrast = rng.uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast)
        brightness = rng.uniform(-cfg.brightness, cfg.brightness) * 2.0  # the [-1, 1] range spans 2
        if contrast != 1.0 or brightness:
            mean = image.mean()
            image = np.clip((image - mean) * np.float32(contrast) + mean + np.float32(brightness), -1.0, 1.0)
        return {**element, "image": image.astype(np.float32)}


def _affine(gray: np.ndarray, angle: float, zoom: float, shift: np.ndarray) -> np.ndarray:
    """Rotates by `angle` and zooms by `zoom` about the centre, then shifts by `shift` (x, y) pixels.

    PIL's AFFINE maps output pixels back to input pixels, so it takes the inverse transform:
    in = c + R(-angle)/zoom · (out - c - shift).
    """
    height, width = gray.shape
    centre = np.array([width / 2.0, height / 2.0])
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    inverse = np.array([[cos, sin], [-sin, cos]])
    offset = centre - inverse @ (centre + shift)
    coefficients = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    image = Image.fromarray(gray, mode="L").transform((width, height), Image.Transform.AFFINE, coefficients,
                                                      resample=Image.Resampling.BILINEAR, fillcolor=0)
    return np.asarray(image, dtype=np.uint8)


# ---- The entry point ---------------------------------------------------------------------------


def make_dataset(config: Any, split: str, *, train: bool, seed: int, batch_size: int,
                 data_dir: str | os.PathLike | None = None,
                 only_class: str | None = None,
                 synthetic: SyntheticSource | str | os.PathLike | None = None,
                 synthetic_count: int | None = None,
                 synthetic_ratio: float | None = None,
                 num_epochs: int | None = None,
                 num_workers: int | None = None,
                 process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
    """The input pipeline of one split; `iter()` of the result is a checkpointable `grain.DatasetIterator`.

    config: `config.data` (ConfigDict, mapping or `DataConfig`): dataset, labels, augmentation, workers.
    train: shuffle every epoch, augment, balance classes if configured, repeat `num_epochs` times
        (None = forever), drop the incomplete last batch. Otherwise one pass in record order
        (`num_epochs` passes if given), no augmentation, the last batch padded (`valid` = 0).
    batch_size: the GLOBAL batch; each process yields batch_size / process_count.
    only_class: keep only images known positive for this label (the DiT learns one class).
    synthetic: a folder (or `SyntheticSource`) of generated images to mix in, either
        `synthetic_count` of them per epoch or `synthetic_ratio` × the real images per epoch (all of
        them if neither is given). The chosen subset is fixed by the seed; when more are asked for
        than exist, the folder is repeated.
    """
    cfg = DataConfig.from_config(config)
    builder = load_builder(cfg, data_dir=data_dir)
    _require_split(builder, split, cfg.split_file)
    check_dataset(builder, cfg.split_file)
    table = _table(builder, split, cfg.split_file)
    label_names = cfg.labels or table.label_names
    columns = table.label_columns(label_names)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} must be a positive multiple of the {process_count} processes")
    local_batch = batch_size // process_count
    what = f"{_name(builder)} {split}" + (f" (as split by {cfg.split_file})" if cfg.split_file else "")

    real = np.arange(len(table), dtype=np.int64)
    if only_class is not None:
        real = table.positives(only_class)
        if not len(real):
            raise ValueError(f"{what} has no image known positive for {only_class!r}; nothing to train on. "
                             f"Positives per label: {_positive_counts(table)}")
    groups = None
    if train and cfg.balanced_sampling:
        groups = _class_groups(table, columns, real, label_names, what)

    source = None
    synthetic_indices = np.zeros(0, np.int64)
    if synthetic is not None:
        source = synthetic if isinstance(synthetic, SyntheticSource) else SyntheticSource(synthetic, table.label_names)
        synthetic_indices = _choose_synthetic(len(source), len(real), synthetic_count, synthetic_ratio, seed)
    elif synthetic_count is not None or synthetic_ratio is not None:
        raise ValueError("synthetic_count/synthetic_ratio given without a synthetic folder")

    plan = _EpochPlan(real=real, groups=groups, synthetic=synthetic_indices, shuffle=train, seed=seed,
                      pad_to=1 if train else batch_size)
    if train and plan.unpadded_length < batch_size:
        raise ValueError(f"{what} has {plan.unpadded_length} images after filtering/mixing, fewer than one "
                         f"global batch of {batch_size}; lower the batch size or add data")

    ds: grain.MapDataset = _PlannedEntries(plan)
    epochs = num_epochs if num_epochs is not None else (None if train else 1)
    if epochs != 1:
        ds = ds.repeat(epochs)
    ds = ds[process_index::process_count]
    records = (_RecordSource(builder, split, cfg.split_file) if cfg.split_file
               else builder.as_data_source(split=split, decoders=builders.SKIP_IMAGE_DECODING))
    ds = ds.map(_ReadAndDecode(
        records,
        table.labels[:, columns], table.label_mask[:, columns],
        source, None if source is None else source.labels[:, columns],
        None if source is None else source.label_mask[:, columns], builders.image_size(builder)))
    if train:
        # Different processes hold different images at the same position: give them different draws.
        ds = ds.random_map(_Augment(cfg.augment), seed=int(np.random.default_rng([seed, process_index])
                                                                .integers(2**31)))
    else:
        ds = ds.map(_ToFloat())
    ds = ds.batch(local_batch, drop_remainder=train)

    workers = cfg.num_workers if num_workers is None else num_workers
    threads = max(1, min(4, os.cpu_count() or 1))
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))
    if workers > 0:
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    logging.info("%s: %d real + %d synthetic images per epoch, local batch %d, %s", what, len(real),
                 len(synthetic_indices), local_batch, "train" if train else "eval")
    return iter_ds


def to_global(batch: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This process's numpy batch → global arrays sharded over the mesh's batch axes."""
    return sharding.host_to_global(dict(batch), mesh)


def _positive_counts(table: splits.MetadataTable) -> dict[str, int]:
    known_positive = (table.labels == 1) & (table.label_mask == 1)
    return {name: int(n) for name, n in zip(table.label_names, known_positive.sum(axis=0))}


def _class_groups(table: splits.MetadataTable, columns: np.ndarray, real: np.ndarray,
                  label_names: Sequence[str], what: str) -> tuple[np.ndarray, ...]:
    """One group of record indices per chosen label (its known positives), plus "none of them"."""
    positive = (table.labels[real][:, columns] == 1) & (table.label_mask[real][:, columns] == 1)
    groups, empty = [], []
    for j, name in enumerate(label_names):
        members = real[positive[:, j]]
        (groups if len(members) else empty).append(members if len(members) else name)
    negatives = real[~positive.any(axis=1)]
    if len(negatives):
        groups.append(negatives)
    if empty:
        logging.warning("%s: balanced sampling skips label(s) without positives: %s", what, empty)
    if not groups:
        raise ValueError(f"{what}: balanced sampling found no class with any image")
    return tuple(groups)


def _choose_synthetic(available: int, num_real: int, count: int | None, ratio: float | None,
                      seed: int) -> np.ndarray:
    if count is not None and ratio is not None:
        raise ValueError("give synthetic_count or synthetic_ratio, not both")
    if ratio is not None:
        if ratio < 0:
            raise ValueError(f"synthetic_ratio must be >= 0, got {ratio}")
        count = round(ratio * num_real)
    count = available if count is None else count
    if count < 0:
        raise ValueError(f"synthetic_count must be >= 0, got {count}")
    repeats, rest = divmod(count, available)
    chosen = np.random.default_rng([seed, 0x5EED]).permutation(available)[:rest]
    return np.concatenate([np.tile(np.arange(available), repeats), np.sort(chosen)]).astype(np.int64)
