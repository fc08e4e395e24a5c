"""Reading `torch.save` files (`.pth`, `.pt`, `.bin`) into numpy without torch, and without running their code.

A torch file is a pickle whose tensors point into raw storages: entries `<archive>/data/<key>` of a zip
(torch's format since 1.6) or blocks after the pickle (the legacy format, e.g. older hub weights); both
are read. The unpickler executes nothing from the file: it answers `collections.OrderedDict` and torch's
tensor-rebuild functions with its own numpy versions, and every other global the file names (an
`argparse.Namespace` of training arguments, an optimiser class) with an inert placeholder. A state dict
that ends up holding such a placeholder is refused, naming it.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath


class TorchFileError(ValueError):
    """A file that is not a torch.save state dict this reader accepts (the message says why)."""


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
# Entries of a training checkpoint that hold the model's state dict, in order of preference.
_STATE_DICT_ENTRIES = ("state_dict", "model")


class _Opaque:
    """What the unpickler builds for any global it does not allow: accepts everything, does nothing."""
    global_name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _StorageRef:
    """A storage's key and dtype; its bytes are looked up when a tensor is rebuilt (or, legacy, later)."""

    def __init__(self, key: str, dtype: Any):
        self.key, self.dtype = key, np.dtype(dtype)


class _LazyTensor:
    def __init__(self, storage: _StorageRef, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    def materialise(self, storages: dict[str, bytes]) -> np.ndarray:
        flat = np.frombuffer(storages[self.storage.key], self.storage.dtype)
        itemsize = self.storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], self.size, [s * itemsize for s in self.stride])
        return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, legacy: bool):
        super().__init__(file, encoding="utf-8")
        self.legacy = legacy
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        return type(name, (_Opaque,), {"global_name": f"{module}.{name}"})

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if self.legacy and pid[5] is not None:
            raise pickle.UnpicklingError("storage views of the pre-1.0 torch format are not supported")
        if isinstance(storage_type, type) and issubclass(storage_type, _Opaque):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type.global_name}")
        return self.storages.setdefault(key, _StorageRef(key, storage_type))


def _materialise(obj: Any, storages: dict[str, bytes]) -> Any:
    if isinstance(obj, _LazyTensor):
        return obj.materialise(storages)
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v, storages)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v, storages) for v in obj)
    return obj


def _read_zip(data: bytes) -> Any:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise TorchFileError("not a torch.save zip archive: expected one data.pkl entry")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").decode().strip() != "little":
            raise TorchFileError("big-endian torch files are not supported")
        obj = _Unpickler(io.BytesIO(archive.read(pickles[0])), legacy=False).load()
        storages = {n[len(prefix) + len("data/"):]: archive.read(n) for n in names if n.startswith(f"{prefix}data/")}
    return _materialise(obj, storages)


def _read_legacy(data: bytes) -> Any:
    stream = io.BytesIO(data)
    if pickle.load(stream) != _LEGACY_MAGIC:
        raise TorchFileError("not a torch.save file: neither a zip archive nor the legacy magic number")
    pickle.load(stream)        # protocol version
    sys_info = pickle.load(stream)
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise TorchFileError("big-endian torch files are not supported")
    unpickler = _Unpickler(stream, legacy=True)
    obj = unpickler.load()
    storages = {}
    for key in pickle.load(stream):   # then each storage: its element count (int64), its bytes
        count = int(np.frombuffer(stream.read(8), np.int64)[0])
        storages[str(key)] = stream.read(count * unpickler.storages[str(key)].dtype.itemsize)
    return _materialise(obj, storages)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, np.ndarray) for v in obj.values())


def load(path: str | epath.PathLike) -> dict[str, np.ndarray]:
    """The state dict in a torch file: the top-level object, or its `state_dict` / `model` entry (training
    checkpoints). Anything else is a `TorchFileError` saying what the file holds."""
    path = epath.Path(path)
    data = path.read_bytes()
    try:
        obj = _read_zip(data) if zipfile.is_zipfile(io.BytesIO(data)) else _read_legacy(data)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as e:
        raise TorchFileError(f"{path}: cannot read it as a torch.save file ({e})") from e
    if not _is_state_dict(obj) and isinstance(obj, dict):
        entry = next((k for k in _STATE_DICT_ENTRIES if _is_state_dict(obj.get(k))), None)
        obj = obj[entry] if entry else obj
    if not _is_state_dict(obj):
        what = f"a dict with entries {sorted(map(str, obj))}" if isinstance(obj, dict) else type(obj).__name__
        opaque = sorted({v.global_name for v in (obj.values() if isinstance(obj, dict) else [obj])
                         if isinstance(v, _Opaque)})
        found = f" (holding {', '.join(opaque)} objects)" if opaque else ""
        raise TorchFileError(f"{path} holds {what}{found}, not a state dict of tensors; save one with "
                                "torch.save(model.state_dict(), path)")
    return dict(obj)
