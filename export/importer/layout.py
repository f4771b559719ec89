"""The released checkpoints' tensor names, derived from this project's configs.

For a `PAEConfig` / `DiTConfig` the layout lists every tensor the authors' state dict holds for that
architecture: one or more official tensors per parameter of this project's module (the pixel
decoder's separate query/key/value become one fused qkv, concatenated in that order), plus the fixed
tables the authors store although nothing learns them (sin-cos positions, RoPE angles). The
frozen encoder's tensors (`encoder.*`) are not part of the layout; `vfm_folder` accounts for them.

Module correspondence (paper §2.2–2.4 and §3.2–3.3):

| this project | release |
|---|---|
| `dam.patchify`, `dam.blocks.i.{norm1, self_attn, norm_q, norm_kv, cross_attn.{q,k,v,proj}, norm2, mlp.{0,2}}`, `dam.fuse`, `dam.out_norm` | `delta_encoder.patch_embed.proj`, `delta_encoder.layers.i.{norm1, self_attn, norm2_q, norm2_kv, cross_attn.{q,k,v}_proj/proj, norm3, mlp.fc1/fc2}`, `delta_encoder.fusion_proj`, `delta_encoder.final_ln` |
| `projector.{attn, conv}`, `deprojector.{conv, attn}` | `latent_compressor.{0, 1}`, `latent_decompressor.{0, 1}` |
| `decoder.{embed, cls_token, blocks.i, norm, head}` | `decoder.{decoder_embed, trainable_cls_token, decoder_layers.i, decoder_norm, decoder_pred}` |
| DiT `patch_embed`, `y_embedder`, `blocks.i.adaLN`, `final_layer.{norm, adaLN}` | `x_embedder.proj`, `y_embedder.embedding_table`, `blocks.i.adaLN_modulation`, `final_layer.{norm_final, adaLN_modulation}` |
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from model.lightningdit import DiTConfig, LightningDiT, rope_tables
from model.pae import PAE, PAEConfig
from model.pos_embed import resolve_table_dtype, sincos_2d

VFM_PREFIX = "encoder."

_DAM = r"dam\.blocks\.(\d+)\."
_DEC = r"decoder\.blocks\.(\d+)\."
_DEC_OUT = r"decoder.decoder_layers.\1."
# (project name prefix pattern, official prefix, or several for a tensor fused here and split there)
_PAE_NAMES: tuple[tuple[str, str | tuple[str, ...]], ...] = (
    (r"dam\.patchify\.", "delta_encoder.patch_embed.proj."),
    (_DAM + r"norm1\.", r"delta_encoder.layers.\1.norm1."),
    (_DAM + r"self_attn\.", r"delta_encoder.layers.\1.self_attn."),
    (_DAM + r"norm_q\.", r"delta_encoder.layers.\1.norm2_q."),
    (_DAM + r"norm_kv\.", r"delta_encoder.layers.\1.norm2_kv."),
    (_DAM + r"cross_attn\.([qkv])\.", r"delta_encoder.layers.\1.cross_attn.\2_proj."),
    (_DAM + r"cross_attn\.proj\.", r"delta_encoder.layers.\1.cross_attn.proj."),
    (_DAM + r"norm2\.", r"delta_encoder.layers.\1.norm3."),
    (_DAM + r"mlp\.0\.", r"delta_encoder.layers.\1.mlp.fc1."),
    (_DAM + r"mlp\.2\.", r"delta_encoder.layers.\1.mlp.fc2."),
    (r"dam\.fuse\.", "delta_encoder.fusion_proj."),
    (r"dam\.out_norm\.", "delta_encoder.final_ln."),
    (r"projector\.attn\.", "latent_compressor.0."),
    (r"projector\.conv\.", "latent_compressor.1."),
    (r"deprojector\.conv\.", "latent_decompressor.0."),
    (r"deprojector\.attn\.", "latent_decompressor.1."),
    (r"decoder\.embed\.", "decoder.decoder_embed."),
    (r"decoder\.cls_token$", "decoder.trainable_cls_token"),
    (_DEC + r"norm1\.", _DEC_OUT + "layernorm_before."),
    (_DEC + r"norm2\.", _DEC_OUT + "layernorm_after."),
    (
        _DEC + r"attn\.qkv\.",
        tuple(_DEC_OUT + f"attention.attention.{part}." for part in ("query", "key", "value")),
    ),
    (_DEC + r"attn\.proj\.", _DEC_OUT + "attention.output.dense."),
    (_DEC + r"mlp\.0\.", _DEC_OUT + "intermediate.dense."),
    (_DEC + r"mlp\.2\.", _DEC_OUT + "output.dense."),
    (r"decoder\.norm\.", "decoder.decoder_norm."),
    (r"decoder\.head\.", "decoder.decoder_pred."),
)
_DIT_NAMES: tuple[tuple[str, str | tuple[str, ...]], ...] = (
    (r"patch_embed\.", "x_embedder.proj."),
    (r"y_embedder\.weight$", "y_embedder.embedding_table.weight"),
    (r"blocks\.(\d+)\.adaLN\.", r"blocks.\1.adaLN_modulation."),
    (r"final_layer\.norm\.", "final_layer.norm_final."),
    (r"final_layer\.adaLN\.", "final_layer.adaLN_modulation."),
    (r"(t_embedder\.|blocks\.|final_layer\.linear\.)", r"\1"),
)


class LayoutError(RuntimeError):
    """This project's module has a parameter the release layout does not describe (a code bug)."""


@dataclass(frozen=True)
class Rule:
    """One parameter of this project's module and the official tensors it is made of."""

    target: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]

    @property
    def source_shapes(self) -> dict[str, tuple[int, ...]]:
        """Official shapes: a fused tensor splits evenly along its first axis."""
        first = self.shape[0] // len(self.sources)
        return {name: (first, *self.shape[1:]) for name in self.sources}


@dataclass(frozen=True)
class Layout:
    """Every official tensor of one network: mapped parameters and fixed tables."""

    what: str
    rules: tuple[Rule, ...]
    fixed: dict[str, torch.Tensor]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Official name → shape for every tensor of the layout."""
        out: dict[str, tuple[int, ...]] = {}
        for rule in self.rules:
            out.update(rule.source_shapes)
        out.update({name: tuple(table.shape) for name, table in self.fixed.items()})
        return out


def _official(name: str, table: tuple[tuple[str, str | tuple[str, ...]], ...], what: str) -> tuple[str, ...]:
    for pattern, replacement in table:
        match = re.match(pattern, name)
        if match:
            rest = name[match.end() :]
            parts = replacement if isinstance(replacement, tuple) else (replacement,)
            return tuple(match.expand(part) + rest for part in parts)
    raise LayoutError(f"{what} parameter {name!r} has no counterpart in the release layout")


def _rules(
    module: torch.nn.Module, table: tuple[tuple[str, str | tuple[str, ...]], ...], what: str
) -> tuple[Rule, ...]:
    return tuple(
        Rule(name, tuple(tensor.shape), _official(name, table, what))
        for name, tensor in module.state_dict().items()
    )


def pae_layout(cfg: PAEConfig) -> Layout:
    """The released tokenizer's tensors (the frozen encoder excepted) for `cfg`."""
    with torch.device("meta"):
        pae = PAE(cfg)
    dtype = resolve_table_dtype(cfg.table_dtype)
    fixed = {
        "decoder.decoder_pos_embed": sincos_2d(
            cfg.decoder_width, cfg.decoder_grid, cls_token=True, dtype=dtype
        ).unsqueeze(0)
    }
    if cfg.fusion != "none":
        fixed["delta_encoder.pos_embed"] = sincos_2d(cfg.vfm.dim, cfg.vfm.grid, dtype=dtype).unsqueeze(0)
    return Layout("PAE", _rules(pae, _PAE_NAMES, "PAE"), fixed)


def dit_layout(cfg: DiTConfig) -> Layout:
    """The released LightningDiT's tensors for `cfg`."""
    with torch.device("meta"):
        dit = LightningDiT(cfg)
    dtype = resolve_table_dtype(cfg.table_dtype)
    fixed: dict[str, torch.Tensor] = {}
    if cfg.use_abs_pos:
        fixed["pos_embed"] = sincos_2d(cfg.hidden, cfg.grid, dtype=dtype).unsqueeze(0)
    if cfg.use_rope:
        cos, sin = rope_tables(cfg.head_dim, cfg.grid, dtype=dtype)
        fixed["feat_rope.freqs_cos"], fixed["feat_rope.freqs_sin"] = cos, sin
    return Layout("LightningDiT", _rules(dit, _DIT_NAMES, "LightningDiT"), fixed)
