"""The Grain input pipeline: prepared array_record → decoded, augmented, batched numpy → global arrays.

    prepared split (tfds data source, PNG bytes)     [+ synthetic folder (SyntheticSource)]
      → the split's rows (train: only `target_fraction` of the target class's patients, the scarcity axis)
      → epoch plan: which rows, in which order (class filter, balancing, mixing, seeded shuffle; train:
        real rows read from the round-trip store with `roundtrip_prob`, see `xray_dit.data.roundtrip`)
      → this process's share (process_index :: process_count)
      → read + decode PNG → (train) augment → float32 in [-1, 1], (H, W, 1)
      → batch of batch_size / process_count → [mp_prefetch workers]
      → numpy batches; `sharding.host_to_global(batch, mesh)` makes them sharded global arrays

A batch holds numeric arrays only:
    image         (B, H, W, 1) float32 in [-1, 1]
    labels        (B, L) float32 multi-hot over the chosen labels (config `labels`, in that order)
    label_mask    (B, L) float32, 1 = known
    index         (B,) int32: row of its source's table (`metadata_table(...)` or the synthetic table)
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

import dataclasses
import io
import math
import os
from typing import Any, Sequence

import grain
import jax
import numpy as np
from absl import logging
from PIL import Image

from xray_dit.data import DataError, augment, builders, roundtrip, split_rows, splits
from xray_dit.data.builders import common
from xray_dit.data.data_config import DataConfig
from xray_dit.data.synthetic import MANIFEST, SyntheticSource

# Entry kinds of the epoch plan: (kind, index) pairs. _ROUNDTRIP is a real image read from the round-trip store.
_REAL, _SYNTHETIC, _PADDING, _ROUNDTRIP = 0, 1, 2, 3


def metadata_table(config: Any, split: str, *, data_dir: str | os.PathLike | None = None) -> splits.MetadataTable:
    """Image id, patient id, labels, age, sex, view of every image of `split` the pipeline reads, by the
    `index` its batches carry (`split_rows`: the split file's split, thinned by `target_fraction` on train)."""
    cfg = DataConfig.from_config(config)
    builder = split_rows.load_builder(cfg, data_dir=data_dir)
    split_rows.require_split(builder, split, cfg.split_file)
    return split_rows.split_rows(builder, split, cfg)[0]


# ---- The epoch plan ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _EpochPlan:
    """Which (kind, index) entries an epoch holds and in which order; a pure function of the epoch."""
    real: np.ndarray                          # table indices of the real images in play
    groups: tuple[np.ndarray, ...] | None     # balanced sampling: table indices per class group
    synthetic: np.ndarray                     # synthetic indices included in every epoch
    shuffle: bool
    seed: int
    pad_to: int                               # pad each epoch to a multiple of this (evaluation)
    roundtrip_prob: float = 0.0               # chance a real entry reads its stored round trip instead

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
        swap = roundtrip.swap_mask(self.seed, epoch, len(entries), self.roundtrip_prob)
        entries[swap & (entries[:, 0] == _REAL), 0] = _ROUNDTRIP
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
    """(kind, index) → image (H, W) uint8 and the numeric fields.

    A real entry's index is its row in the split's table; `records` maps rows to the prepared records
    (they differ when the train split is thinned). A round-trip entry is the same row read from the
    round-trip store, with the real image's labels.
    """

    def __init__(self, real_source, real_labels, real_mask, synthetic: SyntheticSource | None,
                 synthetic_labels, synthetic_mask, size: int, *, records: np.ndarray,
                 roundtrip_source: roundtrip.RoundtripSource | None = None):
        self._real_source, self._records = real_source, records
        self._real_labels, self._real_mask = real_labels, real_mask
        self._synthetic = synthetic
        self._synthetic_labels, self._synthetic_mask = synthetic_labels, synthetic_mask
        self._roundtrip = roundtrip_source
        self._size = size

    def map(self, entry: np.ndarray) -> dict[str, np.ndarray]:
        kind, index = int(entry[0]), int(entry[1])
        if kind == _PADDING:
            num_labels = self._real_labels.shape[1]
            return {"image": np.zeros((self._size, self._size), np.uint8),
                    "labels": np.zeros(num_labels, np.float32), "label_mask": np.zeros(num_labels, np.float32),
                    "index": np.int32(-1), "is_synthetic": np.int32(0), "valid": np.int32(0)}
        if kind == _REAL:
            gray = _decode_png(self._real_source[int(self._records[index])]["image"])
        else:
            source = self._synthetic if kind == _SYNTHETIC else self._roundtrip
            gray = self._decode_file(source, index, "synthetic" if kind == _SYNTHETIC else "round-trip")
            if gray.shape != (self._size, self._size):  # generated at another resolution
                gray = common.center_square_resize(gray, self._size)
        if kind == _SYNTHETIC:
            labels, mask = self._synthetic_labels[index], self._synthetic_mask[index]
        else:
            labels, mask = self._real_labels[index], self._real_mask[index]
        return {"image": gray, "labels": labels, "label_mask": mask, "index": np.int32(index),
                "is_synthetic": np.int32(kind == _SYNTHETIC), "valid": np.int32(1)}

    @staticmethod
    def _decode_file(source, index: int, what: str) -> np.ndarray:
        # Prepared records were decoded once already; a folder is whatever someone put there, and PIL's own
        # error names neither the file nor the folder.
        try:
            return _decode_png(source[index]["image"])
        except (OSError, SyntaxError, ValueError) as e:
            path = source.folder / source.files[index]
            raise common.BadImageError(
                f"{what} image {path} cannot be decoded ({type(e).__name__}: {e}); regenerate it (delete it "
                f"and rerun the task that wrote {source.folder}) or remove its row from "
                f"{source.folder / MANIFEST}") from e


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
    The train split (train=True or not) holds only `config.target_fraction` of the target class's
    patients; a train=True pipeline reads each real image from `config.roundtrip_dir` with probability
    `config.roundtrip_prob` (per example and epoch; synthetic images never).
    """
    cfg = DataConfig.from_config(config)
    builder = split_rows.load_builder(cfg, data_dir=data_dir)
    split_rows.require_split(builder, split, cfg.split_file)
    split_rows.check_dataset(builder, cfg.split_file)
    table, records = split_rows.split_rows(builder, split, cfg)
    label_names = cfg.labels or table.label_names
    columns = table.label_columns(label_names)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} must be a positive multiple of the {process_count} processes")
    local_batch = batch_size // process_count
    what = f"{split_rows.name(builder)} {split}" + (f" (as split by {cfg.split_file})" if cfg.split_file else "")

    real = _real_rows(table, only_class, what)
    groups = None
    if train and cfg.balanced_sampling:
        groups = _class_groups(table, columns, real, label_names, what)

    source, synthetic_indices = _synthetic_rows(synthetic, table.label_names, len(real), synthetic_count,
                                                synthetic_ratio, seed)

    roundtrip_prob = cfg.roundtrip_prob if train else 0.0
    plan = _EpochPlan(real=real, groups=groups, synthetic=synthetic_indices, shuffle=train, seed=seed,
                      pad_to=1 if train else batch_size, roundtrip_prob=roundtrip_prob)
    if train and plan.unpadded_length < batch_size:
        raise DataError(f"{what} has {plan.unpadded_length} images after filtering/mixing, fewer than one "
                        f"global batch of {batch_size}; lower the batch size or add data")

    ds: grain.MapDataset = _PlannedEntries(plan)
    epochs = num_epochs if num_epochs is not None else (None if train else 1)
    if epochs != 1:
        ds = ds.repeat(epochs)
    ds = ds[process_index::process_count]
    ds = ds.map(_decoder(builder, split, cfg, table, columns, records, source, roundtrip_prob))
    if train:
        # Different processes hold different images at the same position: give them different draws.
        ds = ds.random_map(augment.Augment(cfg.augment), seed=int(np.random.default_rng([seed, process_index])
                                                                .integers(2**31)))
    else:
        ds = ds.map(augment.ToFloat())
    ds = ds.batch(local_batch, drop_remainder=train)
    iter_ds = _to_iter_dataset(ds, cfg.num_workers if num_workers is None else num_workers)
    logging.info("%s: %d real (%.0f %% round-tripped) + %d synthetic images per epoch, local batch %d, %s", what,
                 len(real), 100 * roundtrip_prob, len(synthetic_indices), local_batch, "train" if train else "eval")
    return iter_ds


def _synthetic_rows(synthetic: SyntheticSource | str | os.PathLike | None, label_names: Sequence[str],
                    real_count: int, synthetic_count: int | None, synthetic_ratio: float | None,
                    seed: int) -> tuple[SyntheticSource | None, np.ndarray]:
    """The synthetic source to mix in (None without a folder) and which of its images an epoch reads."""
    if synthetic is None:
        if synthetic_count is not None or synthetic_ratio is not None:
            raise ValueError("synthetic_count/synthetic_ratio given without a synthetic folder")
        return None, np.zeros(0, np.int64)
    source = synthetic if isinstance(synthetic, SyntheticSource) else SyntheticSource(synthetic, label_names)
    return source, _choose_synthetic(len(source), real_count, synthetic_count, synthetic_ratio, seed)


def _decoder(builder, split: str, cfg: DataConfig, table: splits.MetadataTable, columns: np.ndarray,
             records: np.ndarray, source: SyntheticSource | None, roundtrip_prob: float) -> _ReadAndDecode:
    """The map from a planned entry to its decoded example, with the label columns asked for: the real record
    (or its stored round trip, where `roundtrip_prob` > 0) or the synthetic image."""
    return _ReadAndDecode(
        split_rows.record_source(builder, split, cfg.split_file),
        table.labels[:, columns], table.label_mask[:, columns],
        source, None if source is None else source.labels[:, columns],
        None if source is None else source.label_mask[:, columns], builders.image_size(builder),
        records=records,
        roundtrip_source=roundtrip.RoundtripSource(cfg.roundtrip_dir, table.image_id) if roundtrip_prob else None)


def _real_rows(table: splits.MetadataTable, only_class: str | None, what: str) -> np.ndarray:
    """The table's rows a pipeline reads: all, or only those known positive for `only_class`."""
    if only_class is None:
        return np.arange(len(table), dtype=np.int64)
    real = table.positives(only_class)
    if not len(real):
        raise DataError(f"{what} has no image known positive for {only_class!r}; nothing to train on. "
                        f"Positives per label: {_positive_counts(table)}")
    return real


def _to_iter_dataset(ds: grain.MapDataset, workers: int) -> grain.IterDataset:
    """Reads with a few threads, and decodes in `workers` processes when there are any."""
    threads = max(1, min(4, os.cpu_count() or 1))
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))
    if workers > 0:
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter_ds


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
        raise DataError(f"{what}: balanced sampling found no class with any image")
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
