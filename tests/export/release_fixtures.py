"""Official-layout checkpoints for the importer's tests.

- `full_tables()`: the release's own tensor tables (tests/data/official, copied from the authors'
  state dicts: name and shape of each of the 991 tokenizer and 351 generator tensors).
- `small_preset()`: the paper preset shrunk to seconds-on-CPU size (a 64-wide one-layer DINOv2 at
  56 px, 32 px images), and `small_tables()`, the release layout of that preset: the same names, so
  a written and exported import runs end to end in a test.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from export.importer.layout import dit_layout, pae_layout
from export.importer.synthetic import Table, read_table
from export.importer.vfm_folder import HF_PREFIX, DinoV2Shape, dinov2_shapes
from model.presets import Preset, get_preset
from model.vfm.base import VFMSpec

DATA = Path(__file__).resolve().parents[1] / "data" / "official"
PAE_TABLE = DATA / "official_pae_dinov2l_d32_keys.tsv.gz"
DIT_TABLE = DATA / "official_lightningdit_xl1_keys.tsv.gz"
SMALL_DINO = DinoV2Shape(hidden=64, layers=1, mlp=256, patch=14, registers=4, positions=17)


def full_tables() -> tuple[Table, Table]:
    return read_table(PAE_TABLE), read_table(DIT_TABLE)


def small_preset() -> Preset:
    base = get_preset("imagenet256-dinov2l")
    vfm = VFMSpec("dinov2", 56, 64, 4, 4)
    pae = dataclasses.replace(
        base.pae,
        vfm=vfm,
        image_size=32,
        latent_dim=8,
        dam_depth=2,
        decoder_width=64,
        decoder_depth=2,
        decoder_heads=4,
        decoder_patch=8,
    )
    dit = dataclasses.replace(base.dit, in_channels=8, grid=4, hidden=64, depth=2, heads=4)
    return dataclasses.replace(base, pae=pae, dit=dit)


def small_tables(preset: Preset, v4_names: bool = False) -> tuple[Table, Table]:
    """Official-layout tables of `preset` (DINOv2 with transformers-4 names when `v4_names`)."""
    pae = dict(pae_layout(preset.pae).shapes())
    for name, shape in dinov2_shapes(SMALL_DINO).items():
        if v4_names:
            for new, old in (
                ("q_proj", "attention.query"),
                ("k_proj", "attention.key"),
                ("v_proj", "attention.value"),
            ):
                name = name.replace(f"attention.{new}", f"attention.{old}")
            name = name.replace("attention.o_proj", "attention.output.dense")
        pae[HF_PREFIX + name] = shape
    return pae, dict(dit_layout(preset.dit).shapes())
