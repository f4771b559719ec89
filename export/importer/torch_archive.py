"""Tensors out of a `torch.save` archive without running a single pickled callable.

A `.pt` file is a zip holding `data.pkl` (a pickle of the saved object) and one raw little-endian
file per tensor storage. Unpickling normally imports and calls whatever the pickle names, so a
hostile file runs code the moment it is loaded. This reader resolves only the handful of globals a
state dict needs (tensor and parameter rebuilding, storage types, `OrderedDict`), each mapped to a
function of this module — nothing of torch's own is called. Every other global is refused: it is
never imported or called; it becomes an inert `Refused` record naming it, so a checkpoint whose
weights are fine but which also pickles, say, a training-config object can still be read, and the
importer reports the refused object by name (an error when it sits where weights are needed).

Storages are read lazily, so taking the `ema` entry of a checkpoint that also holds `model` and the
optimiser state reads only the `ema` bytes.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class UnsafeCheckpointError(ValueError):
    """A pickled checkpoint holds something other than tensors where tensors are needed, or is not a
    `torch.save` zip archive this reader understands."""


@dataclass(frozen=True)
class Refused:
    """Stands in for an object whose class or function the reader refused to import or call."""

    global_name: str
    args: tuple[Any, ...] = ()

    def describe(self) -> str:
        return f"{self.global_name} (a pickled {'call' if self.args else 'object'}; never imported or run)"


class _Placeholder:
    """Base of the classes a refused global resolves to: calling or instantiating one only records
    the arguments, and the unpickler may append to it or set items or state on it (also recorded)."""

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Placeholder:  # pickle's NEWOBJ path
        obj = super().__new__(cls)
        obj.args, obj.state = args, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state.append(state)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.state.append((key, value))

    def append(self, value: Any) -> None:
        self.state.append(value)

    def extend(self, values: Any) -> None:
        self.state.extend(values)


def _placeholder_class(full_name: str) -> type[_Placeholder]:
    return type("RefusedGlobal", (_Placeholder,), {"global_name": full_name})


@dataclass(frozen=True)
class LazyStorage:
    """One storage of the archive, read from the zip each time a tensor viewing it is loaded (not
    cached: a multi-GB entry is then held once, as the tensors the caller keeps)."""

    archive: ArchiveFile
    key: str
    dtype: torch.dtype
    numel: int

    def tensor(self) -> torch.Tensor:
        raw = bytearray(self.archive.read_storage(self.key))
        expected = self.numel * torch.empty((), dtype=self.dtype).element_size()
        if len(raw) != expected:
            raise UnsafeCheckpointError(
                f"{self.archive.path}: storage {self.key} holds {len(raw)} bytes, expected {expected}"
            )
        return torch.frombuffer(raw, dtype=self.dtype) if raw else torch.empty(0, dtype=self.dtype)


@dataclass(frozen=True)
class LazyTensor:
    """A tensor of the archive known by its shape and dtype until `load()` reads its bytes."""

    storage: LazyStorage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    def load(self) -> torch.Tensor:
        """The tensor as a fresh contiguous CPU tensor."""
        flat = self.storage.tensor()
        reach = sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
        if all(self.shape) and self.offset + reach >= flat.numel():
            raise UnsafeCheckpointError(
                f"{self.storage.archive.path}: a tensor view reaches past its storage {self.storage.key}"
            )
        return flat.as_strided(self.shape, self.stride, self.offset).clone()


class ArchiveFile:
    """An open `torch.save` zip archive: its record prefix, byte order and storage files."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not zipfile.is_zipfile(self.path):
            raise UnsafeCheckpointError(
                f"{self.path} is not a torch.save zip archive (the pre-1.6 legacy format is not read: "
                "re-save it with a current torch, or convert it to safetensors)"
            )
        self._zip = zipfile.ZipFile(self.path)
        pickles = [n for n in self._zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise UnsafeCheckpointError(f"{self.path}: expected one <name>/data.pkl record, found {pickles}")
        self.prefix = pickles[0].rsplit("/", 1)[0]
        order_name = f"{self.prefix}/byteorder"
        if order_name in self._zip.namelist() and self._zip.read(order_name).strip() != b"little":
            raise UnsafeCheckpointError(f"{self.path}: big-endian archives are not supported")

    def read_pickle(self) -> bytes:
        return self._zip.read(f"{self.prefix}/data.pkl")

    def read_storage(self, key: str) -> bytes:
        if not key.isalnum():
            raise UnsafeCheckpointError(f"{self.path}: storage key {key!r} is not a plain name")
        return self._zip.read(f"{self.prefix}/data/{key}")


class _Unpickler(pickle.Unpickler):
    """Resolves only the globals a state dict needs, each to this module's own code."""

    def __init__(self, archive: ArchiveFile, refused: list[str]) -> None:
        super().__init__(io.BytesIO(archive.read_pickle()))
        self.archive, self.refused = archive, refused
        self.storages: dict[str, LazyStorage] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles (torch.save's) spell Python 3 names the Python 2 way; name them as today.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if full == "torch._utils._rebuild_tensor_v2":
            return _rebuild_tensor
        if full in ("torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"):
            return _rebuild_parameter
        if full == "collections.OrderedDict":
            return collections.OrderedDict
        self.refused.append(full)
        return _placeholder_class(full)

    def persistent_load(self, pid: Any) -> LazyStorage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"{self.archive.path}: unknown persistent record {pid!r:.80}")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise UnsafeCheckpointError(f"{self.archive.path}: malformed storage record {pid!r:.80}")
        if key not in self.storages:
            self.storages[key] = LazyStorage(self.archive, key, kind.dtype, numel)
        return self.storages[key]


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _rebuild_tensor(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, *extra: Any
) -> LazyTensor:
    if not isinstance(storage, LazyStorage):
        raise UnsafeCheckpointError(f"a tensor's storage is {type(storage).__name__}, not a storage record")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)):
        raise UnsafeCheckpointError(f"malformed tensor size/stride {size!r} / {stride!r}")
    if not all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride)):
        raise UnsafeCheckpointError(f"tensor offset, size and stride must be ints >= 0, got {size!r}")
    return LazyTensor(storage, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any, *extra: Any) -> Any:
    return data


def load_archive(path: Path) -> tuple[Any, list[str]]:
    """Unpickle `path` with tensors as `LazyTensor` and refused globals as `Refused`.

    Returns (object, names of every refused global). Nothing named by the pickle is ever executed.
    """
    archive = ArchiveFile(path)
    refused: list[str] = []
    try:
        obj = _Unpickler(archive, refused).load()
    except UnsafeCheckpointError:
        raise
    except Exception as exc:
        raise UnsafeCheckpointError(f"{path}: cannot read the pickled record: {exc}") from exc
    return _freeze(obj), refused


def _freeze(obj: Any) -> Any:
    """Replace refusal placeholders by `Refused` records, recursively through dicts, lists, tuples."""
    if isinstance(obj, _Placeholder):
        return Refused(obj.global_name, tuple(_freeze(a) for a in obj.args))
    if isinstance(obj, type) and issubclass(obj, _Placeholder):
        return Refused(obj.global_name)
    if isinstance(obj, dict):
        return {k: _freeze(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_freeze(v) for v in obj)
    return obj
