"""Frozen-VFM token cache: compute a dataset's VFM tokens once, serve them by index.

The VFM is frozen, so its tokens for a given (weights, preprocessing, image) never change;
recomputing them every epoch would dominate tokenizer and refine training on CPU. Tokens are
stored as safetensors shards (no pickle) in a directory named by a key over everything that
determines them: `vfm.fingerprint()` (weights + preprocessing), dataset name, split, image size,
flip mode, length and storage dtype. A different key is a different directory, so a changed VFM
or dataset is recomputed, never silently reused. Shards are written to a temporary directory that
is renamed into place only once complete, and `meta.json` records each shard's size and sha256,
so a partial or damaged cache is detected (then recomputed, or reported with the shard's path).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from model.hashing import sha256_file
from training.lpips import cache_dir

FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class FeatureCacheError(RuntimeError):
    """A feature cache directory is missing, incomplete, or does not match what was asked for."""


def feature_cache_key(
    fingerprint: str, dataset_name: str, split: str, image_size: int, flip: str, length: int, dtype: str
) -> tuple[str, dict[str, Any]]:
    """(directory name, key fields) for a cache; the name is a hash of the fields."""
    fields = {
        "format": FORMAT_VERSION,
        "vfm": fingerprint,
        "dataset": dataset_name,
        "split": split,
        "image_size": int(image_size),
        "flip": flip,
        "length": int(length),
        "dtype": dtype,
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
    return f"{dataset_name}-{split}-{digest}", fields


class FeatureCache:
    """Read access to a complete cache directory: `cache[indices] → float32 (len, N, D)` tokens."""

    def __init__(self, directory: str, verify_hashes: bool = False) -> None:
        meta_path = os.path.join(directory, "meta.json")
        if not os.path.isfile(meta_path):
            raise FeatureCacheError(f"feature cache {directory} has no meta.json (missing or incomplete)")
        try:
            with open(meta_path, encoding="utf-8") as fh:
                meta = json.load(fh)
            self.key_fields: dict[str, Any] = meta["key"]
            self.length = int(meta["length"])
            self.token_shape = tuple(int(s) for s in meta["token_shape"])
            self.shards: list[dict[str, Any]] = meta["shards"]
            self.dtype = meta["dtype"]
            self.shard_size = int(meta["shard_size"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FeatureCacheError(f"{meta_path}: unreadable feature cache metadata ({exc})") from exc
        self.directory = directory
        try:
            self._validate(meta_path, verify_hashes)
        except (KeyError, TypeError, ValueError) as exc:
            raise FeatureCacheError(f"{meta_path}: malformed shard table ({exc!r})") from exc
        self._handles: dict[int, Any] = {}

    def _validate(self, meta_path: str, verify_hashes: bool) -> None:
        """Check the shard table against the files: contiguous, present, right size and shape."""
        expected_start = 0
        for k, shard in enumerate(self.shards):
            path = os.path.join(self.directory, shard["file"])
            if shard["start"] != expected_start or shard["start"] != k * self.shard_size:
                raise FeatureCacheError(
                    f"{meta_path}: shard {shard['file']} starts at {shard['start']}, expected {expected_start}"
                )
            expected_start += shard["count"]
            if not os.path.isfile(path):
                raise FeatureCacheError(f"feature cache shard missing: {path}")
            if os.path.getsize(path) != shard["bytes"]:
                raise FeatureCacheError(
                    f"feature cache shard {path} has {os.path.getsize(path)} bytes, expected {shard['bytes']}"
                )
            if verify_hashes and sha256_file(path) != shard["sha256"]:
                raise FeatureCacheError(f"feature cache shard {path}: sha256 mismatch (corrupt)")
            self._check_header(path, shard["count"])
        if expected_start != self.length:
            raise FeatureCacheError(
                f"{meta_path}: shards hold {expected_start} items, expected {self.length}"
            )

    def _check_header(self, path: str, count: int) -> None:
        try:
            with safe_open(path, framework="pt") as fh:
                shape = tuple(fh.get_slice("tokens").get_shape())
        except (SafetensorError, OSError, KeyError) as exc:
            raise FeatureCacheError(f"feature cache shard {path} is unreadable ({exc})") from exc
        if shape != (count, *self.token_shape):
            raise FeatureCacheError(
                f"feature cache shard {path} holds {shape}, expected {(count, *self.token_shape)}"
            )

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def _handle(self, shard_index: int) -> Any:
        if shard_index not in self._handles:
            path = os.path.join(self.directory, self.shards[shard_index]["file"])
            self._handles[shard_index] = safe_open(path, framework="pt")
        return self._handles[shard_index]

    def __getitem__(self, indices: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Tokens for `indices` (an int gives N×D, a sequence or 1-D tensor gives len×N×D), float32."""
        single = isinstance(indices, int)
        idx = torch.as_tensor([indices] if single else indices, dtype=torch.int64).flatten()
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.length):
            raise IndexError(f"feature cache index out of range [0, {self.length}): {idx.min()}..{idx.max()}")
        out = torch.empty((idx.numel(), *self.token_shape), dtype=torch.float32)
        for row, i in enumerate(idx.tolist()):
            s = i // self.shard_size
            local = i - self.shards[s]["start"]
            out[row] = self._handle(s).get_slice("tokens")[local : local + 1][0].to(torch.float32)
        return out[0] if single else out


class WithIndex(Dataset):
    """Wrap a dataset so items become (image, label, index): the index looks up cached tokens."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image, label = self.base[index]
        return image, label, index


def _compute(
    vfm: nn.Module,
    dataset: Dataset,
    out_dir: str,
    token_dtype: torch.dtype,
    batch_size: int,
    shard_size: int,
    device: torch.device,
    num_workers: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[tuple[int, ...], list[dict[str, Any]]]:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    shards: list[dict[str, Any]] = []
    pending: list[torch.Tensor] = []
    token_shape: tuple[int, ...] | None = None
    done, total = 0, len(dataset)

    def flush(final: bool) -> None:
        nonlocal pending
        while pending and (final or sum(t.shape[0] for t in pending) >= shard_size):
            block = torch.cat(pending)
            chunk, rest = block[:shard_size].contiguous(), block[shard_size:]
            pending = [rest] if rest.shape[0] else []
            name = f"shard_{len(shards):05d}.safetensors"
            path = os.path.join(out_dir, name)
            save_file({"tokens": chunk}, path)
            start = sum(s["count"] for s in shards)
            shards.append(
                {
                    "file": name,
                    "start": start,
                    "count": int(chunk.shape[0]),
                    "bytes": os.path.getsize(path),
                    "sha256": sha256_file(path),
                }
            )

    with torch.inference_mode():
        for batch in loader:
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            tokens = vfm(images.to(device))
            if tokens.ndim != 3 or tokens.shape[0] != images.shape[0]:
                raise FeatureCacheError(f"VFM must return (B, N, D) tokens, got {tuple(tokens.shape)}")
            if token_shape is None:
                token_shape = tuple(tokens.shape[1:])
            elif tuple(tokens.shape[1:]) != token_shape:
                raise FeatureCacheError(
                    f"VFM token shape changed within the dataset: {tuple(tokens.shape[1:])} vs {token_shape}"
                )
            stored = tokens.to("cpu", token_dtype)
            if not torch.isfinite(stored).all():
                raise FeatureCacheError(
                    f"VFM tokens are not finite once stored as {token_dtype}; use dtype='float32'"
                )
            pending.append(stored)
            done += images.shape[0]
            flush(final=False)
            if progress is not None:
                progress(done, total)
        flush(final=True)
    if token_shape is None:
        raise FeatureCacheError("cannot cache features of an empty dataset")
    return token_shape, shards


def build_feature_cache(
    vfm: nn.Module,
    dataset: Dataset,
    *,
    dataset_name: str,
    split: str,
    image_size: int,
    flip: str = "none",
    root: str | None = None,
    dtype: str = "float16",
    batch_size: int = 64,
    shard_size: int = 4096,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    on_corrupt: str = "recompute",
    progress: Callable[[int, int], None] | None = None,
) -> FeatureCache:
    """Open the cache for this (VFM, dataset) pair, computing it first if absent or invalid.

    `vfm` is a FrozenVFM (`fingerprint()`, `forward(x01) → (B, N, D)`); `dataset` yields
    (image, label) in order. float16 storage halves disk use (tokens are O(1) activations); a
    value that overflows it is an error, not a silent inf. `on_corrupt`: `recompute` or `error`.
    Root defaults to `<cache dir>/features` ($PAE_CACHE_DIR or ~/.cache/pae).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if on_corrupt not in ("recompute", "error"):
        raise ValueError(f"on_corrupt must be 'recompute' or 'error', got {on_corrupt!r}")
    if batch_size <= 0 or shard_size <= 0:
        raise ValueError(f"batch_size and shard_size must be positive, got {batch_size}, {shard_size}")
    fingerprint = getattr(vfm, "fingerprint", None)
    if not callable(fingerprint):
        raise TypeError(f"{type(vfm).__name__} has no fingerprint(): the cache key needs one")
    name, fields = feature_cache_key(
        fingerprint(), dataset_name, split, image_size, flip, len(dataset), dtype
    )
    root = root or os.path.join(cache_dir(), "features")
    directory = os.path.join(root, name)
    if os.path.exists(directory):
        try:
            cache = FeatureCache(directory)
            if cache.key_fields != fields:
                raise FeatureCacheError(
                    f"{directory}: metadata key {cache.key_fields} does not match {fields}"
                )
            return cache
        except FeatureCacheError:
            if on_corrupt == "error":
                raise
            shutil.rmtree(directory)
    if device is None:
        device = next((p.device for p in vfm.parameters()), torch.device("cpu"))
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=root)
    try:
        token_shape, shards = _compute(
            vfm,
            dataset,
            tmp,
            _DTYPES[dtype],
            batch_size,
            shard_size,
            torch.device(device),
            num_workers,
            progress,
        )
        meta = {
            "key": fields,
            "length": len(dataset),
            "token_shape": list(token_shape),
            "dtype": dtype,
            "shard_size": shard_size,
            "shards": shards,
        }
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)
        try:
            os.replace(tmp, directory)
        except OSError:
            if not os.path.isdir(directory):
                raise
            # another process (e.g. a second rank) finished the same cache first: use theirs
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return FeatureCache(directory)
