"""timm `Eva` state dicts (eva02_{tiny,small,base}_patch14_224 and their fine-tunes) ↔ our EVA-02 params.

Parameter names mirror timm's (`blocks_3/attn/qkv` ↔ `blocks.3.attn.qkv`); what differs is layout:
stacked q/k/v and SwiGLU kernels, a position embedding resampled to the model's patch grid, RGB patch
kernels summed for grayscale input, and a head re-initialised when its class count differs.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from xray_dit.models import factory, weights
from xray_dit.models.eva02 import Eva02, classifier_head, pair
from xray_dit.models.weights import StateDictReader, WeightImportError, linear


def resample_pos_embed(pos_embed: np.ndarray, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None,
                       num_prefix: int = 1, method: str = "bicubic") -> np.ndarray:
    """Resizes the patch-grid part of a (1, num_prefix + H·W, D) position embedding to `new_grid`.

    The prefix (cls) slots are kept as they are; the grid is treated as an image (row-major tokens)
    and resized with antialiasing (which only matters when shrinking). Without `old_grid` the grid
    must be square. Returns the input unchanged when the grids agree.
    """
    pos_embed = np.asarray(pos_embed)
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    count = patches.shape[1]
    if old_grid is None:
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(f"pos_embed has {count} patch positions, not a square grid; pass the checkpoint's "
                             "img_size so the grid shape is known")
        old_grid = (side, side)
    old_grid, new_grid = pair(old_grid), pair(new_grid)
    if old_grid[0] * old_grid[1] != count:
        raise ValueError(f"pos_embed has {count} patch positions but the stated grid {old_grid} has "
                         f"{old_grid[0] * old_grid[1]}")
    if old_grid == new_grid:
        return pos_embed
    dim = patches.shape[-1]
    image = patches.reshape(1, *old_grid, dim).astype(np.float32)
    resized = jax.image.resize(image, (1, *new_grid, dim), method=method, antialias=True)
    resized = np.asarray(resized).reshape(1, new_grid[0] * new_grid[1], dim).astype(pos_embed.dtype)
    return np.concatenate([prefix, resized], axis=1)


def _stacked_kernel(parts: int):
    """timm (parts·out, in) Linear weight with stacked outputs → `StackedDense` kernel (in, parts, out)."""
    def transform(w: np.ndarray) -> np.ndarray:
        if w.ndim != 2 or w.shape[0] % parts:
            return w  # leave it for `finish` to report as a shape mismatch
        return np.ascontiguousarray(w.reshape(parts, w.shape[0] // parts, w.shape[1]).transpose(2, 0, 1))
    return transform


def _stacked_bias(parts: int):
    def transform(b: np.ndarray) -> np.ndarray:
        return b.reshape(parts, -1) if b.ndim == 1 and b.shape[0] % parts == 0 else b
    return transform


def _patch_kernel(in_channels: int):
    """Conv2d (O, I, kH, kW) → (kH, kW, I, O), summing RGB into one channel for a grayscale model.

    Summing is exact for a gray image fed as (g, g, g): conv(g, W_r) + conv(g, W_g) + conv(g, W_b) =
    conv(g, W_r + W_g + W_b). (With per-channel input normalisation the three normalised copies differ
    slightly; normalise gray input with a single mean/std.)
    """
    def transform(w: np.ndarray) -> np.ndarray:
        kernel = weights.conv(w)
        if kernel.ndim == 4 and kernel.shape[2] == 3 and in_channels == 1:
            logging.info("EVA-02 import: patch_embed RGB kernel summed over channels for 1-channel input")
            return kernel.sum(axis=2, keepdims=True)
        return kernel
    return transform


def _fresh_head(model: Eva02, rng: jax.Array) -> dict[str, np.ndarray]:
    head = classifier_head(model.num_classes, model.dtype, model.param_dtype)
    return weights.params_tree(head.init(rng, jnp.zeros((1, model.embed_dim), model.dtype)))


def _take_block(reader: StateDictReader, model: Eva02, i: int) -> dict[str, Any]:
    """Our flat params of transformer block i, taken from timm's `blocks.{i}.*`."""
    src, dst = f"blocks.{i}.", f"blocks_{i}/"
    flat: dict[str, Any] = {}
    for norm in ("norm1", "norm2"):
        flat[f"{dst}{norm}/scale"] = reader.take(f"{src}{norm}.weight")
        flat[f"{dst}{norm}/bias"] = reader.take(f"{src}{norm}.bias")
    if model.qkv_fused:
        flat[f"{dst}attn/qkv/kernel"] = reader.take(f"{src}attn.qkv.weight", _stacked_kernel(3))
        flat[f"{dst}attn/q_bias"] = reader.take(f"{src}attn.q_bias")
        flat[f"{dst}attn/v_bias"] = reader.take(f"{src}attn.v_bias")
    else:
        for proj in ("q_proj", "k_proj", "v_proj"):
            flat[f"{dst}attn/{proj}/kernel"] = reader.take(f"{src}attn.{proj}.weight", linear)
        flat[f"{dst}attn/q_proj/bias"] = reader.take(f"{src}attn.q_proj.bias")
        flat[f"{dst}attn/v_proj/bias"] = reader.take(f"{src}attn.v_proj.bias")
    flat[f"{dst}attn/proj/kernel"] = reader.take(f"{src}attn.proj.weight", linear)
    flat[f"{dst}attn/proj/bias"] = reader.take(f"{src}attn.proj.bias")
    if model.scale_mlp:
        for fc in ("fc1_g", "fc1_x"):
            flat[f"{dst}mlp/{fc}/kernel"] = reader.take(f"{src}mlp.{fc}.weight", linear)
            flat[f"{dst}mlp/{fc}/bias"] = reader.take(f"{src}mlp.{fc}.bias")
        flat[f"{dst}mlp/norm/scale"] = reader.take(f"{src}mlp.norm.weight")
        flat[f"{dst}mlp/norm/bias"] = reader.take(f"{src}mlp.norm.bias")
    else:
        flat[f"{dst}mlp/fc1/kernel"] = reader.take(f"{src}mlp.fc1.weight", _stacked_kernel(2))
        flat[f"{dst}mlp/fc1/bias"] = reader.take(f"{src}mlp.fc1.bias", _stacked_bias(2))
    flat[f"{dst}mlp/fc2/kernel"] = reader.take(f"{src}mlp.fc2.weight", linear)
    flat[f"{dst}mlp/fc2/bias"] = reader.take(f"{src}mlp.fc2.bias")
    return flat


def from_state_dict(state_dict: Mapping[str, np.ndarray], model: Eva02, *,
                    img_size: int | tuple[int, int] | None = None, rng: jax.Array | None = None,
                    source: str = "timm EVA-02 state dict") -> dict:
    """Params (unboxed numpy, `model.param_dtype`) for `model` from a timm `Eva` state dict.

    * `img_size`: the resolution the checkpoint was trained at; only needed when its pos_embed grid is
      not square. The patch-grid part of pos_embed is resampled (bicubic) to `model.img_size`, the cls
      slot kept; RoPE is computed, never loaded.
    * A 3-channel patch embedding is summed to 1 channel when `model.in_channels == 1`.
    * Head: loaded when `head.*` is present with `model.num_classes` rows. A state dict without `head.*`
      (timm's mim_in22k checkpoints) gets a fresh head (logged). A head with another class count is
      discarded with a `UserWarning` and replaced by a fresh head: fine-tuning an ImageNet classifier
      on our labels is the expected case. Fresh heads use `rng` (default key 0).
    * `norm.*` (timm's final norm for global_pool='token', e.g. EVA-02 CLIP towers) is refused: this
      model pools by averaging and uses `fc_norm`.
    Any tensor left unmapped, missing or mis-shaped raises `WeightImportError` listing all of them.
    """
    reader = StateDictReader(state_dict, source)
    if reader.has("norm.weight") or reader.has("norm.bias"):
        raise WeightImportError(f"cannot import {source}: it has a final `norm` (timm global_pool='token' layout, "
                                "cls-token pooling) but this Eva02 averages the patch tokens and uses `fc_norm`; "
                                "use an avg-pool checkpoint (eva02_*_patch14_224 mim_in22k / in1k fine-tunes)")
    expected = weights.params_tree(factory.abstract_params(model))
    old_grid = None if img_size is None else tuple(s // model.patch_size for s in pair(img_size))

    flat: dict[str, Any] = {
        "cls_token": reader.take("cls_token"),
        "pos_embed": reader.take("pos_embed", lambda pe: resample_pos_embed(pe, model.grid, old_grid)),
        "patch_embed/kernel": reader.take("patch_embed.proj.weight", _patch_kernel(model.in_channels)),
        "patch_embed/bias": reader.take("patch_embed.proj.bias"),
        "fc_norm/scale": reader.take("fc_norm.weight"),
        "fc_norm/bias": reader.take("fc_norm.bias"),
    }
    for i in range(model.depth):
        flat.update(_take_block(reader, model, i))

    flat["head/kernel"], flat["head/bias"] = weights.take_head(
        reader, "head", model.num_classes, lambda: _fresh_head(model, jax.random.key(0) if rng is None else rng),
        model_name="EVA-02", stacklevel=2)

    return weights.as_numpy(reader.finish(weights.nested(flat), expected), model.param_dtype)


def to_state_dict(params: Mapping[str, Any], model: Eva02) -> dict[str, np.ndarray]:
    """The inverse of `from_state_dict` (`params` boxed or not, optionally under "params") → timm names
    and layouts. The fused layout's zero `k_bias` is a non-persistent buffer in timm and is not written.
    """
    flat = {k: np.asarray(v) for k, v in weights.flat_params(params, factory.abstract_params(model)).items()}

    def torch_linear(key):
        return linear(flat[key])

    def torch_stacked(key):  # (in, parts, out) → (parts·out, in)
        kernel = flat[key]
        return np.ascontiguousarray(kernel.transpose(1, 2, 0).reshape(-1, kernel.shape[0]))

    out = {
        "cls_token": flat["cls_token"],
        "pos_embed": flat["pos_embed"],
        "patch_embed.proj.weight": weights.conv_to_torch(flat["patch_embed/kernel"]),
        "patch_embed.proj.bias": flat["patch_embed/bias"],
    }
    for i in range(model.depth):
        src, dst = f"blocks_{i}/", f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            out[f"{dst}{norm}.weight"] = flat[f"{src}{norm}/scale"]
            out[f"{dst}{norm}.bias"] = flat[f"{src}{norm}/bias"]
        if model.qkv_fused:
            out[f"{dst}attn.q_bias"] = flat[f"{src}attn/q_bias"]
            out[f"{dst}attn.v_bias"] = flat[f"{src}attn/v_bias"]
            out[f"{dst}attn.qkv.weight"] = torch_stacked(f"{src}attn/qkv/kernel")
        else:
            for proj in ("q_proj", "k_proj", "v_proj"):
                out[f"{dst}attn.{proj}.weight"] = torch_linear(f"{src}attn/{proj}/kernel")
            out[f"{dst}attn.q_proj.bias"] = flat[f"{src}attn/q_proj/bias"]
            out[f"{dst}attn.v_proj.bias"] = flat[f"{src}attn/v_proj/bias"]
        out[f"{dst}attn.proj.weight"] = torch_linear(f"{src}attn/proj/kernel")
        out[f"{dst}attn.proj.bias"] = flat[f"{src}attn/proj/bias"]
        if model.scale_mlp:
            for fc in ("fc1_g", "fc1_x"):
                out[f"{dst}mlp.{fc}.weight"] = torch_linear(f"{src}mlp/{fc}/kernel")
                out[f"{dst}mlp.{fc}.bias"] = flat[f"{src}mlp/{fc}/bias"]
            out[f"{dst}mlp.norm.weight"] = flat[f"{src}mlp/norm/scale"]
            out[f"{dst}mlp.norm.bias"] = flat[f"{src}mlp/norm/bias"]
        else:
            out[f"{dst}mlp.fc1.weight"] = torch_stacked(f"{src}mlp/fc1/kernel")
            out[f"{dst}mlp.fc1.bias"] = flat[f"{src}mlp/fc1/bias"].reshape(-1)
        out[f"{dst}mlp.fc2.weight"] = torch_linear(f"{src}mlp/fc2/kernel")
        out[f"{dst}mlp.fc2.bias"] = flat[f"{src}mlp/fc2/bias"]
    out["fc_norm.weight"] = flat["fc_norm/scale"]
    out["fc_norm.bias"] = flat["fc_norm/bias"]
    out["head.weight"] = torch_linear("head/kernel")
    out["head.bias"] = flat["head/bias"]
    return out
