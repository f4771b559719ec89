"""Fixed 2-D sin-cos position embeddings (MAE convention).

Shared by the DAM pixel tokens, the pixel decoder and LightningDiT, so all three agree on the layout:
half of the channels encode the row index and half the column index, each as [sin | cos] over
frequencies 1 / 10000^(2i/D).
"""

from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(N,) positions → (N, dim) with [sin | cos] halves."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / (10000.0**omega)
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int | None = None, cls_token: bool = False) -> torch.Tensor:
    """(grid_h·grid_w [+1], dim) float32 table in row-major token order; a leading zero row if `cls_token`."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    grid_w = grid_h if grid_w is None else grid_w
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    # MAE puts the column (w) coordinate in the first half and the row (h) coordinate in the second.
    table = torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0)
    return table.to(torch.float32)
