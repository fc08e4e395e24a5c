"""Small pieces the three trainers and the sample task share: data location, eval passes, image grids."""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from xray_dit import sharding
from xray_dit.data import builders, pipeline


def data_dir(config: ml_collections.ConfigDict, workdir: epath.Path) -> epath.Path:
    """Where prepared datasets live: `config.data.data_dir`, else `<workdir>/tfds`."""
    return epath.Path(config.data.data_dir) if config.data.data_dir else workdir / "tfds"


def ensure_prepared(config: ml_collections.ConfigDict, workdir: epath.Path) -> epath.Path:
    """Prepares the configured dataset once (no-op when done); returns the data dir.

    Only process 0 writes; the others wait for it at a barrier so that nobody reads half a dataset.
    """
    directory = data_dir(config, workdir)
    if jax.process_index() == 0:
        try:  # prepared already (also custom configs, e.g. a test's own phantom spec): nothing to do
            builders.load_prepared(config.data.name, config.data.builder_config or None, data_dir=directory)
        except builders.NotPreparedError:
            builders.prepare(config.data.name, _builder_config(config.data), data_dir=directory,
                             manual_dir=config.data.manual_dir or None)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("dataset prepared")
    return directory


def _builder_config(data: ml_collections.ConfigDict):
    """The builder config by name; phantom names `<size>_n<count>` (e.g. "64_n300") make a custom-size set."""
    match = re.fullmatch(r"(\d+)_n(\d+)", data.builder_config or "")
    if data.name == "cxr_phantom" and match:
        from xray_dit.data.builders import cxr_phantom
        size, count = int(match.group(1)), int(match.group(2))
        return cxr_phantom.PhantomConfig(name=data.builder_config, size=size, num_images=count,
                                         description=f"{count} phantom images at {size}x{size}")
    return data.builder_config or None


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


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] float images (N, H, W, 1) or (N, H, W) → uint8 (N, H, W)."""
    images = np.asarray(images, np.float32)
    if images.ndim == 4:
        images = images[..., 0]
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_grid(images_uint8: np.ndarray, path: epath.Path, *, ncol: int | None = None, pad: int = 2) -> epath.Path:
    """A grayscale grid PNG of (N, H, W) uint8 images."""
    n, h, w = images_uint8.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad), 255, np.uint8)
    for i, image in enumerate(images_uint8):
        r, c = divmod(i, ncol)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = image
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        Image.fromarray(canvas).save(f, format="PNG")
    logging.info("wrote %s", path)
    return path


def export_dir(workdir: epath.Path) -> epath.Path:
    return workdir / "export"
