"""Strict accounting of a released checkpoint's tensors against the layout the preset expects.

Every tensor must be either mapped to a parameter, a fixed table that matches its recomputed value,
or part of the frozen encoder; a missing, unexpected or mis-shaped tensor is named. Fixed tables are
compared with this project's recomputation: they never change in training, so a difference beyond
float rounding means the checkpoint was made for another grid, width or layout.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from export.importer.layout import Layout
from export.importer.sources import TensorRef

# Stored tables were computed in float32 by the release and are recomputed here the same way; a wrong
# configuration differs by O(0.1–1), so this bound only absorbs operation-order rounding.
FIXED_TABLE_TOLERANCE = 1e-4
_SHOWN = 12
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class TensorMismatch(ValueError):
    """Tensors of a checkpoint are missing, unexpected, mis-shaped, of a wrong dtype, or a stored
    fixed table differs from its recomputed value."""


def _listing(label: str, items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"{label} ({len(items)}): {shown}{more}"


def check_names(
    where: str, tensors: Mapping[str, TensorRef], expected: Mapping[str, tuple[int, ...]], preset: str
) -> None:
    """Refuse, naming every offending tensor, unless `tensors` has exactly the `expected` names/shapes."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(n for n in expected if n in tensors and tuple(tensors[n].shape) != tuple(expected[n]))
    dtypes = sorted(n for n in tensors if n in expected and tensors[n].dtype not in _FLOATS)
    problems = []
    if missing:
        problems.append(_listing("missing tensors", missing))
    if unexpected:
        problems.append(
            _listing("unexpected tensors", [f"{n} {tuple(tensors[n].shape)}" for n in unexpected])
        )
    if wrong:
        problems.append(
            _listing(
                "wrong shapes",
                [f"{n} is {tuple(tensors[n].shape)}, {preset} needs {tuple(expected[n])}" for n in wrong],
            )
        )
    if dtypes:
        problems.append(_listing("not floating point", [f"{n} ({tensors[n].dtype})" for n in dtypes]))
    if problems:
        raise TensorMismatch(f"{where} does not match preset {preset}: " + "; ".join(problems))


def check_fixed_tables(where: str, tensors: Mapping[str, TensorRef], layout: Layout) -> dict[str, float]:
    """Compare every stored fixed table with its recomputation; return the max |difference| of each."""
    measured = {}
    for name, table in layout.fixed.items():
        stored = tensors[name].load().to(torch.float32)
        diff = float((stored - table).abs().max())
        if not diff <= FIXED_TABLE_TOLERANCE:
            raise TensorMismatch(
                f"{where}: fixed table {name} differs from the one this preset computes by {diff:.3g} "
                f"(> {FIXED_TABLE_TOLERANCE:g}); the checkpoint was made for another grid, width or layout"
            )
        measured[name] = diff
    return measured


def convert(tensors: Mapping[str, TensorRef], layout: Layout) -> dict[str, torch.Tensor]:
    """This project's state dict: each parameter from its official tensor(s), as float32."""
    out = {}
    for rule in layout.rules:
        parts = [tensors[name].load().to(torch.float32) for name in rule.sources]
        value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if tuple(value.shape) != rule.shape:
            raise TensorMismatch(
                f"{rule.target}: assembled shape {tuple(value.shape)}, expected {rule.shape}"
            )
        out[rule.target] = value.contiguous()
    return out
