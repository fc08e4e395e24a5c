"""Reading PyTorch-named state dicts and building Flax param trees from them (shared by all converters).

Each source format has its converter in `models/convert/` (its name map); this file holds the parts
they share: reading `.safetensors` / `.npz` / torch files, layout conversions (Linear and Conv transposes),
params trees in and out, and the strict bookkeeping that refuses a file with an unmapped, missing or
mis-shaped tensor, listing them all.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util

from xray_dit.models import torch_file


TORCH_SUFFIXES = (".pth", ".pt", ".bin")


class WeightImportError(ValueError):
    """A weight file does not fit the model: the message lists every offending tensor."""


def load_state_dict(path: str | epath.PathLike) -> dict[str, np.ndarray]:
    """Reads a `.safetensors`, `.npz` or `torch.save` (`.pth`/`.pt`/`.bin`) state dict (PyTorch names) into
    float32/int numpy arrays.

    `.npz` keys may carry a `param/` prefix (the golden files do); it is stripped. Torch files are read
    without torch and without running their code (`torch_file.py`).
    """
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weight file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load as st_load
        tensors = st_load(path.read_bytes())
    elif suffix == ".npz":
        with path.open("rb") as f, np.load(f) as z:
            tensors = {k: z[k] for k in z.files}
        if any(k.startswith("param/") for k in tensors):
            tensors = {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")}
    elif suffix in TORCH_SUFFIXES:
        try:
            tensors = torch_file.load(path)
        except torch_file.TorchFileError as e:
            raise WeightImportError(str(e)) from e
    else:
        raise WeightImportError(f"{path}: unsupported weight format {suffix!r}; use .safetensors, .npz or a "
                                f"torch.save file ({', '.join(TORCH_SUFFIXES)})")
    return {k: (v.astype(np.float32) if v.dtype in (np.float16, np.float64, ml_dtypes.bfloat16)
                or v.dtype.kind == "V" else v)
            for k, v in tensors.items()}


def linear(w: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight (out, in) → Flax Dense kernel (in, out)."""
    return np.ascontiguousarray(np.asarray(w).T)


def conv(w: np.ndarray) -> np.ndarray:
    """PyTorch Conv2d weight (O, I, kH, kW) → Flax Conv kernel (kH, kW, I, O)."""
    return np.ascontiguousarray(np.transpose(np.asarray(w), (2, 3, 1, 0)))


def conv_to_torch(kernel: np.ndarray) -> np.ndarray:
    """Flax Conv kernel (kH, kW, I, O) → PyTorch Conv2d weight (O, I, kH, kW); the inverse of `conv`."""
    return np.ascontiguousarray(np.transpose(np.asarray(kernel), (3, 2, 0, 1)))


def params_tree(params: Mapping[str, Any]) -> dict:
    """The bare params tree, unboxed, from `{'params': tree}` or the tree itself (boxed or not)."""
    tree = nn.meta.unbox(dict(params))
    return tree["params"] if set(tree) == {"params"} else tree


def flat_params(params: Mapping[str, Any], expected: Mapping[str, Any] | None = None,
                what: str = "this model") -> dict[str, Any]:
    """`params_tree(params)` as {'a/b/c': leaf}. With `expected` (e.g. `factory.abstract_params(model)`),
    raises ValueError naming every leaf that is missing, extra or of another shape."""
    flat = traverse_util.flatten_dict(params_tree(params), sep="/")
    if expected is not None:
        want = traverse_util.flatten_dict(params_tree(expected), sep="/")
        wrong = sorted(k for k in set(flat) | set(want)
                       if k not in flat or k not in want or np.shape(flat[k]) != tuple(want[k].shape))
        if wrong:
            raise ValueError(f"params do not belong to {what} ({len(wrong)} missing, extra or mis-shaped "
                             f"leaves): {', '.join(wrong)}")
    return flat


def as_numpy(tree: Any, dtype: Any) -> Any:
    """Every leaf as a numpy array of `dtype` (the model's param dtype)."""
    return jax.tree.map(lambda v: np.asarray(v, dtype=dtype), tree)


class StateDictReader:
    """Hands out tensors by PyTorch name and remembers which were used.

    Use `take(name, transform)` for every tensor a model consumes, then `finish(expected_tree)`:
    it raises `WeightImportError` listing tensors never taken (unmapped), names asked for but absent
    (missing), and leaves whose shapes differ from the model's.
    """

    def __init__(self, state_dict: Mapping[str, np.ndarray], source: str = "state dict"):
        self.state_dict = dict(state_dict)
        self.source = source
        self.used: set[str] = set()
        self.missing: list[str] = []

    def has(self, name: str) -> bool:
        return name in self.state_dict

    def take(self, name: str, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray | None:
        if name not in self.state_dict:
            self.missing.append(name)
            return None
        self.used.add(name)
        value = np.asarray(self.state_dict[name])
        return transform(value) if transform else value

    def finish(self, params: Mapping[str, Any], expected: Mapping[str, Any] | None = None) -> dict:
        """Checks completeness (and shapes against `expected`, e.g. `factory.abstract_params(model)` unboxed)."""
        problems = []
        unused = sorted(set(self.state_dict) - self.used)
        if unused:
            problems.append(f"{len(unused)} tensor(s) in the file map to nothing in the model: " + ", ".join(unused))
        if self.missing:
            problems.append(f"{len(self.missing)} tensor(s) the model needs are not in the file: "
                            + ", ".join(self.missing))
        flat = traverse_util.flatten_dict(dict(params), sep="/")
        if expected is not None:
            want = traverse_util.flatten_dict(dict(expected), sep="/")
            for key in sorted(set(want) - set(flat)):
                problems.append(f"model parameter {key} {tuple(np.shape(want[key]))} was not produced by the map")
            for key in sorted(set(flat) - set(want)):
                problems.append(f"mapped parameter {key} does not exist in the model")
            for key in sorted(set(flat) & set(want)):
                if tuple(np.shape(flat[key])) != tuple(np.shape(want[key])):
                    problems.append(f"shape mismatch at {key}: file gives {tuple(np.shape(flat[key]))}, "
                                    f"model expects {tuple(np.shape(want[key]))}")
        if problems:
            raise WeightImportError(f"cannot import {self.source}:\n  - " + "\n  - ".join(problems))
        return traverse_util.unflatten_dict(flat, sep="/")


def take_head(reader: StateDictReader, prefix: str, num_classes: int, fresh: Callable[[], Mapping[str, np.ndarray]], *,
              model_name: str, stacklevel: int = 1) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(kernel, bias) of the classifier head `{prefix}.weight`/`.bias` when it has `num_classes` rows. Otherwise
    those of `fresh()`: logged when the file has no head; warned (`UserWarning`, `stacklevel` counted from the
    caller) when its head is for another class count, which is then discarded, as fine-tuning an ImageNet
    classifier on our labels expects."""
    weight = reader.state_dict.get(f"{prefix}.weight")
    if weight is not None and np.ndim(weight) == 2 and np.shape(weight)[0] == num_classes:
        return reader.take(f"{prefix}.weight", linear), reader.take(f"{prefix}.bias")
    if weight is None:
        logging.info("%s import: %s has no %s.*; classifier head (%d classes) freshly initialised",
                     model_name, reader.source, prefix, num_classes)
    else:
        warnings.warn(f"{model_name} import: {reader.source} has a head for {np.shape(weight)[0]} classes but the "
                      f"model has {num_classes}; that head is discarded and a fresh one initialised",
                      UserWarning, stacklevel=stacklevel + 1)
        reader.take(f"{prefix}.weight")
        reader.take(f"{prefix}.bias")
    head = fresh()
    return head["kernel"], head["bias"]


def nested(flat: Mapping[str, Any]) -> dict:
    """{'a/b/c': x} → {'a': {'b': {'c': x}}}; convenient for writing maps as flat paths."""
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if v is not None}, sep="/")
