"""Configs of the two stages the preset does not describe in full: `refine` and `eval`.

The preset's `TokenizerTrainConfig` carries the refine budget (`refine_steps`, `refine_lr`,
`refine_batch_size`); the architecture of the refine networks, its loss weights and the low-pass
reference, and everything about evaluation, are training-side choices, so they live here with
defaults derived from the preset's scale.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.presets import Preset

PAPER_SCALE_DIM = 768  # a VFM at least this wide is a paper-scale ViT (DINOv2-L, SigLIP2, MAE-L)


@dataclass(frozen=True)
class RefineConfig:
    """Prior refinement (PAE_SPEC §2.7): projector P_t and deprojector Q_t on cached VFM tokens.

    `depth` is Q_t's ViT depth (4 at paper scale). The structural reference H_ref is the VFM map
    upsampled ×`upsample`, low-passed with a Gaussian of `lowpass_sigma` (in upsampled pixels) blended
    in at `lowpass_strength`, and area-downsampled back to the token grid (see `refine.lowpass_reference`).
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
        for name in ("steps", "batch_size", "depth", "upsample", "log_every", "ckpt_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RefineConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"RefineConfig.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not (self.lr > 0 and 0 < self.lr_min <= self.lr):
            raise ValueError(f"RefineConfig needs lr > 0 and 0 < lr_min <= lr, got {self.lr}, {self.lr_min}")
        if self.rep_weight < 0 or self.gram_weight < 0 or self.rep_weight + self.gram_weight == 0:
            raise ValueError(
                f"RefineConfig rep_weight/gram_weight must be >= 0 and not both 0, got {self.rep_weight}, {self.gram_weight}"
            )
        if self.lowpass_sigma <= 0 or not 0.0 <= self.lowpass_strength <= 1.0:
            raise ValueError(
                f"RefineConfig needs lowpass_sigma > 0 and lowpass_strength in [0, 1], got "
                f"{self.lowpass_sigma}, {self.lowpass_strength}"
            )


def refine_config_for(preset: Preset) -> RefineConfig:
    """Defaults from the preset: its refine budget, Q_t 4 layers deep at paper scale and 2 otherwise."""
    tok = preset.tokenizer_train
    return RefineConfig(
        steps=tok.refine_steps,
        batch_size=tok.refine_batch_size,
        lr=tok.refine_lr,
        lr_min=tok.refine_lr * 0.1,
        warmup_steps=min(tok.warmup_steps, tok.refine_steps // 10),
        depth=4 if preset.pae.vfm.dim >= PAPER_SCALE_DIM else 2,
        log_every=tok.log_every,
        ckpt_every=tok.ckpt_every,
    )


@dataclass(frozen=True)
class EvalConfig:
    """What `eval` measures and on how many samples (all counts are recorded in metrics.json).

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
        for name in ("batch_size", "ssc_samples", "lpc_samples", "gen_num_samples", "classifier_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EvalConfig.{name} must be a positive int, got {value!r}")
        for name in ("num_recon", "lpips_samples", "fd_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"EvalConfig.{name} must be an int >= 0 (0 = all), got {value!r}")
        if self.fd_network not in FD_NETWORKS:
            raise ValueError(f"EvalConfig.fd_network must be one of {FD_NETWORKS}, got {self.fd_network!r}")
        if self.gen_seed < 0:
            raise ValueError(f"EvalConfig.gen_seed must be >= 0, got {self.gen_seed}")


FD_NETWORKS = ("efficientnet-lite2", "inception-v3")


def eval_config_for(preset: Preset) -> EvalConfig:
    """Paper presets evaluate the ADM protocol's 50 000 generated samples; the default scale 1 000.

    At the default scale PSNR, SSIM, SSC and GSQ use the whole test split, while the per-image
    networks (LPIPS-VGG, the FD network, LPC's decodes) use fixed prefixes so eval fits 2 CPU cores.
    """
    if preset.pae.vfm.dim >= PAPER_SCALE_DIM:
        return EvalConfig(split="val", gen_num_samples=50_000, ssc_samples=1000, lpc_samples=1000)
    return EvalConfig(
        lpips_samples=500, fd_samples=500, lpc_samples=100, ssc_samples=300, gen_num_samples=500
    )
