"""The `config.data` fields the input pipeline reads, checked once (`DataConfig.from_config`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from xray_dit.data import DataError
from xray_dit.data.augment import AugmentConfig


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
    target_class: str = ""                   # the scarce finding `target_fraction` thins
    target_fraction: float = 1.0             # train split: keep this share of target_class's patients
    target_fraction_seed: int = 0            # which of them
    roundtrip_dir: str = ""                  # VAE round trips of the training images, by image id
    roundtrip_prob: float = 0.0              # train: chance a real image is read from roundtrip_dir instead
    split_file: str = ""                     # "" = the prepared splits; else a CSV redrawing them (split_rows.py)

    def __post_init__(self):
        if not 0.0 <= self.target_fraction <= 1.0:
            raise DataError(f"data.target_fraction={self.target_fraction} must lie in [0, 1] (the share of the "
                            "target class's training patients to keep)")
        if self.target_fraction < 1.0 and not self.target_class:
            raise DataError(f"data.target_fraction={self.target_fraction} needs data.target_class (whose "
                            "training patients to thin)")
        if not 0.0 <= self.roundtrip_prob <= 1.0:
            raise DataError(f"data.roundtrip_prob={self.roundtrip_prob} must be a probability in [0, 1]")
        if self.roundtrip_prob > 0 and not self.roundtrip_dir:
            raise DataError(f"data.roundtrip_prob={self.roundtrip_prob} needs data.roundtrip_dir (a store "
                            "written by xray_dit.study.arms.write_roundtrip_store)")

    @classmethod
    def from_config(cls, config: Any) -> DataConfig:
        """From a DataConfig, a mapping or an ml_collections.ConfigDict (e.g. `config.data`)."""
        if isinstance(config, DataConfig):
            return config
        values = _as_dict(config)
        if not values.get("name"):
            raise DataError("the data config names no dataset; set --config.data.name=...")
        augment = _as_dict(values.get("augment") or {})
        return cls(
            name=str(values["name"]),
            builder_config=str(values.get("builder_config") or ""),
            data_dir=os.fspath(values.get("data_dir") or ""),
            image_size=int(values.get("image_size") or 0),
            labels=tuple(values.get("labels") or ()),
            balanced_sampling=bool(values.get("balanced_sampling", False)),
            num_workers=int(values.get("num_workers") or 0),
            augment=AugmentConfig(**{f.name: augment[f.name] for f in dataclasses.fields(AugmentConfig)
                                     if f.name in augment}),
            target_class=str(values.get("target_class") or ""),
            target_fraction=float(values.get("target_fraction", 1.0)),
            target_fraction_seed=int(values.get("target_fraction_seed") or 0),
            roundtrip_dir=os.fspath(values.get("roundtrip_dir") or ""),
            roundtrip_prob=float(values.get("roundtrip_prob") or 0.0),
            split_file=os.fspath(values.get("split_file") or ""),
        )


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
        return config.to_dict()
    if dataclasses.is_dataclass(config):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    raise ValueError(f"expected a mapping, ConfigDict or dataclass as data config, got {type(config).__name__}")
