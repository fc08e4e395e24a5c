"""One TFDS builder per dataset; importing this package registers them with TFDS.

    nih_chestxray14   configs "64", "256", "256_pa", ...      manual download (see README "Data")
    chexpert          configs "224", "224_ones", "224_zeros"  manual download
    medmnist          configs "chestmnist_64", ...            manual download (npz files)
    cxr_phantom       configs "64", "64_10k", ..., "64_n300"   generated here, no download

Prepare once (`prepare` below, or `python -m xray_dit.data.builders.prepare`), then read with
`xray_dit.data.pipeline` (or `tfds.data_source("<name>/<config>", split=..., data_dir=...)`).
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds
from etils import epath

from xray_dit.data import DataError
from xray_dit.data.builders import chexpert, cxr_phantom, medmnist, nih_chestxray14
from xray_dit.data.builders.common import (REPORT_FILE, SKIP_IMAGE_DECODING, CxrBuilder, ManualDataMissingError,
                                           TooManyBadRecordsError)

BUILDERS: dict[str, type[CxrBuilder]] = {
    cls.name: cls for cls in (nih_chestxray14.NihChestxray14, chexpert.Chexpert, medmnist.Medmnist,
                              cxr_phantom.CxrPhantom)
}

__all__ = ["BUILDERS", "REPORT_FILE", "SKIP_IMAGE_DECODING", "CxrBuilder", "DataError", "ManualDataMissingError",
           "NotPreparedError", "TooManyBadRecordsError", "get_builder", "image_size", "label_names",
           "load_prepared", "prepare"]


class NotPreparedError(DataError):
    """No complete prepared copy of the dataset under data_dir."""


def get_builder(name: str, builder_config: str | tfds.core.BuilderConfig | None = None, *,
                data_dir: str | os.PathLike) -> CxrBuilder:
    """The builder for `name` ("nih_chestxray14" or "nih_chestxray14/256") and a config name or object."""
    if "/" in name:
        if builder_config:
            raise ValueError(f"give the builder config either in the name ({name!r}) or as builder_config "
                             f"({builder_config!r}), not both")
        name, builder_config = name.split("/", 1)
    if name not in BUILDERS:
        raise DataError(f"unknown dataset {name!r}; use one of {sorted(BUILDERS)} (--config.data.name=...)")
    cls = BUILDERS[name]
    if isinstance(builder_config, str) and builder_config:
        builder_config = cls.named_config(builder_config)
    if not data_dir:
        raise ValueError("data_dir is empty: say where prepared datasets live (e.g. <workdir>/tfds)")
    return cls(config=builder_config or None, data_dir=os.fspath(data_dir))


def prepare(name: str, builder_config: str | tfds.core.BuilderConfig | None = None, *,
            data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None,
            prepare_workers: int | None = None) -> CxrBuilder:
    """Prepares the dataset unless it already is; returns the builder (read it with `as_data_source`).

    prepare_workers: processes decoding/rendering images (None = one per CPU core; 0 = this process).
    """
    builder = get_builder(name, builder_config, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    builder.prepare_workers = (os.cpu_count() or 1) if prepare_workers is None else prepare_workers
    download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir) if manual_dir else None)
    builder.download_and_prepare(download_config=download_config)
    return builder


def load_prepared(name: str, builder_config: str | None = None, *,
                  data_dir: str | os.PathLike) -> tfds.core.DatasetBuilder:
    """A read-only builder over the prepared files, for any config (also custom ones).

    Reads only what the prepare step wrote (dataset_info.json, metadata.json, array_record), so a
    custom `BuilderConfig` (e.g. a 300-image phantom) needs no registration to be read back. A
    prepare that did not finish left only TFDS's `incomplete.*` folder, which is never picked up.
    """
    if "/" in name:
        name, builder_config = name.split("/", 1)
    if name not in BUILDERS:
        raise DataError(f"unknown dataset {name!r}; use one of {sorted(BUILDERS)} (--config.data.name=...)")
    cls = BUILDERS[name]
    builder_config = builder_config or cls.DEFAULT_CONFIG_NAME
    if not data_dir:
        raise ValueError("data_dir is empty: say where prepared datasets live (e.g. <workdir>/tfds)")
    config_dir = epath.Path(data_dir) / name / builder_config
    complete = [d for d in (config_dir.iterdir() if config_dir.is_dir() else [])
                if tfds.core.Version.is_valid(d.name) and (d / "dataset_info.json").is_file()]
    if not complete:
        raise NotPreparedError(
            f"dataset {name}/{builder_config} is not prepared under {data_dir} (no complete version folder in "
            f"{config_dir}). Prepare it once with: python -m xray_dit.data.builders.prepare "
            f"--dataset={name}/{builder_config} --data_dir={data_dir} --manual_dir=<the download>")
    wanted = [d for d in complete if d.name == str(cls.VERSION)]
    newest = wanted[0] if wanted else max(complete, key=lambda d: tfds.core.Version(d.name))
    return tfds.builder_from_directory(os.fspath(newest))


def image_size(builder: tfds.core.DatasetBuilder) -> int:
    return int(builder.info.features["image"].shape[0])


def label_names(builder: tfds.core.DatasetBuilder) -> tuple[str, ...]:
    return tuple(builder.info.metadata["labels"])
