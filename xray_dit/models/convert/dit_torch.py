"""facebookresearch/DiT checkpoint names ↔ our DiT params (DiT-XL-2-256x256.pt etc.; `train.py`
checkpoints keep them under "ema").

The map is written out tensor by tensor because our attention kernels are split over heads
((D, 3, heads, head_dim) where PyTorch has one (3·D, D) matrix). `pos_embed` is a fixed sin-cos table,
not a parameter: a checkpoint's copy is compared with the model's and never loaded.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from xray_dit.models import dit as dit_lib
from xray_dit.models import factory, weights


def _name_map(model: dit_lib.DiT) -> list[tuple[str, str, Any, Any]]:
    """(torch name, our path, torch→ours transform, ours→torch transform) for every tensor but pos_embed.

    Transforms are numpy views (`.T`, reshape), so mapping even DiT-XL costs no extra memory.
    """
    d, h = model.hidden_size, model.num_heads
    hd = d // h
    ident = (lambda w: w, lambda w: w)
    lin = (lambda w: w.T, lambda w: w.T)
    entries = [
        ("x_embedder.proj.weight", "x_embedder/kernel",
         lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1)),
        ("x_embedder.proj.bias", "x_embedder/bias", *ident),
        ("t_embedder.mlp.0.weight", "t_embedder/mlp_0/kernel", *lin),
        ("t_embedder.mlp.0.bias", "t_embedder/mlp_0/bias", *ident),
        ("t_embedder.mlp.2.weight", "t_embedder/mlp_2/kernel", *lin),
        ("t_embedder.mlp.2.bias", "t_embedder/mlp_2/bias", *ident),
    ]
    if model.num_classes > 0:
        entries.append(("y_embedder.embedding_table.weight", "y_embedder", *ident))
    for i in range(model.depth):
        tb, fb = f"blocks.{i}.", f"blocks_{i}/"
        entries += [
            (tb + "attn.qkv.weight", fb + "attn/qkv/kernel",
             lambda w: w.T.reshape(d, 3, h, hd), lambda w: w.reshape(d, 3 * d).T),
            (tb + "attn.qkv.bias", fb + "attn/qkv/bias",
             lambda w: w.reshape(3, h, hd), lambda w: w.reshape(3 * d)),
            (tb + "attn.proj.weight", fb + "attn/proj/kernel",
             lambda w: w.T.reshape(h, hd, d), lambda w: w.reshape(d, d).T),
            (tb + "attn.proj.bias", fb + "attn/proj/bias", *ident),
            (tb + "mlp.fc1.weight", fb + "mlp/fc1/kernel", *lin),
            (tb + "mlp.fc1.bias", fb + "mlp/fc1/bias", *ident),
            (tb + "mlp.fc2.weight", fb + "mlp/fc2/kernel", *lin),
            (tb + "mlp.fc2.bias", fb + "mlp/fc2/bias", *ident),
            (tb + "adaLN_modulation.1.weight", fb + "adaLN_modulation/kernel", *lin),
            (tb + "adaLN_modulation.1.bias", fb + "adaLN_modulation/bias", *ident),
        ]
    entries += [
        ("final_layer.linear.weight", "final_layer/linear/kernel", *lin),
        ("final_layer.linear.bias", "final_layer/linear/bias", *ident),
        ("final_layer.adaLN_modulation.1.weight", "final_layer/adaLN_modulation/kernel", *lin),
        ("final_layer.adaLN_modulation.1.bias", "final_layer/adaLN_modulation/bias", *ident),
    ]
    return entries


def _checked_shape(transform, value: np.ndarray) -> np.ndarray:
    """Applies a layout transform; a tensor whose size cannot fit is left for `finish` to report."""
    try:
        return transform(value)
    except ValueError:
        return value


def _pos_embed_problem(stored: np.ndarray | None, model: dit_lib.DiT) -> str | None:
    if stored is None:
        return None
    ours = model.pos_embed()[None]
    if stored.shape != ours.shape:
        return f"pos_embed has shape {stored.shape}, the model's table is {ours.shape}"
    if not np.allclose(stored, ours, atol=1e-5):
        return ("pos_embed differs from the model's fixed 2-D sin-cos table (max abs diff "
                f"{np.abs(stored - ours).max():.3g}); the checkpoint is not a standard DiT")
    return None


def from_state_dict(state_dict: Mapping[str, np.ndarray], model: dit_lib.DiT, *,
                    source: str = "DiT state dict") -> dict:
    """Params (unboxed numpy, `model.param_dtype`) from a PyTorch DiT state_dict.

    Refuses, listing every offender, a file with tensors that map to nothing, tensors the model needs
    but the file lacks, wrong shapes, or a `pos_embed` that differs from the model's fixed table
    (a sign of a different input size or hidden width).
    """
    reader = weights.StateDictReader(state_dict, source)
    flat = {}
    for torch_name, path, to_ours, _ in _name_map(model):
        value = reader.take(torch_name)
        if value is not None:
            flat[path] = _checked_shape(to_ours, value)
    pos_problem = _pos_embed_problem(reader.take("pos_embed"), model)
    expected = weights.params_tree(factory.abstract_params(model))
    try:
        params = reader.finish(weights.nested(flat), expected)
    except weights.WeightImportError as error:
        if pos_problem:
            raise weights.WeightImportError(f"{error}\n  - {pos_problem}") from None
        raise
    if pos_problem:
        raise weights.WeightImportError(f"cannot import {source}:\n  - {pos_problem}")
    return weights.as_numpy(params, model.param_dtype)


def to_state_dict(params: Mapping[str, Any], model: dit_lib.DiT) -> dict[str, np.ndarray]:
    """The inverse of `from_state_dict` (`params` boxed or not, optionally under "params"): PyTorch
    names and layouts, float32, plus the fixed pos_embed table the checkpoints carry."""
    flat = weights.flat_params(params, factory.abstract_params(model), "this DiT")
    out = {torch_name: np.ascontiguousarray(to_torch(np.asarray(flat[path], dtype=np.float32)))
           for torch_name, path, _, to_torch in _name_map(model)}
    out["pos_embed"] = model.pos_embed()[None]
    return out
