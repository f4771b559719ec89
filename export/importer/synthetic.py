"""Random checkpoints in the authors' layout, for checking the import → export → serve path without
the real weights (which no registry carries).

A layout is a table of official tensor names and shapes (one `name<TAB>shape` line each, optionally
gzipped). Values are random but sane for a forward pass: weights N(0, 0.02), norm gains near 1,
layer scales 0.1, and every fixed table (sin-cos positions, RoPE angles) set to its true value, as a
real checkpoint has it. `cheap=True` writes each large tensor as one stored value broadcast to its
shape (`.pt`) or as a sparse all-zero region (`.safetensors`): the files then have the full layout
at almost no cost, for checks that read shapes and fixed tables only.
"""

from __future__ import annotations

import ast
import gzip
import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from export.importer.layout import dit_layout, pae_layout
from model.presets import Preset

Table = dict[str, tuple[int, ...]]
_GAINS = ("norm1.weight", "norm2.weight", "norm3.weight", "ln.weight", "norm_final.weight", "_q.weight")
_GAINS += ("_kv.weight", "layernorm_before.weight", "layernorm_after.weight", "decoder_norm.weight")


def read_table(path: Path) -> Table:
    """`name<TAB>shape` lines (shape as a Python tuple) → {name: shape}; `.gz` files are read too."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as handle:
        rows = [line.rstrip("\n").split("\t") for line in handle if line.strip()]
    return {name: tuple(ast.literal_eval(shape)) for name, shape in rows}


def fixed_tables(preset: Preset) -> dict[str, torch.Tensor]:
    """The true values of every fixed table the preset's tokenizer and generator store."""
    return {**pae_layout(preset.pae).fixed, **dit_layout(preset.dit).fixed}


def _value(name: str, shape: tuple[int, ...], generator: torch.Generator, cheap: bool) -> torch.Tensor:
    if cheap and math.prod(shape) > 4096:
        return torch.full((1,), 0.01).expand(shape)
    noise = torch.randn(shape, generator=generator)
    if name.endswith(_GAINS):
        return 1.0 + 0.02 * noise
    if name.endswith("lambda1"):
        return 0.1 + 0.01 * noise
    if name.endswith(".bias"):
        return 0.01 * noise
    return 0.02 * noise


def random_state(table: Table, fixed: Mapping[str, torch.Tensor], seed: int, cheap: bool = False) -> dict:
    """Random tensors for every row of `table`; the rows named in `fixed` get their true value."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in table.items():
        if name in fixed:
            if tuple(fixed[name].shape) != shape:
                raise ValueError(f"{name}: table shape {shape}, recomputed {tuple(fixed[name].shape)}")
            state[name] = fixed[name].clone()
        else:
            state[name] = _value(name, shape, generator, cheap)
    return state


def latent_stats(latent_dim: int, seed: int) -> dict[str, torch.Tensor]:
    """`latents_stats.pt` content: 1×d×1×1 mean and std."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "mean": 0.1 * torch.randn(1, latent_dim, 1, 1, generator=generator),
        "std": 0.5 + torch.rand(1, latent_dim, 1, 1, generator=generator),
    }


def write_release_files(
    out: Path, pae_table: Table, dit_table: Table, preset: Preset, seed: int = 0, cheap: bool = False
) -> dict[str, Path]:
    """`pae.pt` ({'model'}), `dit.pt` ({'ema', 'config'}) and `latents_stats.pt` under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    fixed = fixed_tables(preset)
    paths = {"pae": out / "pae.pt", "dit": out / "dit.pt", "latent_stats": out / "latents_stats.pt"}
    torch.save({"model": random_state(pae_table, fixed, seed, cheap)}, paths["pae"])
    dit = random_state(dit_table, fixed, seed + 1, cheap)
    torch.save({"ema": dit, "config": {"model": {"model_type": "LightningDiT"}}}, paths["dit"])
    del dit
    torch.save(latent_stats(preset.pae.latent_dim, seed + 2), paths["latent_stats"])
    return paths


def write_sparse_safetensors(path: Path, table: Table, real: Mapping[str, torch.Tensor]) -> None:
    """A float32 safetensors file of `table`'s layout whose data is a sparse zero region, except the
    tensors in `real`, which are written for real (a full-size layout at almost no disk cost)."""
    offsets, header, position = {}, {}, 0
    for name, shape in table.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [position, position + size]}
        offsets[name] = position
        position += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    start = 8 + len(blob)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)) + blob)
        for name, tensor in real.items():
            handle.seek(start + offsets[name])
            handle.write(tensor.to(torch.float32).contiguous().numpy().tobytes())
        handle.truncate(start + position)


def write_diffusers_folder(
    out: Path, pae_table: Table, dit_table: Table, preset: Preset, seed: int = 0, cheap: bool = False
) -> Path:
    """A diffusers-port folder (`vae/`, `transformer/`, configs as the port writes them)."""
    fixed = fixed_tables(preset)
    for part, table, class_name, part_seed in (
        ("vae", pae_table, "PAEModel", seed),
        ("transformer", dit_table, "LightningDiTTransformer2DModel", seed + 1),
    ):
        folder = out / part
        folder.mkdir(parents=True, exist_ok=True)
        weights = folder / "diffusion_pytorch_model.safetensors"
        if cheap:
            write_sparse_safetensors(weights, table, {n: t for n, t in fixed.items() if n in table})
        else:
            save_file(random_state(table, fixed, part_seed), str(weights))
        (folder / "config.json").write_text(json.dumps({"_class_name": class_name}) + "\n")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "FlowScheduler"}) + "\n"
    )
    index = {
        "_class_name": "PAEPipeline",
        "vae": ["diffusers", "PAEModel"],
        "transformer": ["diffusers", "X"],
    }
    (out / "model_index.json").write_text(json.dumps(index) + "\n")
    return out
