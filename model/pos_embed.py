"""Fixed 2-D sin-cos position embeddings (MAE convention).

Shared by the DAM pixel tokens, the pixel decoder and LightningDiT, so all three agree on the layout:
half of the channels encode the row index and half the column index, each as [sin | cos] over
frequencies 1 / 10000^(2i/D).

Tables are computed in float64 by default and rounded to float32. The released paper models compute
them in float32 throughout (paper §2.2, §3.3 give the formula, not the precision), which moves entries
by up to ~2e-6; `TABLE_DTYPES` lets a config pick the release's arithmetic so imported weights see the
exact tables they were trained with.
"""

from __future__ import annotations

import torch

# Config value → the dtype a fixed table (sin-cos positions, RoPE angles) is computed in.
TABLE_DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32}


def resolve_table_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `table_dtype` config value (ValueError naming the choices otherwise)."""
    if name not in TABLE_DTYPES:
        raise ValueError(f"table_dtype must be one of {tuple(TABLE_DTYPES)}, got {name!r}")
    return TABLE_DTYPES[name]


def sincos_1d(dim: int, positions: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(N,) positions → (N, dim) with [sin | cos] halves, computed in `dtype`."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    omega = torch.arange(dim // 2, dtype=dtype) / (dim / 2.0)
    omega = 1.0 / (10000.0**omega)
    angles = positions.to(dtype).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(
    dim: int,
    grid_h: int,
    grid_w: int | None = None,
    cls_token: bool = False,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """(grid_h·grid_w [+1], dim) float32 table in row-major token order; a leading zero row if `cls_token`.

    `dtype` is the arithmetic's precision; the result is float32 either way.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    grid_w = grid_h if grid_w is None else grid_w
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=dtype), torch.arange(grid_w, dtype=dtype), indexing="ij"
    )
    # MAE puts the column (w) coordinate in the first half and the row (h) coordinate in the second.
    table = torch.cat(
        [sincos_1d(dim // 2, cols.reshape(-1), dtype), sincos_1d(dim // 2, rows.reshape(-1), dtype)], dim=1
    )
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=dtype), table], dim=0)
    return table.to(torch.float32)
