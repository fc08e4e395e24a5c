"""Which images a split holds: the prepared split, or a split redrawn by a split file, and on the train
split the scarcity axis (`target_fraction`). Every reader of a split (tables and batches) goes through
`split_rows`, so all of them see the same images.

A split file (`config.data.split_file`) is a CSV with the columns `image_id,split`: it assigns images of
the prepared dataset, from whichever prepared split they are in, to the splits a run reads (e.g. the folds
of a cross-validation). Images it does not list are not read at all. Within a split, records keep the
prepared order (prepared split by prepared split, record index within each), so a split's record index
is a position in that order. The drawn splits are checked for patients in two of them like prepared ones.
"""

from __future__ import annotations

import csv
import os
from typing import Any, Mapping

import numpy as np
import tensorflow_datasets as tfds

from xray_dit.data import DataError, builders, splits
from xray_dit.data.data_config import DataConfig


def name(builder: tfds.core.DatasetBuilder) -> str:
    return f"{builder.name}/{builder.builder_config.name}"


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
        raise DataError(f"config.data.image_size={cfg.image_size} but {name(builder)} holds {size}x{size} "
                        "images; choose the builder config of that size (--config.data.builder_config=...)")
    return builder


def _name(builder: tfds.core.DatasetBuilder) -> str:
    return f"{builder.name}/{builder.builder_config.name}"


def read_table(builder: tfds.core.DatasetBuilder, split: str) -> splits.MetadataTable:
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
    tables = {split: read_table(builder, split) for split in builder.info.splits}
    splits.check_patient_disjoint({s: t.patient_id for s, t in tables.items()}, dataset=name(builder))
    if split_file:
        drawn = {split: split_file_table(builder, split, split_file) for split in split_names(builder, split_file)}
        splits.check_patient_disjoint({s: t.patient_id for s, t in drawn.items()},
                                      dataset=f"{name(builder)} as split by {split_file}")


def require_split(builder: tfds.core.DatasetBuilder, split: str, split_file: str = "") -> None:
    names = split_names(builder, split_file)
    if split not in names:
        where = f" as split by {split_file}" if split_file else ""
        raise DataError(f"{name(builder)}{where} has no split {split!r}; it has {names}")


def split_rows(builder: tfds.core.DatasetBuilder, split: str,
               cfg: DataConfig) -> tuple[splits.MetadataTable, np.ndarray]:
    """The split as every reader sees it: its table, and for each of the table's rows its position in
    `record_source(...)`.

    The one place the scarcity axis applies: the train split keeps `target_fraction` of the target
    class's patients (`splits.target_fraction_patients`); validation and test are always whole.
    """
    table = split_file_table(builder, split, cfg.split_file)
    if split != "train" or cfg.target_fraction >= 1.0:
        return table, np.arange(len(table), dtype=np.int64)
    records = splits.target_fraction_patients(table, cfg.target_class, cfg.target_fraction,
                                              cfg.target_fraction_seed)
    return table.take(records), records.astype(np.int64)


def record_source(builder: tfds.core.DatasetBuilder, split: str, split_file: str):
    """The split's records as one indexable source (PNG bytes undecoded), in `split_rows`' positions."""
    if split_file:
        return RecordSource(builder, split, split_file)
    return builder.as_data_source(split=split, decoders=builders.SKIP_IMAGE_DECODING)


# ---- Splits redrawn by a split file --------------------------------------------------------------

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
        raise DataError(f"split file {path}: the header must be {','.join(SPLIT_FILE_COLUMNS)}, "
                         f"got {rows[0] if rows else 'an empty file'}")
    split_of: dict[str, str] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"split file {path}, line {number}: expected image_id,split, got {row}")
        image_id, split = row[0].strip(), row[1].strip()
        if image_id in split_of:
            raise DataError(f"split file {path}, line {number}: image {image_id!r} is listed twice")
        split_of[image_id] = split
    _SPLIT_FILE_CACHE[key] = split_of
    return split_of


def split_names(builder: tfds.core.DatasetBuilder, split_file: str) -> list[str]:
    if not split_file:
        return list(builder.info.splits)
    return sorted(set(read_split_file(split_file).values()))


def _split_members(builder: tfds.core.DatasetBuilder, split: str, split_file: str) -> list[tuple[str, np.ndarray]]:
    """The records of `split`: (prepared split, record indices in it) pairs, in the prepared order."""
    if not split_file:
        return [(split, np.arange(len(read_table(builder, split)), dtype=np.int64))]
    split_of = read_split_file(split_file)
    members, found = [], 0
    for prepared in builder.info.splits:
        image_ids = read_table(builder, prepared).image_id
        assigned = np.array([split_of.get(i) for i in image_ids], dtype=object)
        members.append((prepared, np.flatnonzero(assigned == split).astype(np.int64)))
        found += int(np.sum(assigned != None))  # noqa: E711 (element-wise)
    if found < len(split_of):
        known = {i for prepared in builder.info.splits for i in read_table(builder, prepared).image_id}
        unknown = sorted(set(split_of) - known)
        raise DataError(f"split file {split_file} lists {len(unknown)} image(s) that {name(builder)} does not hold, "
                         f"e.g. {unknown[:5]}; was it written for another dataset or builder config?")
    return [(prepared, indices) for prepared, indices in members if len(indices)]


def split_file_table(builder: tfds.core.DatasetBuilder, split: str, split_file: str) -> splits.MetadataTable:
    """The table of `split`, prepared or drawn by the split file, in record order."""
    if not split_file:
        return read_table(builder, split)
    parts = [read_table(builder, prepared).take(indices)
             for prepared, indices in _split_members(builder, split, split_file)]
    return splits.MetadataTable.concatenate(parts)


class RecordSource:
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
