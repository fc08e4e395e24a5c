"""diffusers `AutoencoderKL` state dicts ↔ our VAE params.

The VAE's module tree mirrors the diffusers one name for name (`encoder/down_blocks_0/resnets_1/conv2`
is `encoder.down_blocks.0.resnets.1.conv2`), so every PyTorch name is derived from the model's own
parameter tree instead of keeping a second description of the architecture.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from xray_dit.models import factory, weights
from xray_dit.models.vae import AutoencoderKL

# Older diffusers-format files name the mid-block attention projections differently.
_LEGACY_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
_ATTENTION_PREFIX = re.compile(r"^(.*\.attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)$")


def _torch_layer_name(flax_module_path: str) -> str:
    """'encoder/down_blocks_0/resnets_1/conv1' → 'encoder.down_blocks.0.resnets.1.conv1'."""
    return ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in flax_module_path.split("/"))


def _torch_leaf(flax_path: str, ndim: int) -> tuple[str, Any, Any]:
    """(PyTorch name, torch→flax layout transform, flax→torch layout transform) of one Flax leaf."""
    module, leaf = flax_path.rsplit("/", 1)
    layer = _torch_layer_name(module)
    if leaf == "bias":
        return f"{layer}.bias", None, None
    if leaf == "scale":
        return f"{layer}.weight", None, None
    if leaf == "kernel" and ndim == 4:
        return f"{layer}.weight", weights.conv, weights.conv_to_torch
    if leaf == "kernel" and ndim == 2:
        return f"{layer}.weight", weights.linear, weights.linear
    raise AssertionError(f"no PyTorch name rule for Flax parameter {flax_path} ({ndim}-d)")


def _rgb_to_gray(flax_path: str, model: AutoencoderKL, tensor: np.ndarray) -> np.ndarray:
    """Applies the RGB→grayscale rule (see `from_state_dict`) to a PyTorch-layout tensor of the
    image-facing convs; every other tensor is returned unchanged."""
    if flax_path == "encoder/conv_in/kernel" and model.in_channels == 1 and tensor.shape[1:2] == (3,):
        return tensor.sum(axis=1, keepdims=True)
    if flax_path.startswith("decoder/conv_out/") and model.out_channels == 1 and tensor.shape[:1] == (3,):
        return tensor.mean(axis=0, keepdims=True)
    return tensor


def from_state_dict(state_dict: Mapping[str, np.ndarray], model: AutoencoderKL, *, adapt_rgb: str = "auto",
                    source: str = "VAE state dict") -> dict[str, Any]:
    """Params (unboxed numpy, `model.param_dtype`) for `model` from a diffusers `AutoencoderKL` state dict.

    Accepts the current attention names (`to_q`, `to_k`, `to_v`, `to_out.0`) and the older ones
    (`query`, `key`, `value`, `proj_attn`), per attention block. Every tensor must be used and every
    shape must fit, else `WeightImportError` lists all problems.

    RGB checkpoint → grayscale model (`adapt_rgb="auto"`, applied only when the file has 3 image
    channels and the model 1): a gray image g fed as (g, g, g) reaches the first layer as
    Σ_c W[:, c] * g, so `encoder.conv_in` kernels are **summed** over their 3 input channels and the
    1-channel encoder gives exactly the RGB encoder's output on (g, g, g). The decoder's grayscale
    output is defined as the **mean** of its R, G, B outputs; `conv_out` is linear, so its weight and
    bias are **averaged** over the 3 output channels. `adapt_rgb="off"` refuses such files; any other
    channel mismatch is always refused.
    """
    if adapt_rgb not in ("auto", "off"):
        raise ValueError(f"adapt_rgb must be 'auto' or 'off', got {adapt_rgb!r}")
    expected = weights.params_tree(factory.abstract_params(model))
    reader = weights.StateDictReader(state_dict, source)
    flat: dict[str, Any] = {}
    for path, leaf in traverse_util.flatten_dict(expected, sep="/").items():
        name, to_flax, _ = _torch_leaf(path, leaf.ndim)
        tensor = reader.take(_legacy_name_if_used(name, reader))
        if tensor is None:
            continue  # `finish` reports it.
        if adapt_rgb == "auto":
            tensor = _rgb_to_gray(path, model, tensor)
        flat[path] = to_flax(tensor) if to_flax else tensor
    return weights.as_numpy(reader.finish(weights.nested(flat), expected), model.param_dtype)


def _legacy_name_if_used(name: str, reader: weights.StateDictReader) -> str:
    layer, kind = name.rsplit(".", 1)
    match = _ATTENTION_PREFIX.match(layer)
    if match is None:
        return name
    prefix, projection = match.groups()
    # Decided per attention block, from its query weight, so that a file mixing both schemes within
    # one block is refused (the unused half is reported) rather than silently half-loaded.
    if reader.has(f"{prefix}.to_q.weight") or not reader.has(f"{prefix}.query.weight"):
        return name
    return f"{prefix}.{_LEGACY_ATTENTION_NAMES[projection]}.{kind}"


def to_state_dict(params: Mapping[str, Any], model: AutoencoderKL) -> dict[str, np.ndarray]:
    """The inverse of `from_state_dict` (current attention names, PyTorch layouts); `params` boxed or
    not, optionally under "params". A grayscale model exports 1-channel conv_in/conv_out tensors: the
    RGB adaptation is not invertible."""
    out = {}
    for path, value in weights.flat_params(params, factory.abstract_params(model)).items():
        value = np.asarray(value)
        name, _, to_torch = _torch_leaf(path, value.ndim)
        out[name] = to_torch(value) if to_torch else value
    return out
