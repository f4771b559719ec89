"""LightningDiT: the class-conditional velocity network that generates PAE latents (PAE_SPEC §3).

Pre-norm transformer blocks with RMSNorm, adaLN-Zero conditioning, SwiGLU MLPs, 2-D rotary plus
absolute sin-cos positions. Time follows SiT (t = 0 noise, t = 1 data) and the network predicts the
velocity data − noise. The forward pass has no data-dependent Python control flow and keeps every
position table as a real-valued buffer, so the dynamo ONNX exporter can trace it with a dynamic batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

_SIZES: dict[str, tuple[int, int, int, int]] = {
    # name: (depth, hidden, heads, patch)
    "B/1": (12, 768, 12, 1),
    "XL/1": (28, 1152, 16, 1),
    "1p0B/1": (24, 1536, 24, 1),
    # Small enough to train in minutes on 2 CPU cores on 8×8 latents; head dim 64.
    "tiny": (6, 192, 3, 1),
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

    def __post_init__(self) -> None:
        for name in ("in_channels", "grid", "patch_size", "hidden", "depth", "heads", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DiTConfig.{name} must be a positive int, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"DiTConfig.hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.use_rope and self.head_dim % 4:
            raise ValueError(
                f"2-D RoPE needs a head dim divisible by 4 (half per axis, in pairs), got {self.head_dim}"
            )
        if self.use_abs_pos and self.hidden % 4:
            raise ValueError(f"2-D sin-cos positions need hidden divisible by 4, got {self.hidden}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"DiTConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"DiTConfig.class_dropout must be in [0, 1), got {self.class_dropout}")

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
