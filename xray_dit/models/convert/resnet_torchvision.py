"""torchvision and timm ResNet state dicts ↔ the variables `{"params", "batch_stats"}` of `models/resnet.py`.

Names. torchvision's resnet18/34/50 and timm's resnet18/34/50 (every weight tag of the plain
architecture: tv_in1k, tv2_in1k, a1_in1k, ...) write the same state-dict names: `conv1`, `bn1`,
`layer{s}.{b}.conv{1,2,3}` / `.bn{1,2,3}`, `layer{s}.{b}.downsample.{0,1}` and `fc`. A Flax path maps onto a
name component by component, a trailing block index becoming its own component (`layer3_1` ↔ `layer3.1`,
`downsample_0` ↔ `downsample.0`); a conv `kernel` is `weight`, BatchNorm's `scale`/`bias` are
`weight`/`bias` and its running `mean`/`var` (collection `batch_stats`) are `running_mean`/`running_var`.
`num_batches_tracked` is read and dropped (Flax's BatchNorm has a fixed momentum). A `module.` prefix
(DistributedDataParallel) is stripped. timm's ResNet-D family (`resnet50d`: deep stem `conv1.0`...,
average-pool shortcuts) is another architecture and is refused.

Gray input, the one rule: for a 1-channel model the RGB `conv1` kernel is summed over its input channel
(timm's `adapt_input_conv`). That is exact for an image fed as (g, g, g): the gray model computes what the
RGB model computes on three copies of the gray image. The gray image is given as the classifier pipeline
gives every model, in [-1, 1], without ImageNet's per-channel mean/std: the first BatchNorm (`bn1`)
normalises with the batch's statistics while fine-tuning and its running statistics follow within tens
of steps, so the input's scale and offset do not carry into the network.

Head. `fc` is loaded when it has the model's class count. A state dict without `fc.*` gets a fresh head
(logged); a head for another class count (ImageNet's 1000) is discarded with a `UserWarning` and a fresh
one initialised, as for EVA-02.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from xray_dit.models import resnet
from xray_dit.models.weights import StateDictReader, WeightImportError, conv, nested, take_head

_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_INDEXED = re.compile(r"(.+)_(\d+)$")
_DATA_PARALLEL_PREFIX = "module."


def torch_name(path: tuple[str, ...]) -> str:
    """A Flax path within a collection → its torch name: ("layer3_1", "downsample_1", "mean") →
    "layer3.1.downsample.1.running_mean"."""
    *modules, leaf = path
    parts = [_INDEXED.sub(r"\1.\2", module) for module in modules]
    return ".".join(parts + [_TORCH_LEAF[leaf]])


def _strip_data_parallel_prefix(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if state_dict and all(k.startswith(_DATA_PARALLEL_PREFIX) for k in state_dict):
        return {k[len(_DATA_PARALLEL_PREFIX):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _stem_kernel(in_channels: int):
    """conv1 (O, I, kH, kW) → (kH, kW, I, O), summed over RGB for a 1-channel model (the module docstring's rule)."""
    def transform(w: np.ndarray) -> np.ndarray:
        kernel = conv(w)
        if kernel.ndim == 4 and kernel.shape[2] == 3 and in_channels == 1:
            logging.info("ResNet import: conv1's RGB kernel summed over its input channel for 1-channel input")
            return kernel.sum(axis=2, keepdims=True)
        return kernel
    return transform


def _fresh_head(model: resnet.ResNet, feature_dim: int, rng: jax.Array) -> dict[str, np.ndarray]:
    head = resnet.fc_layer(model.num_classes, model.dtype, model.param_dtype)
    variables = head.init(rng, jnp.zeros((1, feature_dim), model.dtype))
    return jax.tree.map(np.asarray, nn.meta.unbox(variables["params"]))


def _head(reader: StateDictReader, model: resnet.ResNet, feature_dim: int, rng: jax.Array | None) -> dict:
    kernel, bias = take_head(reader, "fc", model.num_classes,
                             lambda: _fresh_head(model, feature_dim, jax.random.key(0) if rng is None else rng),
                             model_name="ResNet", stacklevel=3)
    return {"params/fc/kernel": kernel, "params/fc/bias": bias}


def from_state_dict(state_dict: Mapping[str, np.ndarray], model: resnet.ResNet, *,
                                rng: jax.Array | None = None, source: str = "ResNet state dict") -> dict:
    """Builds `model`'s `{"params", "batch_stats"}` (unboxed numpy) from a torchvision or timm ResNet state dict.

    Any tensor left unmapped, missing or mis-shaped raises `WeightImportError` listing all of them.
    """
    state_dict = _strip_data_parallel_prefix(state_dict)
    if "conv1.0.weight" in state_dict:
        raise WeightImportError(f"cannot import {source}: it has a deep stem (conv1.0, conv1.1, ...), timm's ResNet-D "
                                "layout (resnet18d/34d/50d), not torchvision's; use a plain resnet18/34/50 checkpoint")
    reader = StateDictReader(state_dict, source)
    expected = nn.meta.unbox(resnet.abstract_variables(model))
    flat: dict[str, Any] = {}
    for path in traverse_util.flatten_dict(expected):
        _, *rest = path
        if rest[0] == "fc":
            continue
        name = torch_name(tuple(rest))
        transform = None
        if rest[-1] == "kernel":
            transform = _stem_kernel(model.in_channels) if rest[0] == "conv1" else conv
        flat["/".join(path)] = reader.take(name, transform)
        tracked = name.rsplit(".", 1)[0] + ".num_batches_tracked"
        if rest[-1] == "mean" and reader.has(tracked):
            reader.take(tracked)
    feature_dim = expected["params"]["fc"]["kernel"].shape[0]
    flat.update(_head(reader, model, feature_dim, rng))
    variables = reader.finish(nested(flat), expected)
    return {"params": jax.tree.map(lambda a: np.asarray(a, model.param_dtype), variables["params"]),
            "batch_stats": jax.tree.map(lambda a: np.asarray(a, np.float32), variables["batch_stats"])}


# The name `weights.py` documents for every model's importer.
from_torch_state_dict = from_state_dict


def to_state_dict(variables: Mapping[str, Any], model: resnet.ResNet) -> dict[str, np.ndarray]:
    """The inverse map: `{"params", "batch_stats"}` (boxed or not) → torchvision names and layouts, with a zero
    `num_batches_tracked` per BatchNorm, so torchvision's `load_state_dict(strict=True)` takes it."""
    del model  # the names come from the tree itself
    flat = traverse_util.flatten_dict(nn.meta.unbox(dict(variables)))
    out: dict[str, np.ndarray] = {}
    for (_, *rest), value in flat.items():
        value = np.asarray(value)
        name = torch_name(tuple(rest))
        if rest[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        out[name] = np.ascontiguousarray(value)
        if rest[-1] == "mean":
            out[name.rsplit(".", 1)[0] + ".num_batches_tracked"] = np.asarray(0, np.int64)
    return out
