"""PAE tokenizer: frozen VFM → DAM → projector → RMS sphere latent → deprojector → ViT pixel decoder.

Shapes at paper scale (DINOv2-L/14 at 224 px, the paper's default VFM): image B×3×256×256 → VFM
tokens B×256×1024 → DAM output B×256×1024 → latent B×32×16×16 (every token on the sphere of radius
√32) → decoder tokens B×256×1024 → image B×3×256×256 ≈ [0, 1]. The frozen VFM is held outside the
module tree, so checkpoints, optimisers and `parameters()` only ever see PAE's own weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .pos_embed import TABLE_DTYPES, resolve_table_dtype, sincos_2d
from .validation import non_negative_ints, one_of, positive_ints, positive_numbers
from .vfm.base import FrozenVFM, UsesFrozenVFM, VFMSpec, normalize_image

FUSIONS = ("sft", "add", "concat", "none")
# q = k = MIXER_SHARPNESS·I in the residual-free token mixers at initialisation: each token's logit for
# itself is then ≈ MIXER_SHARPNESS²·√head_dim for LayerNorm-scale inputs, far above its neighbours'.
MIXER_SHARPNESS = 3.0


@dataclass(frozen=True)
class PAEConfig:
    """Everything that fixes PAE's architecture. DAM and projector use the VFM's width and head count."""

    vfm: VFMSpec
    image_size: int
    latent_dim: int = 32
    dam_depth: int = 6
    dam_mlp_ratio: float = 4.0
    fusion: str = "sft"
    decoder_width: int = 1024
    decoder_depth: int = 24
    decoder_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    decoder_patch: int = 16
    # The released paper models keep PyTorch's default LayerNorm eps in the DAM (paper §2.2) and compute
    # their fixed sin-cos tables in float32; the project's own models use 1e-6 and float64.
    dam_ln_eps: float = 1e-6
    table_dtype: str = "float64"

    def __post_init__(self) -> None:
        one_of(self, "fusion", FUSIONS)
        positive_ints(
            self,
            "image_size",
            "latent_dim",
            "decoder_width",
            "decoder_depth",
            "decoder_heads",
            "decoder_patch",
        )
        non_negative_ints(self, "dam_depth")
        positive_numbers(self, "dam_mlp_ratio", "decoder_mlp_ratio", "dam_ln_eps")
        one_of(self, "table_dtype", TABLE_DTYPES)
        if self.image_size % self.decoder_patch:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of decoder_patch {self.decoder_patch}"
            )
        if self.decoder_width % self.decoder_heads:
            raise ValueError(
                f"decoder_width {self.decoder_width} is not divisible by decoder_heads {self.decoder_heads}"
            )
        for name, width in (("vfm.dim", self.vfm.dim), ("decoder_width", self.decoder_width)):
            if width % 4:
                raise ValueError(f"{name} {width} must be divisible by 4 for the 2-D sin-cos position table")

    @property
    def latent_grid(self) -> int:
        return self.vfm.grid

    @property
    def decoder_grid(self) -> int:
        return self.image_size // self.decoder_patch

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_dim, self.latent_grid, self.latent_grid)


def sphere_norm(z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Divide each spatial token of a B×d×h×w latent by its RMS over channels (no learnable scale).

    Every token then lies on the sphere of radius √d. Computed in fp32 so bf16 training does not
    bend the sphere, then cast back.
    """
    if z.ndim != 4:
        raise ValueError(f"sphere_norm expects a B×d×h×w latent, got shape {tuple(z.shape)}")
    z32 = z.float()
    return (z32 * torch.rsqrt(z32.square().mean(dim=1, keepdim=True) + eps)).to(z.dtype)


def unpatchify(patches: torch.Tensor, grid: int, patch: int) -> torch.Tensor:
    """B×(g·g)×(p·p·3) row-major patches, each flattened (row, col, channel) → B×3×(g·p)×(g·p)."""
    x = patches.unflatten(1, (grid, grid)).unflatten(-1, (patch, patch, 3))
    return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, 3, grid * patch, grid * patch)


class Attention(nn.Module):
    """Multi-head attention on SDPA: self-attention (fused qkv) or cross-attention (separate q, k, v).

    Used by every attention in PAE: DAM self/cross, the residual-free token mixers of the projector and
    deprojector, and the decoder blocks. The self/cross choice is fixed at construction, so `forward`
    has no data-dependent branching and exports to ONNX as one graph.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, cross: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads, self.cross = heads, cross
        if cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.k = nn.Linear(dim, dim, bias=qkv_bias)
            self.v = nn.Linear(dim, dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: B×N×D queries; context: B×M×D keys/values (cross-attention only)."""
        if self.cross:
            q, k, v = self.q(x), self.k(context), self.v(context)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v))
        return self.proj(out.transpose(1, 2).flatten(2))

    def init_near_identity(self, sharpness: float = MIXER_SHARPNESS) -> None:
        """Start a residual-free self-attention as (nearly) the identity map on tokens.

        With a random init its attention is almost uniform, so it hands every position the same
        average token: the latent loses all spatial detail at step 0, and a small model on a small
        budget never learns it back (a 16-image overfit of the default preset reached 14.8 dB PSNR in
        300 steps that way, 21.2 dB from this init). q = k = s·I makes each token attend to itself;
        v = proj = I pass it through unchanged. Learned weights replace this as training proceeds.
        """
        if self.cross:
            raise ValueError("init_near_identity applies to self-attention only")
        dim = self.proj.in_features
        eye = torch.eye(dim, dtype=self.proj.weight.dtype, device=self.proj.weight.device)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([sharpness * eye, sharpness * eye, eye]))
            if self.qkv.bias is not None:
                self.qkv.bias.zero_()
            self.proj.weight.copy_(eye)
            self.proj.bias.zero_()


class MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: float) -> None:
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class DAMBlock(nn.Module):
    """Pixel tokens: pre-LN self-attention, pre-LN cross-attention into the VFM tokens, pre-LN MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = Attention(dim, heads)
        self.norm_q = nn.LayerNorm(dim, eps=eps)
        self.norm_kv = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = Attention(dim, heads, cross=True)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, h_vfm: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm_q(x), self.norm_kv(h_vfm))
        return x + self.mlp(self.norm2(x))


class DAM(nn.Module):
    """Detail-Aware Modulator: pixel detail modulates the VFM tokens, starting as the identity.

    Pixel tokens come from a patchify conv of the normalised VFM-size image. In "sft" fusion a
    zero-initialised Linear maps them to (γ, β) and H_z = LN(H_vfm·(1+γ)+β), so at initialisation
    H_z = LN(H_vfm) exactly and training starts from the VFM's own semantics. "add" and "concat" are the
    ablation fusions (also starting at LN(H_vfm)); "none" is LN(H_vfm) alone, with no pixel branch.
    """

    def __init__(self, cfg: PAEConfig) -> None:
        super().__init__()
        spec, dim, eps = cfg.vfm, cfg.vfm.dim, cfg.dam_ln_eps
        self.fusion = fusion = cfg.fusion
        self.out_norm = nn.LayerNorm(dim, eps=eps)
        if fusion == "none":
            return
        self.patchify = nn.Conv2d(3, dim, kernel_size=spec.patch, stride=spec.patch)
        pos = sincos_2d(dim, spec.grid, dtype=resolve_table_dtype(cfg.table_dtype))
        self.register_buffer("pos", pos.unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(
            DAMBlock(dim, spec.heads, cfg.dam_mlp_ratio, eps) for _ in range(cfg.dam_depth)
        )
        self.fuse = nn.Linear(2 * dim if fusion == "concat" else dim, 2 * dim if fusion == "sft" else dim)

    def reset_fusion(self) -> None:
        """Make the fusion an exact identity on H_vfm (applied after the generic weight init)."""
        if self.fusion in ("sft", "add"):
            nn.init.zeros_(self.fuse.weight)
            nn.init.zeros_(self.fuse.bias)
        elif self.fusion == "concat":
            dim = self.fuse.out_features
            with torch.no_grad():
                self.fuse.weight.zero_()
                self.fuse.weight[:, :dim].copy_(torch.eye(dim))
                self.fuse.bias.zero_()

    def forward(self, x_norm: torch.Tensor, h_vfm: torch.Tensor) -> torch.Tensor:
        if self.fusion == "none":
            return self.out_norm(h_vfm)
        x = self.patchify(x_norm).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x, h_vfm)
        if self.fusion == "sft":
            gamma, beta = self.fuse(x).chunk(2, dim=-1)
            return self.out_norm(h_vfm * (1 + gamma) + beta)
        if self.fusion == "add":
            return self.out_norm(h_vfm + self.fuse(x))
        return self.out_norm(self.fuse(torch.cat([h_vfm, x], dim=-1)))


class Projector(nn.Module):
    """Residual-free token mixer then a 3×3 conv down to the latent width: B×N×D → B×d×g×g.

    Its owner calls `attn.init_near_identity()` after any generic weight init.
    """

    def __init__(self, dim: int, heads: int, latent_dim: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.attn = Attention(dim, heads, qkv_bias=False)
        self.conv = nn.Conv2d(dim, latent_dim, kernel_size=3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.attn(h)
        return self.conv(h.transpose(1, 2).unflatten(2, (self.grid, self.grid)))


class Deprojector(nn.Module):
    """3×3 conv back to the VFM width, then a residual-free token mixer: B×d×h×w → B×(h·w)×D.

    Its owner calls `attn.init_near_identity()` after any generic weight init.
    """

    def __init__(self, latent_dim: int, dim: int, heads: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(latent_dim, dim, kernel_size=3, padding=1)
        self.attn = Attention(dim, heads, qkv_bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.attn(self.conv(z).flatten(2).transpose(1, 2))


class ViTBlock(nn.Module):
    """Pre-LN ViT block (MAE decoder style: qkv bias, GELU, LN eps 1e-12)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-12)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-12)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PixelDecoder(nn.Module):
    """MAE-style ViT decoder: tokens B×N×D → patch pixels, unpatchified to B×3×H×W (normalised space)."""

    def __init__(self, in_dim: int, cfg: PAEConfig) -> None:
        super().__init__()
        width, self.grid, self.patch = cfg.decoder_width, cfg.decoder_grid, cfg.decoder_patch
        self.embed = nn.Linear(in_dim, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        pos = sincos_2d(width, self.grid, cls_token=True, dtype=resolve_table_dtype(cfg.table_dtype))
        self.register_buffer("pos", pos.unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(
            ViTBlock(width, cfg.decoder_heads, cfg.decoder_mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.norm = nn.LayerNorm(width, eps=1e-12)
        self.head = nn.Linear(width, self.patch * self.patch * 3)

    def forward(self, tokens: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        if grid_hw != (self.grid, self.grid):
            # A latent of another size: resize its token grid to the decoder's (dynamic-resolution hook).
            tokens = tokens.transpose(1, 2).unflatten(2, grid_hw)
            tokens = F.interpolate(tokens, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
            tokens = tokens.flatten(2).transpose(1, 2)
        x = self.embed(tokens)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return unpatchify(self.head(self.norm(x))[:, 1:], self.grid, self.patch)


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform linears and flattened conv kernels with zero bias (ViT/MAE convention)."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class PAE(UsesFrozenVFM):
    """Prior-Aligned AutoEncoder. `vfm` may be None when VFM tokens are always passed in (cached
    features, parameter counting on the meta device); it is kept out of `state_dict()` but follows
    `.to()`/`.cuda()`/`.half()`.
    """

    def __init__(self, cfg: PAEConfig, vfm: FrozenVFM | None = None) -> None:
        super().__init__(cfg.vfm, vfm)
        self.cfg = cfg
        spec = cfg.vfm
        self.dam = DAM(cfg)
        self.projector = Projector(spec.dim, spec.heads, cfg.latent_dim, spec.grid)
        self.deprojector = Deprojector(cfg.latent_dim, spec.dim, spec.heads)
        self.decoder = PixelDecoder(spec.dim, cfg)
        self.apply(init_weights)
        self.dam.reset_fusion()
        self.projector.attn.init_near_identity()
        self.deprojector.attn.init_near_identity()

    @property
    def decoder_last_layer(self) -> torch.Tensor:
        """Weight of the decoder's final prediction Linear, for the adaptive GAN weight."""
        return self.decoder.head.weight

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """PAE's own weights (what a checkpoint holds); the frozen VFM is never included."""
        return {name: p.detach() for name, p in self.named_parameters()}

    def encode(self, x01: torch.Tensor, h_vfm: torch.Tensor | None = None) -> torch.Tensor:
        """Images B×3×H×W in [0, 1] → sphere latent B×d×g×g. Pass cached VFM tokens as `h_vfm`."""
        spec = self.cfg.vfm
        x_norm = normalize_image(x01, spec, self.mean, self.std)
        if h_vfm is None:
            if self.vfm is None:
                raise RuntimeError(
                    "PAE has no VFM attached: build it with PAE(cfg, build_vfm(cfg.vfm)) or pass h_vfm"
                )
            with torch.no_grad():
                h_vfm = self.vfm.features(x_norm)
        if h_vfm.ndim != 3 or tuple(h_vfm.shape[1:]) != (spec.grid * spec.grid, spec.dim):
            raise ValueError(f"h_vfm must be B×{spec.grid * spec.grid}×{spec.dim}, got {tuple(h_vfm.shape)}")
        return sphere_norm(self.projector(self.dam(x_norm, h_vfm)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent B×d×h×w → image B×3×H×W, ≈[0, 1] and unclamped (clamp only when saving)."""
        if z.ndim != 4 or z.shape[1] != self.cfg.latent_dim:
            raise ValueError(f"latent must be B×{self.cfg.latent_dim}×h×w, got shape {tuple(z.shape)}")
        tokens = self.deprojector(z)
        x = self.decoder(tokens, (z.shape[2], z.shape[3]))
        return x * self.std + self.mean

    def forward(
        self, x01: torch.Tensor, h_vfm: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct: returns (x̂, z)."""
        z = self.encode(x01, h_vfm)
        return self.decode(z), z
