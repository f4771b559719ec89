"""The files a user brings, read as `{official tensor name: lazily loaded tensor}`.

- `.pt` / `.pth`: a `torch.save` archive read by `torch_archive` (nothing pickled is run). The weights
  sit under an entry: `model` (and maybe `ema`) for the tokenizer, `ema` (falling back to the dict
  itself) for the generator, as the authors' loaders read them.
- `.safetensors`: the tensors themselves.
- A diffusers-port folder: `vae/` and `transformer/`, each `diffusion_pytorch_model.safetensors`
  (or its sharded index), holding the original tensor names.

Name prefixes added by wrappers (`module.` from DDP, `_orig_mod.` from `torch.compile`) are removed
per name, as the authors' loaders do; one `model.` or `transformer.` prefix shared by every name is
removed too (the diffusers port's converter strips exactly one such prefix).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

from export.importer.torch_archive import LazyTensor, Refused, UnsafeCheckpointError, load_archive
from model.hashing import sha256_file

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SHARED_PREFIXES = ("model.", "transformer.", "module.")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SourceError(ValueError):
    """An input file or folder is missing, unreadable, or does not hold what it should."""


class TensorRef(Protocol):
    """A tensor known by shape and dtype; `load()` reads it (a fresh CPU tensor)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def load(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class SafetensorsRef:
    """One tensor of an open safetensors file (memory-mapped; read on `load()`)."""

    handle: Any
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def load(self) -> torch.Tensor:
        return self.handle.get_tensor(self.name)


@dataclass
class SourceFile:
    """Provenance of one input file: what it is, which entry was read, what was not."""

    path: Path
    role: str
    entry: str | None = None
    ignored: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    shards: list[Path] = field(default_factory=list)
    _sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    def describe(self, hash_files: bool = True) -> dict[str, object]:
        """Provenance as JSON; the sha256 (a full read of the file) only when `hash_files`."""
        return {
            "file": str(self.path),
            "role": self.role,
            "bytes": self.path.stat().st_size,
            "sha256": self.sha256 if hash_files else None,
            "entry": self.entry,
            "refused_pickled_objects": self.refused,
            "entries_not_read": self.ignored,
            **(
                {"shards": {p.name: sha256_file(p) if hash_files else None for p in self.shards}}
                if self.shards
                else {}
            ),
        }


def _open_safetensors(path: Path) -> dict[str, TensorRef]:
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:
        raise SourceError(f"cannot read safetensors file {path}: {exc}") from exc
    refs: dict[str, TensorRef] = {}
    for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
        piece = handle.get_slice(name)
        kind = piece.get_dtype()
        if kind not in _SAFETENSORS_DTYPES:
            raise SourceError(f"{path}: tensor {name!r} has dtype {kind}, which this importer does not read")
        refs[name] = SafetensorsRef(handle, name, tuple(piece.get_shape()), _SAFETENSORS_DTYPES[kind])
    return refs


def _strip_prefixes(tensors: Mapping[str, TensorRef], where: Path) -> dict[str, TensorRef]:
    out: dict[str, TensorRef] = {}
    for name, ref in tensors.items():
        short = name
        while short.startswith(WRAPPER_PREFIXES):
            short = short.split(".", 1)[1]
        if short in out:
            raise SourceError(f"{where}: {name!r} and another tensor both become {short!r} without prefixes")
        out[short] = ref
    for prefix in SHARED_PREFIXES:
        if out and all(name.startswith(prefix) for name in out):
            return {name[len(prefix) :]: ref for name, ref in out.items()}
    return out


def _weights_entry(obj: Any, path: Path, order: Sequence[str], source: SourceFile) -> Mapping[str, Any]:
    """The state dict under the first entry of `order` present ("" = the dict itself)."""
    if not isinstance(obj, dict):
        raise SourceError(f"{path} holds a pickled {type(obj).__name__}, not a dict of weights")
    for entry in order:
        if entry == "" and obj and all(isinstance(v, LazyTensor | Refused) for v in obj.values()):
            source.entry = "(the whole file)"
            return obj
        if entry and isinstance(obj.get(entry), dict):
            source.entry = entry
            source.ignored = sorted(k for k in obj if k != entry)
            return obj[entry]
    entries = sorted(str(k) for k in obj)
    wanted = " or ".join(repr(e) if e else "the file itself" for e in order)
    raise SourceError(f"{path} has no weights under {wanted}; its entries are {entries}")


def read_weights(path: Path, role: str, entries: Sequence[str]) -> tuple[dict[str, TensorRef], SourceFile]:
    """`{name: tensor}` of one checkpoint file, from the first of `entries` present (.pt only)."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{role} file {path} does not exist")
    source = SourceFile(path, role)
    if path.suffix == ".safetensors":
        return _strip_prefixes(_open_safetensors(path), path), source
    obj, refused = load_archive(path)
    source.refused = sorted(set(refused))
    weights = _weights_entry(obj, path, entries, source)
    bad = {str(k): v for k, v in weights.items() if not isinstance(v, LazyTensor)}
    if bad:
        named = ", ".join(
            f"{k} = {v.describe() if isinstance(v, Refused) else type(v).__name__}"
            for k, v in list(bad.items())[:5]
        )
        raise UnsafeCheckpointError(
            f"{path}: entry {source.entry!r} must hold tensors only; refused or non-tensor values: {named}"
        )
    return _strip_prefixes(weights, path), source


def read_latent_stats(path: Path) -> tuple[torch.Tensor, torch.Tensor, SourceFile]:
    """(mean, std) as flat float32 vectors from `latents_stats.pt` (or a safetensors with both)."""
    tensors, source = read_weights(Path(path), "latent statistics", ("",))
    missing = [k for k in ("mean", "std") if k not in tensors]
    if missing:
        raise SourceError(f"{path} lacks {missing}; it holds {sorted(tensors)}")
    mean, std = (tensors[k].load().float().reshape(-1) for k in ("mean", "std"))
    if mean.numel() != std.numel():
        raise SourceError(f"{path}: mean has {mean.numel()} values, std {std.numel()}")
    if not bool(torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
        raise SourceError(f"{path}: mean must be finite and std finite and > 0")
    return mean, std, source


def _diffusers_part(folder: Path, part: str, role: str) -> tuple[dict[str, TensorRef], SourceFile]:
    base = folder / part
    single, index = base / DIFFUSERS_WEIGHTS, base / f"{DIFFUSERS_WEIGHTS}.index.json"
    if single.is_file():
        return read_weights(single, role, ())
    if not index.is_file():
        raise SourceError(f"diffusers folder {folder} has neither {single} nor {index}")
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"{index} is not a safetensors index: {exc}") from exc
    merged: dict[str, TensorRef] = {}
    for shard in shards:
        if "/" in shard or "\\" in shard:
            raise SourceError(f"{index} names a shard outside its folder: {shard!r}")
        merged.update(_open_safetensors(base / shard))
    return _strip_prefixes(merged, index), SourceFile(index, role, shards=[base / s for s in shards])


def read_diffusers(folder: Path) -> tuple[dict[str, TensorRef], SourceFile, dict[str, TensorRef], SourceFile]:
    """(tokenizer tensors, its file, generator tensors, its file) of a diffusers-port folder.

    The port's `config.json` files are not trusted for the architecture (its XL/1 config omits SwiGLU,
    RoPE and RMSNorm, and its VAE config names only a class): the tensors decide.
    """
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise SourceError(f"{folder} is not a diffusers folder: model_index.json is missing")
    pae, pae_source = _diffusers_part(folder, "vae", "PAE tokenizer (diffusers vae/)")
    dit, dit_source = _diffusers_part(folder, "transformer", "LightningDiT (diffusers transformer/)")
    return pae, pae_source, dit, dit_source
