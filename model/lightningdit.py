"""LightningDiT: the class-conditional velocity network that generates PAE latents (used unmodified by PAE).

Pre-norm transformer blocks with RMSNorm, adaLN-Zero conditioning, SwiGLU MLPs, 2-D rotary plus
absolute sin-cos positions. Time follows SiT (t = 0 noise, t = 1 data) and the network predicts the
velocity data − noise. The forward pass has no data-dependent Python control flow and keeps every
position table as a real-valued buffer, so the dynamo ONNX exporter can trace it with a dynamic batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.pos_embed import TABLE_DTYPES, resolve_table_dtype, sincos_2d
from model.validation import fraction, one_of, positive_ints, positive_numbers

_SIZES: dict[str, tuple[int, int, int, int]] = {
    # name: (depth, hidden, heads, patch)
    "B/1": (12, 768, 12, 1),
    "XL/1": (28, 1152, 16, 1),
    "1p0B/1": (24, 1536, 24, 1),
    # Small enough to train in minutes on 2 CPU cores on 8×8 latents; head dim 64.
    "tiny": (4, 192, 3, 1),
}


@dataclass(frozen=True)
class DiTConfig:
    """Everything that fixes a LightningDiT's shape.

    `grid` counts tokens per side, so the latent it reads is (grid·patch_size)² pixels of
    `in_channels` channels; for the /1 sizes the two coincide.
    """

    in_channels: int
    grid: int
    patch_size: int
    hidden: int
    depth: int
    heads: int
    num_classes: int
    mlp_ratio: float = 4.0
    class_dropout: float = 0.1
    use_qknorm: bool = False
    use_swiglu: bool = True
    use_rope: bool = True
    use_rmsnorm: bool = True
    use_abs_pos: bool = True
    # Precision of the fixed sin-cos and RoPE tables: the released models compute them in float32.
    table_dtype: str = "float64"

    def __post_init__(self) -> None:
        positive_ints(self, "in_channels", "grid", "patch_size", "hidden", "depth", "heads", "num_classes")
        if self.hidden % self.heads:
            raise ValueError(f"DiTConfig.hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.use_rope and self.head_dim % 4:
            raise ValueError(
                f"2-D RoPE needs a head dim divisible by 4 (half per axis, in pairs), got {self.head_dim}"
            )
        if self.use_abs_pos and self.hidden % 4:
            raise ValueError(f"2-D sin-cos positions need hidden divisible by 4, got {self.hidden}")
        positive_numbers(self, "mlp_ratio")
        fraction(self, "class_dropout")
        one_of(self, "table_dtype", TABLE_DTYPES)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def input_size(self) -> int:
        """Side length of the latent the network reads (grid · patch_size)."""
        return self.grid * self.patch_size

    @property
    def null_class(self) -> int:
        """Label index that means "unconditional" (the extra row of the label table)."""
        return self.num_classes


def size_name(depth: int, hidden: int, heads: int, patch: int) -> str | None:
    """The named LightningDiT size (`XL/1`, …) of this depth, width, head count and patch, or None."""
    return next((name for name, size in _SIZES.items() if size == (depth, hidden, heads, patch)), None)


def dit_config(size: str, in_channels: int, grid: int, num_classes: int, **overrides: object) -> DiTConfig:
    """Named LightningDiT size (`B/1`, `XL/1`, `1p0B/1`, `tiny`) on a given latent, with field overrides."""
    if size not in _SIZES:
        raise ValueError(f"unknown LightningDiT size {size!r}; expected one of {sorted(_SIZES)}")
    depth, hidden, heads, patch = _SIZES[size]
    fields = {
        "in_channels": in_channels,
        "grid": grid,
        "patch_size": patch,
        "hidden": hidden,
        "depth": depth,
        "heads": heads,
        "num_classes": num_classes,
    }
    known = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown DiTConfig override(s) {sorted(unknown)}; fields are {sorted(known)}")
    fields.update(overrides)
    return DiTConfig(**fields)  # type: ignore[arg-type]


class RMSNorm(nn.Module):
    """RMS normalisation with a learnable gain, computed in fp32 so bf16 activations stay stable."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def _norm(dim: int, use_rmsnorm: bool) -> nn.Module:
    return RMSNorm(dim) if use_rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def rope_tables(
    head_dim: int, grid: int, theta: float = 10000.0, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) float32 tables of shape (grid², head_dim) for 2-D rotary embedding, row-major tokens.

    EVA layout: each axis owns half the head dim, holding head_dim/4 frequencies 1/θ^(2i/(head_dim/2)),
    each repeated for an interleaved (even, odd) channel pair; the row (h) half comes first.
    Real-valued so the graph exports without complex numbers. `dtype` is the arithmetic's precision.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    axis_dim = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=dtype) / axis_dim)
    pos = torch.arange(grid, dtype=dtype)
    angles = torch.outer(pos, freqs).repeat_interleave(2, dim=1)  # (grid, axis_dim)
    rows = angles[:, None, :].expand(grid, grid, axis_dim)
    cols = angles[None, :, :].expand(grid, grid, axis_dim)
    table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
    return table.cos().float(), table.sin().float()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Interleaved rotate-half: (x0, x1, x2, x3, …) → (−x1, x0, −x3, x2, …)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair of x (…, N, head_dim) by its position's angle."""
    return x * cos.to(x.dtype) + rotate_pairs(x) * sin.to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv (bias), optional per-head qk RMSNorm, then RoPE, SDPA."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=True)
        self.q_norm = RMSNorm(cfg.head_dim) if cfg.use_qknorm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim) if cfg.use_qknorm else nn.Identity()
        self.proj = nn.Linear(cfg.hidden, cfg.hidden, bias=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


class SwiGLU(nn.Module):
    """W3(SiLU(a) ⊙ b) with [a | b] from one fused Linear, as in LightningDiT."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=True)
        self.w3 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class GeluMLP(nn.Module):
    """The original DiT MLP (tanh-GELU), used when `use_swiglu` is off."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Pre-norm attention + MLP, each modulated and gated by the conditioning vector (adaLN-Zero)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        mlp_hidden = int(cfg.hidden * cfg.mlp_ratio)
        self.norm1 = _norm(cfg.hidden, cfg.use_rmsnorm)
        self.attn = Attention(cfg)
        self.norm2 = _norm(cfg.hidden, cfg.use_rmsnorm)
        # Integer arithmetic: int(2/3 · 4 · H) in floating point can land one below the intended width.
        self.mlp = (
            SwiGLU(cfg.hidden, 2 * mlp_hidden // 3) if cfg.use_swiglu else GeluMLP(cfg.hidden, mlp_hidden)
        )
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 6 * cfg.hidden, bias=True))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """Norm, modulate (no gate), then project every token to its p²·C output values."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = _norm(cfg.hidden, cfg.use_rmsnorm)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 2 * cfg.hidden, bias=True))
        self.linear = nn.Linear(cfg.hidden, cfg.patch_size**2 * cfg.in_channels, bias=True)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class TimestepEmbedder(nn.Module):
    """256-d [cos | sin] sinusoid of t ∈ [0, 1] (no ×1000, as trained in PAE), then a 2-layer MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        half = freq_dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float().unsqueeze(1) * self.freqs.unsqueeze(0)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=1))


class LightningDiT(nn.Module):
    """v = LightningDiT(x_t, t, y): latent B×C×H×W, time (B,) in [0, 1], class (B,) with null = num_classes."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        p, side = cfg.patch_size, cfg.grid
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.hidden, kernel_size=p, stride=p, bias=True)
        self.t_embedder = TimestepEmbedder(cfg.hidden)
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, cfg.hidden)
        if cfg.use_abs_pos:
            pos = sincos_2d(cfg.hidden, side, dtype=resolve_table_dtype(cfg.table_dtype))
            self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)
        else:
            self.pos_embed = None
        if cfg.use_rope:
            cos, sin = rope_tables(cfg.head_dim, side, dtype=resolve_table_dtype(cfg.table_dtype))
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LightningDiT init; zeroed adaLN and output layers make every block start as the identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def drop_labels(self, y: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class where `force_drop` is True, else (training only) at random.

        Training code that needs reproducible dropout passes a mask drawn from its own generator;
        without one, a training-mode model drops each label with probability `class_dropout`.
        """
        if force_drop is not None:
            if force_drop.shape != y.shape:
                raise ValueError(
                    f"force_drop must have the labels' shape {tuple(y.shape)}, got {tuple(force_drop.shape)}"
                )
            return torch.where(force_drop.bool(), torch.full_like(y, self.null_class), y)
        if self.training and self.cfg.class_dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.cfg.class_dropout
            return torch.where(drop, torch.full_like(y, self.null_class), y)
        return y

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        cfg = self.cfg
        expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must be B×{expected[0]}×{expected[1]}×{expected[2]}, got {tuple(x.shape)}")
        if t.dim() != 1 or not t.is_floating_point():
            raise ValueError(f"t must be a float tensor of shape (B,), got {t.dtype} {tuple(t.shape)}")
        if y.dim() != 1 or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"y must be an int64 tensor of shape (B,), got {y.dtype} {tuple(y.shape)}")

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        self._check_inputs(x, t, y)
        cfg = self.cfg
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # B×N×H, row-major tokens
        if self.pos_embed is not None:
            h = h + self.pos_embed.to(h.dtype)
        c = self.t_embedder(t).to(h.dtype) + self.y_embedder(self.drop_labels(y, force_drop))
        rope = (self.rope_cos, self.rope_sin) if self.rope_cos is not None else None
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                h = checkpoint(block, h, c, rope, use_reentrant=False)
            else:
                h = block(h, c, rope)
        out = self.final_layer(h, c)  # B×N×(p·p·C)
        p, g = cfg.patch_size, cfg.grid
        out = out.reshape(-1, g, g, p, p, cfg.in_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(-1, cfg.in_channels, g * p, g * p)
