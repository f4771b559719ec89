"""How each preset is trained: one frozen config per stage, bundled as the preset's `Recipe`.

The architecture a recipe trains is the preset (`model.presets`); everything here is a training
choice — optimiser, schedule, loss weights, budgets, what evaluation measures. A recipe's sections
carry the names of the stages that read them, and `--set <section>.<field>=…` reaches them by the same
names: `refine`, `tokenizer`, `generator`, `evaluate`, and `data` (which training images the stages
see). Variants are `dataclasses.replace(recipe, tokenizer=replace(recipe.tokenizer, steps=…))`.

The paper recipes follow PAE (arXiv 2605.07915) for the generator (LightningDiT's 80-epoch schedule)
and, since the paper leaves the tokenizer schedule open, RAE's released stage-1 recipe (arXiv
2510.11690) for the tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from model import validation as check

FD_NETWORKS = ("efficientnet-lite2", "inception-v3")
LPIPS_NETS = ("vgg", "alex")


@dataclass(frozen=True)
class RefineConfig:
    """Stage `refine` (the paper's prior refinement): projector P_t and deprojector Q_t on cached VFM
    tokens, trained with AdamW and a cosine schedule.

    `depth` is Q_t's ViT depth (4 in the paper). The structural reference H_ref is the VFM map
    upsampled ×`upsample`, low-passed with a Gaussian of `lowpass_sigma` (in upsampled pixels) blended
    in at `lowpass_strength`, and area-downsampled back to the token grid (`refine.lowpass_reference`).
    """

    steps: int
    batch_size: int
    lr: float
    lr_min: float
    warmup_steps: int
    depth: int
    mlp_ratio: float = 4.0
    weight_decay: float = 0.0
    rep_weight: float = 1.0
    gram_weight: float = 1.0
    upsample: int = 4
    lowpass_sigma: float = 2.0
    lowpass_strength: float = 0.4
    log_every: int = 50
    ckpt_every: int = 1000

    def __post_init__(self) -> None:
        check.positive_ints(self, "steps", "batch_size", "depth", "upsample", "log_every", "ckpt_every")
        check.non_negative_ints(self, "warmup_steps")
        check.positive_numbers(self, "lr", "lr_min", "mlp_ratio", "lowpass_sigma")
        check.non_negative_numbers(self, "weight_decay", "rep_weight", "gram_weight")
        check.fraction(self, "lowpass_strength", closed=True)
        if self.lr_min > self.lr:
            raise ValueError(f"RefineConfig.lr_min must be <= lr, got {self.lr_min} > {self.lr}")
        if self.rep_weight + self.gram_weight == 0:
            raise ValueError("RefineConfig.rep_weight and gram_weight cannot both be 0 (nothing to train)")


@dataclass(frozen=True)
class TokenizerTrainConfig:
    """Stage `tokenizer`: optimiser, schedule and loss weights of PAE's objective.

    Loss: l1·L1 + lpips·LPIPS + gan·(adaptive)·GAN + ssr·SSR + mcr·MCR + scr·SCR; a weight of 0 switches
    its term off (all four of gan/ssr/mcr/scr at 0 is the reconstruction-only baseline). `hflip`
    trains on mirror images too; `refine` and `latents` follow it, so the cached tokens, targets and
    latents include the mirrored rows exactly when the tokenizer uses them.
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
    log_every: int = 50
    ckpt_every: int = 1000

    def __post_init__(self) -> None:
        check.positive_ints(self, "batch_size", "steps", "grad_accum", "log_every", "ckpt_every")
        check.non_negative_ints(self, "warmup_steps", "gan_start_step", "disc_start_step")
        check.positive_numbers(self, "lr", "lr_min", "disc_lr")
        check.non_negative_numbers(
            self,
            "weight_decay",
            "l1_weight",
            "lpips_weight",
            "gan_weight",
            "ssr_weight",
            "mcr_weight",
            "scr_weight",
        )
        if self.grad_clip is not None:
            check.positive_numbers(self, "grad_clip")
        check.betas(self)
        check.fraction(self, "ema_decay")
        check.one_of(self, "lpips_net", LPIPS_NETS)
        low, high = self.mcr_angles
        if not 0.0 < low < high < 90.0:
            raise ValueError(
                f"TokenizerTrainConfig.mcr_angles must satisfy 0 < medium < large < 90°, got {self.mcr_angles}"
            )


@dataclass(frozen=True)
class GeneratorTrainConfig:
    """Stage `generator`: LightningDiT on normalised latents — AdamW at a constant lr after warmup,
    logit-normal t with a train shift, an EMA of the weights. Label dropout is the DiT's own
    `class_dropout` (it also fixes the null class the sampler guides with)."""

    batch_size: int
    steps: int
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    ema_decay: float = 0.9999
    train_shift: float = 0.7
    grad_clip: float | None = None
    grad_accum: int = 1
    sample_every: int = 1000
    log_every: int = 50
    ckpt_every: int = 1000

    def __post_init__(self) -> None:
        check.positive_ints(
            self, "batch_size", "steps", "grad_accum", "sample_every", "log_every", "ckpt_every"
        )
        check.non_negative_ints(self, "warmup_steps")
        check.positive_numbers(self, "lr", "train_shift")
        check.non_negative_numbers(self, "weight_decay")
        if self.grad_clip is not None:
            check.positive_numbers(self, "grad_clip")
        check.betas(self)
        check.fraction(self, "ema_decay")


@dataclass(frozen=True)
class EvaluateConfig:
    """Stage `evaluate`: what it measures and on how many samples (every count is in metrics.json).

    `num_recon = 0` means the whole evaluation split (PSNR, SSIM and the latent metrics use it);
    LPIPS and the reconstruction FD use the first `lpips_samples` / `fd_samples` of those (0 = all),
    because both run a large network per image. Generation FD uses `gen_num_samples` class-balanced
    samples from per-image seeds `gen_seed + i`, against the same `fd_samples` real images.
    """

    split: str = "test"
    num_recon: int = 0
    lpips_samples: int = 0
    fd_samples: int = 0
    batch_size: int = 200
    ssc_samples: int = 500
    lpc_samples: int = 1000
    gen_num_samples: int = 1000
    gen_seed: int = 0
    fd_network: str = "efficientnet-lite2"
    classifier_steps: int = 1500
    classifier_seed: int = 0

    def __post_init__(self) -> None:
        check.positive_ints(
            self, "batch_size", "ssc_samples", "lpc_samples", "gen_num_samples", "classifier_steps"
        )
        check.non_negative_ints(
            self, "num_recon", "lpips_samples", "fd_samples", "gen_seed", "classifier_seed"
        )
        check.one_of(self, "fd_network", FD_NETWORKS)


@dataclass(frozen=True)
class DataConfig:
    """Which training images the stages see: the first `train_per_class` of each class (0 = the whole
    training split). A small default scale's budget is set by how many images the frozen VFM must see."""

    train_per_class: int = 0

    def __post_init__(self) -> None:
        check.non_negative_ints(self, "train_per_class")


@dataclass(frozen=True)
class RAETrainConfig:
    """What the tokenizer stage adds to L1 + LPIPS + GAN when the latent is RAE's
    (`autoencoder.kind=rae`): the decoder sees z + σ·ε with σ ~ U(0, `noise_tau`) per image (RAE,
    arXiv 2510.11690, §3.2: τ = 0.8), so it decodes the diffusion model's slightly-off latents well."""

    noise_tau: float = 0.8

    def __post_init__(self) -> None:
        check.non_negative_numbers(self, "noise_tau")


@dataclass(frozen=True)
class VAETrainConfig:
    """What the tokenizer stage adds to L1 + LPIPS + GAN when the latent is a KL autoencoder's
    (`autoencoder.kind=vae`): `kl_weight`·KL in LDM's convention (arXiv 2112.10752: 1e-6 against
    a reconstruction loss summed over pixels), so a small weight that keeps the latent's scale in
    check without trading reconstruction for a Gaussian-looking latent."""

    kl_weight: float = 1e-6

    def __post_init__(self) -> None:
        check.non_negative_numbers(self, "kl_weight")


@dataclass(frozen=True)
class Recipe:
    """Everything that says how a preset is trained, one section per stage that reads it (`rae` and
    `vae` are read by the tokenizer stage when the preset's latent is theirs)."""

    refine: RefineConfig
    tokenizer: TokenizerTrainConfig
    generator: GeneratorTrainConfig
    evaluate: EvaluateConfig
    data: DataConfig = DataConfig()
    rae: RAETrainConfig = RAETrainConfig()
    vae: VAETrainConfig = VAETrainConfig()


# ImageNet at global batch 512: one epoch is 2502 steps.
IMAGENET_TRAIN_IMAGES = 1_281_167
_EPOCH_512 = IMAGENET_TRAIN_IMAGES // 512


def _paper() -> Recipe:
    """RAE's 16-epoch stage-1 schedule for the tokenizer (1-epoch warmup, cosine to 2e-5, discriminator
    from epoch 6, GAN from epoch 8, the paper's loss weights); 4 epochs of refinement with Q_t 4 layers
    deep; `DiT80ep_PAE_DINOv2L_d32` for the generator (100k steps × 1024, constant lr, EMA 0.9999,
    checkpoints every 20k); evaluation by the ADM protocol's 50 000 samples on the val split."""
    return Recipe(
        refine=RefineConfig(
            steps=4 * _EPOCH_512,
            batch_size=512,
            lr=2e-4,
            lr_min=2e-5,
            warmup_steps=(4 * _EPOCH_512) // 10,
            depth=4,
            log_every=100,
            ckpt_every=_EPOCH_512,
        ),
        tokenizer=TokenizerTrainConfig(
            batch_size=512,
            steps=16 * _EPOCH_512,
            warmup_steps=_EPOCH_512,
            gan_start_step=8 * _EPOCH_512,
            disc_start_step=6 * _EPOCH_512,
            log_every=100,
            ckpt_every=_EPOCH_512,
        ),
        generator=GeneratorTrainConfig(
            batch_size=1024, steps=100_000, sample_every=20_000, log_every=100, ckpt_every=20_000
        ),
        evaluate=EvaluateConfig(split="val", gen_num_samples=50_000, ssc_samples=1000, lpc_samples=1000),
    )


def _fmnist32_tiny() -> Recipe:
    """Sized so `make train` (every stage, 2 000 images per class) fits an hour on 2 CPU cores.

    The tokenizer's LPIPS uses AlexNet for the same reason (VGG16 costs ~30x more per step). Its loss
    weights are far below the paper's because at this budget the paper's weights cap reconstruction:
    SCR's per-token cosine pins each 16-d token to its refined target, MCR asks one small decoder to map
    strong rotations of every token onto the same image, and the GAN trades PSNR for texture. The
    measurements behind these numbers are in checkpoints/fmnist32-tiny/MODEL_CARD.md. Evaluation uses
    the whole test split for PSNR, SSIM, SSC and GSQ, and fixed prefixes for the per-image networks
    (LPIPS-VGG, the FD network, LPC's decodes).
    """
    return Recipe(
        refine=RefineConfig(
            steps=300,
            batch_size=128,
            lr=1e-3,
            lr_min=1e-4,
            warmup_steps=30,
            depth=2,
            log_every=50,
            ckpt_every=100,
        ),
        tokenizer=TokenizerTrainConfig(
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
            # Fashion-MNIST's shoes all face one way: mirrored images would be off-distribution.
            hflip=False,
            log_every=50,
            ckpt_every=100,
        ),
        generator=GeneratorTrainConfig(
            batch_size=32,
            steps=2500,
            lr=1e-3,
            warmup_steps=50,
            ema_decay=0.995,
            sample_every=500,
            ckpt_every=100,
        ),
        evaluate=EvaluateConfig(
            lpips_samples=500, fd_samples=500, lpc_samples=100, ssc_samples=300, gen_num_samples=500
        ),
        data=DataConfig(train_per_class=2000),
    )


class _RecipeRegistry(Mapping[str, Recipe]):
    """preset name → Recipe, built on each lookup (like `model.presets.PRESETS`)."""

    def __init__(self, builders: dict[str, Callable[[], Recipe]]) -> None:
        self._builders = builders

    def __getitem__(self, name: str) -> Recipe:
        if name not in self._builders:
            raise KeyError(
                f"no training recipe for preset {name!r}; recipes exist for {sorted(self._builders)}"
            )
        return self._builders[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)


RECIPES: Mapping[str, Recipe] = _RecipeRegistry(
    {
        "imagenet256-dinov2l": _paper,
        "imagenet256-dinov3l": _paper,
        "imagenet256-siglip2so": _paper,
        "imagenet256-mael": _paper,
        "fmnist32-tiny": _fmnist32_tiny,
    }
)


def get_recipe(name: str) -> Recipe:
    """The recipe of the preset called `name` (ValueError naming the presets that have one otherwise)."""
    try:
        return RECIPES[name]
    except KeyError as err:
        raise ValueError(err.args[0]) from None
