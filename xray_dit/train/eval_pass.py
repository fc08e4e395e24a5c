"""Un-augmented passes over a whole split, for evaluation, latent caches and the study's image sets."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import ml_collections
import numpy as np
from etils import epath

from xray_dit import sharding
from xray_dit.data import pipeline


def eval_passes(config: ml_collections.ConfigDict, directory: epath.Path, split: str, batch_size: int, *,
                only_class: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One un-augmented pass over a split in record order; the last batch is padded (`valid` = 0)."""
    dataset = pipeline.make_dataset(config.data, split, train=False, seed=0, batch_size=batch_size,
                                    data_dir=directory, only_class=only_class, num_workers=0)
    yield from dataset


def run_over_split(apply_fn: Callable[[Any, dict], Any], variables: Any, config: ml_collections.ConfigDict,
                   directory: epath.Path, split: str, mesh, *, batch_size: int, only_class: str | None = None,
                   keys: tuple[str, ...] = ("labels", "label_mask", "index")) -> dict[str, np.ndarray]:
    """Applies a jitted `apply_fn(variables, global_batch) -> outputs (pytree of arrays)` to a whole split.

    Returns numpy arrays of the valid rows only: the outputs (under their own keys, or "output") and the
    batch fields in `keys`.
    """
    outputs: dict[str, list[np.ndarray]] = {}
    for batch in eval_passes(config, directory, split, batch_size, only_class=only_class):
        global_batch = sharding.host_to_global({k: v for k, v in batch.items()}, mesh)
        result = sharding.global_to_host(apply_fn(variables, global_batch))
        valid = sharding.global_to_host(global_batch["valid"]).astype(bool)
        result = result if isinstance(result, dict) else {"output": result}
        fields = {**result, **{k: sharding.global_to_host(global_batch[k]) for k in keys}}
        for key, value in fields.items():
            outputs.setdefault(key, []).append(np.asarray(value)[valid])
    if not outputs:
        raise ValueError(f"split {split!r} yielded no images")
    return {k: np.concatenate(v) for k, v in outputs.items()}


def eval_batch_size(train_batch_size: int, mesh) -> int:
    """A multiple of the batch devices near the training batch, for eval passes."""
    devices = mesh.shape["data"] * mesh.shape["fsdp"]
    return max(devices, (train_batch_size // devices) * devices)
