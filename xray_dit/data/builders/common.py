"""What every chest X-ray builder shares: the feature schema, image conversion, bad-record accounting.

Every dataset is prepared once into array_record files holding each image as PNG bytes at the
configured square resolution. PNG bytes (not numpy arrays) are what lets TFDS write and read
these files without TensorFlow installed.

Common feature schema (one record per image):
  image       (S, S, 1) uint8, PNG-encoded, 8-bit gray
  image_id    text, unique within the dataset
  patient_id  text; no patient is in two splits
  labels      float32 multi-hot over the builder's `labels` (also in the prepared metadata)
  label_mask  float32, 1 = the label is known, 0 = unknown (e.g. CheXpert's "ignore" policy)
  age         float32 years, -1 = unknown
  sex         text "M" | "F" | "" (unknown)
  view        text "PA" | "AP" | "LATERAL" | ... | "" (unknown)
plus dataset extras (see each builder).
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import io
import multiprocessing
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from xray_dit.data import DataError

UNKNOWN_AGE = -1.0
# More bad rows than this (per split) means the download is damaged, not a few bad files.
MAX_BAD_FRACTION = 0.01
# How many bad rows the error of a damaged download names before summarising the rest as a count.
_MAX_LISTED = 10
REPORT_FILE = "prepare_report.tsv"
# Decoders that leave the PNG bytes alone: the pipeline decodes them itself (in its workers).
SKIP_IMAGE_DECODING = {"image": tfds.decode.SkipDecoding()}


class ManualDataMissingError(DataError):
    """The manually downloaded files are not where the builder looked."""


class TooManyBadRecordsError(DataError):
    """More than `MAX_BAD_FRACTION` of a split's rows had a missing or unreadable image."""


class BadImageError(DataError):
    """An image file that cannot be decoded (corrupt, truncated, unsupported)."""


# ---- Images ------------------------------------------------------------------------------------


def to_gray_uint8(image: Image.Image) -> np.ndarray:
    """Any PIL image → (H, W) uint8 gray.

    16-bit and 32-bit gray images (as some DICOM exports are) are stretched from their own
    min..max to 0..255: their stored range rarely fills the container (12 bits in 16 is common), so
    dividing by 65535 would give near-black radiographs. Colour and alpha are dropped by the
    standard luma conversion (radiographs saved as RGB carry the same value in every channel).
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
        return np.round(scaled).astype(np.uint8)
    if image.mode == "P":  # palette: go through RGB so the palette's colours are honoured
        image = image.convert("RGB")
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image, dtype=np.uint8)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPES = {2: "RGB", 4: "gray+alpha", 6: "RGBA"}   # IHDR colour type → name (0 is plain gray)


def _refuse_deep_colour_png(data: bytes) -> None:
    """Pillow reads a 16-bit colour PNG as 8 bits by keeping each sample's high byte, so a radiograph
    using 12 of its 16 bits would come out almost black with 16 gray levels; no Pillow mode keeps them.
    Refusing (the row is skipped and reported) beats training on silently crushed images."""
    if len(data) >= 26 and data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and data[24] == 16 \
            and data[25] in _PNG_COLOUR_TYPES:
        raise BadImageError(f"16-bit {_PNG_COLOUR_TYPES[data[25]]} PNG: Pillow can read it only as 8 bits, "
                            "which darkens it; save it as 16-bit grayscale (or 8-bit) and prepare again")


def decode_gray(data: bytes | str | os.PathLike) -> np.ndarray:
    """Reads an image file (path or bytes) → (H, W) uint8 gray; `BadImageError` if unreadable."""
    if not isinstance(data, bytes):
        try:
            with open(data, "rb") as f:
                data = f.read()
        except FileNotFoundError:   # reported as a missing file, not a bad one
            raise
        except OSError as e:        # no permission, a folder with an image's name, an I/O error
            raise BadImageError(f"{type(e).__name__}: {e}") from e
    _refuse_deep_colour_png(data)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes now, so truncation is detected here and not later
            return to_gray_uint8(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(f"{type(e).__name__}: {e}") from e


def center_square_resize(gray: np.ndarray, size: int) -> np.ndarray:
    """Centre-crops to a square (keeping the aspect ratio, i.e. not stretching) and resizes to size².

    Lanczos with `reducing_gap`: a large reduction first box-averages by an integer factor (area
    resampling, fast and alias-free), then finishes with Lanczos.
    """
    height, width = gray.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = gray[top:top + side, left:left + side]
    if side == size:
        return np.ascontiguousarray(square)
    image = Image.fromarray(square, mode="L")
    return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0), dtype=np.uint8)


def encode_png(gray: np.ndarray) -> bytes:
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"encode_png wants (H, W) uint8, got {gray.shape} {gray.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def load_square_png(path: str | os.PathLike | bytes, size: int) -> bytes:
    """Reads an image file, converts it to 8-bit gray, crops it square, resizes it, encodes PNG."""
    return encode_png(center_square_resize(decode_gray(path), size))


# ---- Features ----------------------------------------------------------------------------------


def cxr_features(size: int, num_labels: int,
                 extras: Mapping[str, tfds.features.FeatureConnector] | None = None) -> tfds.features.FeaturesDict:
    features = {
        "image": tfds.features.Image(shape=(size, size, 1), dtype=np.uint8, encoding_format="png"),
        "image_id": tfds.features.Text(),
        "patient_id": tfds.features.Text(),
        "labels": tfds.features.Tensor(shape=(num_labels,), dtype=np.float32),
        "label_mask": tfds.features.Tensor(shape=(num_labels,), dtype=np.float32),
        "age": tfds.features.Scalar(dtype=np.float32),
        "sex": tfds.features.Text(),
        "view": tfds.features.Text(),
    }
    clash = set(features) & set(extras or {})
    if clash:
        raise ValueError(f"dataset extras {sorted(clash)} clash with the common feature schema")
    features.update(extras or {})
    return tfds.features.FeaturesDict(features)


def multi_hot(names: Iterable[str], label_names: Sequence[str]) -> np.ndarray:
    vector = np.zeros(len(label_names), np.float32)
    for name in names:
        vector[label_names.index(name)] = 1.0
    return vector


def parse_age(text: str) -> float:
    """'58', '058Y' (the 2017 NIH CSV) → 58.0; empty, garbled or implausible (> 120) → UNKNOWN_AGE."""
    digits = text.strip().rstrip("YyMmDdWw")
    try:
        age = float(digits)
    except ValueError:
        return UNKNOWN_AGE
    return age if 0.0 <= age <= 120.0 else UNKNOWN_AGE


def normalise_sex(text: str) -> str:
    value = text.strip().upper()
    return {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}.get(value, "")


# ---- Bad-record accounting ---------------------------------------------------------------------


@dataclasses.dataclass
class PrepareReport:
    """Rows skipped while preparing (missing image, corrupt image, unusable row), per split.

    Written as a TSV (split, image_id, path, reason) beside the prepared data, inside the temporary
    directory TFDS renames on success, so a failed prepare leaves neither data nor report that
    look complete. The 1 % limit applies to the whole dataset (all splits' rows), checked after
    each split so that a damaged download fails early.
    """
    dataset: str
    rows: dict[str, int] = dataclasses.field(default_factory=dict)
    bad: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)  # split, id, path, why

    def expect(self, split: str, count: int) -> None:
        self.rows[split] = self.rows.get(split, 0) + count

    def add_bad(self, split: str, image_id: str, path: str, reason: str) -> None:
        self.bad.append((split, image_id, path, reason))

    def summary(self) -> dict[str, dict[str, int]]:
        bad = {split: sum(b[0] == split for b in self.bad) for split in self.rows}
        return {split: {"rows": n, "bad": bad[split], "written": n - bad[split]} for split, n in self.rows.items()}

    def write(self, directory: epath.PathLike) -> epath.Path:
        path = epath.Path(directory) / REPORT_FILE
        with path.open("w") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(("split", "image_id", "path", "reason"))
            writer.writerows(self.bad)
        return path

    def check(self) -> None:
        total = sum(self.rows.values())
        if total and len(self.bad) > MAX_BAD_FRACTION * total:
            listing = "; ".join(f"{split} {image_id} ({path}: {why})" for split, image_id, path, why
                                in self.bad[:_MAX_LISTED])
            more = f"; and {len(self.bad) - _MAX_LISTED} more" if len(self.bad) > _MAX_LISTED else ""
            raise TooManyBadRecordsError(
                f"{self.dataset}: {len(self.bad)} of {total} rows ({100.0 * len(self.bad) / total:.1f} %, more "
                f"than {100 * MAX_BAD_FRACTION:.0f} %) have a missing or unreadable image; the download looks "
                f"incomplete or damaged, so nothing was written. Download the missing files again and rerun. "
                f"Bad rows: {listing}{more}")


# ---- Row conversion, optionally in worker processes ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageRow:
    """One image to convert: everything but the pixels is already final."""
    key: str
    path: str
    example: dict[str, Any]  # all features except "image"


@dataclasses.dataclass(frozen=True)
class ConvertFile:
    """ImageRow → (row, PNG at `size` or None, why not): the file-reading converter of `convert_rows`."""
    size: int

    def __call__(self, row: ImageRow) -> tuple[ImageRow, bytes | None, str]:
        try:
            return row, load_square_png(row.path, self.size), ""
        except FileNotFoundError:
            return row, None, "image file missing"
        except BadImageError as e:
            return row, None, f"unreadable image ({e})"


def convert_rows(rows: Sequence[Any], convert: Callable[[Any], tuple[Any, bytes | None, str]],
                 num_workers: int) -> Iterator[tuple[Any, bytes | None, str]]:
    """Yields `convert(row)` in row order, computed in `num_workers` processes when that pays.

    Decoding full-size radiographs (~15 ms per 1024² PNG) or rendering phantoms dominates
    preparation, so a many-core machine benefits from workers; 0 or 1 keeps everything in this
    process, as do small jobs (starting a worker costs about a second).
    """
    if num_workers <= 1 or len(rows) < 256:
        yield from map(convert, rows)
        return
    # spawn, not fork: the parent may hold JAX/absl threads that fork would copy in a locked state.
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        yield from pool.imap(convert, rows, chunksize=32)


# ---- The base builder --------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class CxrConfig(tfds.core.BuilderConfig):
    """A resolution (square side in pixels) plus whatever the dataset adds."""
    size: int = 64


class CxrBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the chest X-ray builders: schema, metadata, manual-dir checks, bad-row accounting.

    Subclasses define `LABELS` (or override `labels`), `_extra_features` and `_split_generators`, which
    returns `{split: self._generate_examples(split, rows)}` with one `ImageRow` per image.
    The label names are also saved in the prepared dataset's metadata (`info.metadata["labels"]`).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: PNG at the configured size, common chest X-ray schema."}
    LABELS: tuple[str, ...] = ()
    DESCRIPTION = ""
    HOMEPAGE = ""
    CITATION = ""
    # Image-decoding processes while preparing (see `convert_rows`); 0 = in this process.
    prepare_workers: int = 0

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's default derives this via `importlib_resources`, which is not installed (and not a
        # dependency of ours) for packages on the regular file system; the module file is the answer.
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, file_format: str | None = "array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)
        self._report = PrepareReport(dataset=f"{self.name}/{self.builder_config.name}")

    @classmethod
    def named_config(cls, name: str) -> tfds.core.BuilderConfig:
        """The builder config called `name`, or a ValueError that lists the names this builder knows."""
        for config in cls.BUILDER_CONFIGS:
            if config.name == name:
                return config
        raise ValueError(f"{cls.name} has no builder config {name!r}; known: {[c.name for c in cls.BUILDER_CONFIGS]} "
                         f"(or pass a {type(cls.BUILDER_CONFIGS[0]).__name__} object)")

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.LABELS)

    @property
    def size(self) -> int:
        return int(self.builder_config.size)

    def _extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
        return {}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=cxr_features(self.size, len(self.labels), self._extra_features()),
            homepage=self.HOMEPAGE or None,
            citation=self.CITATION or None,
            metadata=tfds.core.MetadataDict(labels=list(self.labels)),
        )

    def manual_path(self, dl_manager: tfds.download.DownloadManager) -> epath.Path:
        """The manual folder, or `ManualDataMissingError` with the download instructions and the path."""
        # TFDS's own `dl_manager.manual_dir` asserts; reading the configured path lets us say more.
        configured = getattr(dl_manager, "_manual_dir", None)
        path = epath.Path(configured) if configured else None
        if path is None or not path.is_dir():
            raise ManualDataMissingError(self.missing_message(path, "the manual download folder"))
        return path

    def missing_message(self, looked_at: epath.PathLike | None, what: str) -> str:
        instructions = " ".join(self.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
        return (f"{self.name}: {what} was not found (looked at: {looked_at}). Point to the downloaded dataset "
                f"with --config.data.manual_dir=<folder> (or --manual_dir=<folder> for "
                f"`python -m xray_dit.data.builders.prepare`). To download it: {instructions}")

    def require_file(self, candidates: Sequence[epath.Path], what: str) -> epath.Path:
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise ManualDataMissingError(self.missing_message(", ".join(map(str, candidates)), what))

    def _generate_examples(self, split: str, rows: Sequence[ImageRow]) -> Iterator[tuple[str, dict[str, Any]]]:
        """The examples of one split (lazily converted); skipped rows go to the report."""
        self._report.expect(split, len(rows))  # now, not when TFDS starts iterating: the limit is dataset-wide
        return self._convert_rows(split, rows)

    def _convert_rows(self, split: str, rows: Sequence[ImageRow]) -> Iterator[tuple[str, dict[str, Any]]]:
        for row, png, why in convert_rows(rows, ConvertFile(self.size), self.prepare_workers):
            if png is None:
                self._report.add_bad(split, row.example["image_id"], row.path, why)
                continue
            yield row.key, {"image": png, **row.example}
        self.finish_split(split)

    def record_bad_row(self, split: str, image_id: str, path: str, why: str) -> None:
        """A row rejected before conversion (unparseable, unknown label): counted against the limit."""
        self._report.expect(split, 1)
        self._report.add_bad(split, image_id, path, why)

    def finish_split(self, split: str) -> None:
        """Checks the bad-row limit, then (re)writes the report inside TFDS's temporary directory."""
        self._report.check()
        self._report.write(self.data_path)
        self.info.metadata["prepare_report"] = self._report.summary()
        bad = self._report.summary()[split]["bad"]
        if bad:
            logging.warning("%s: skipped %d bad row(s) of split %s; see %s", self._report.dataset, bad, split,
                            self.data_path / REPORT_FILE)
