"""What architecture a released checkpoint holds, read off its tensor shapes, and which preset fits.

The diffusers port's configs are not trusted and the `.pt` files carry no usable config, so sizes
come from the tensors: latent width from the projector's conv, DiT size from its blocks, class count
from the label table, and so on. Each fact remembers the tensor it was read from, so a checkpoint of
another size is refused with the evidence and the preset that would fit it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from model.lightningdit import DiTConfig, size_name
from model.pae import PAEConfig
from model.presets import PRESETS, Preset

Shapes = Mapping[str, tuple[int, ...]]


class PresetMismatch(ValueError):
    """The checkpoint's architecture is not the preset's."""


@dataclass(frozen=True)
class Fact:
    """One architecture value and the tensor it was read from."""

    field: str
    value: object
    evidence: str


def _count(shapes: Shapes, pattern: str) -> int:
    return len({m.group(1) for name in shapes if (m := re.match(pattern, name))})


def _fact(
    shapes: Shapes, name: str, field: str, value_of: Callable[[tuple[int, ...]], object]
) -> Fact | None:
    if name not in shapes:
        return None
    return Fact(field, value_of(shapes[name]), f"{name} {tuple(shapes[name])}")


def pae_facts(shapes: Shapes) -> list[Fact]:
    """Architecture of a released tokenizer (the fields of `PAEConfig` its tensors determine)."""
    facts = [
        _fact(shapes, "delta_encoder.patch_embed.proj.weight", "vfm.dim", lambda s: s[0]),
        _fact(shapes, "delta_encoder.patch_embed.proj.weight", "vfm.patch", lambda s: s[-1]),
        _fact(shapes, "delta_encoder.pos_embed", "vfm.grid", lambda s: math.isqrt(s[1])),
        _fact(shapes, "latent_compressor.1.weight", "latent_dim", lambda s: s[0]),
        _fact(shapes, "delta_encoder.layers.0.mlp.fc1.weight", "dam_mlp_ratio", lambda s: s[0] / s[1]),
        _fact(shapes, "decoder.decoder_embed.weight", "decoder_width", lambda s: s[0]),
        _fact(
            shapes,
            "decoder.decoder_layers.0.intermediate.dense.weight",
            "decoder_mlp_ratio",
            lambda s: s[0] / s[1],
        ),
        _fact(shapes, "decoder.decoder_pred.weight", "decoder_patch", lambda s: math.isqrt(s[0] // 3)),
    ]
    if "decoder.decoder_pos_embed" in shapes and "decoder.decoder_pred.weight" in shapes:
        grid = math.isqrt(shapes["decoder.decoder_pos_embed"][1] - 1)
        patch = math.isqrt(shapes["decoder.decoder_pred.weight"][0] // 3)
        facts.append(Fact("image_size", grid * patch, "decoder.decoder_pos_embed and decoder.decoder_pred"))
    dam_depth = _count(shapes, r"delta_encoder\.layers\.(\d+)\.")
    facts.append(Fact("dam_depth", dam_depth, f"{dam_depth} delta_encoder.layers.*"))
    decoder_depth = _count(shapes, r"decoder\.decoder_layers\.(\d+)\.")
    facts.append(Fact("decoder_depth", decoder_depth, f"{decoder_depth} decoder.decoder_layers.*"))
    fuse = shapes.get("delta_encoder.fusion_proj.weight")
    facts.append(Fact("fusion", _fusion(fuse), f"delta_encoder.fusion_proj.weight {fuse}"))
    return [f for f in facts if f is not None]


def _fusion(fuse: tuple[int, ...] | None) -> str:
    """DAM fusion from the fusion Linear (out × in): (γ, β) doubles the width, concat halves it."""
    if fuse is None:
        return "none"
    out_dim, in_dim = fuse[0], fuse[-1]
    if out_dim == 2 * in_dim:
        return "sft"
    if out_dim == in_dim:
        return "add"
    return "concat" if in_dim == 2 * out_dim else "?"


def dit_facts(shapes: Shapes) -> list[Fact]:
    """Architecture of a released LightningDiT (the fields of `DiTConfig` its tensors determine)."""
    facts = [
        _fact(shapes, "x_embedder.proj.weight", "hidden", lambda s: s[0]),
        _fact(shapes, "x_embedder.proj.weight", "in_channels", lambda s: s[1]),
        _fact(shapes, "x_embedder.proj.weight", "patch_size", lambda s: s[-1]),
        _fact(shapes, "y_embedder.embedding_table.weight", "num_classes", lambda s: s[0] - 1),
        _fact(shapes, "pos_embed", "grid", lambda s: math.isqrt(s[1])),
        _fact(shapes, "feat_rope.freqs_cos", "head_dim", lambda s: s[1]),
    ]
    depth = _count(shapes, r"blocks\.(\d+)\.")
    facts.append(Fact("depth", depth, f"{depth} blocks.*"))
    for field, name in (
        ("use_qknorm", "blocks.0.attn.q_norm.weight"),
        ("use_swiglu", "blocks.0.mlp.w12.weight"),
        ("use_rmsnorm", "blocks.0.norm1.weight"),
        ("use_rope", "feat_rope.freqs_cos"),
        ("use_abs_pos", "pos_embed"),
    ):
        facts.append(Fact(field, name in shapes, f"{name} {'present' if name in shapes else 'absent'}"))
    return [f for f in facts if f is not None]


def _pae_value(cfg: PAEConfig, field: str) -> object:
    if field.startswith("vfm."):
        return getattr(cfg.vfm, field.removeprefix("vfm."))
    return getattr(cfg, field)


def _dit_value(cfg: DiTConfig, field: str) -> object:
    return cfg.head_dim if field == "head_dim" else getattr(cfg, field)


def _mismatches(
    facts: list[Fact],
    value_of: Callable[[object, str], object],
    cfg: object,
    skip: frozenset[str] = frozenset(),
) -> list[str]:
    out = []
    for fact in facts:
        if fact.field in skip:
            continue
        ours = value_of(cfg, fact.field)
        if fact.value != ours:
            out.append(
                f"{fact.field} is {fact.value!r} in the checkpoint ({fact.evidence}) but {ours!r} in the preset"
            )
    return out


# The 800-epoch release turns qk-norm on (paper §3.2); any preset's DiT takes it as a variant.
DIT_VARIANTS = frozenset({"use_qknorm"})


def pae_fits(facts: list[Fact], preset: Preset) -> list[str]:
    return _mismatches(facts, _pae_value, preset.pae)


def dit_fits(facts: list[Fact], preset: Preset) -> list[str]:
    return _mismatches(facts, _dit_value, preset.dit, DIT_VARIANTS)


def _describe_dit(facts: list[Fact]) -> str:
    known = {f.field: f.value for f in facts}
    depth, hidden, head_dim, patch = (known.get(k) for k in ("depth", "hidden", "head_dim", "patch_size"))
    name = size_name(depth, hidden, hidden // head_dim, patch) if hidden and head_dim and patch else None
    size = f"LightningDiT-{name}" if name else "a LightningDiT of no named size"
    return f"{size} (depth {depth}, width {hidden}, {known.get('num_classes')} classes)"


def choose_preset(pae: list[Fact] | None, dit: list[Fact] | None, requested: str | Preset | None) -> Preset:
    """The preset `requested` (a name or a Preset, checked against the facts), or the one preset the
    facts fit. Refuses a checkpoint of another size, naming the evidence and the preset that would fit.
    """
    fitting = [
        name
        for name in PRESETS
        if (pae is None or not pae_fits(pae, PRESETS[name]))
        and (dit is None or not dit_fits(dit, PRESETS[name]))
    ]
    if requested is not None:
        if isinstance(requested, str):
            if requested not in PRESETS:
                raise PresetMismatch(f"unknown preset {requested!r}; known presets: {sorted(PRESETS)}")
            requested = PRESETS[requested]
        problems = (pae_fits(pae, requested) if pae else []) + (dit_fits(dit, requested) if dit else [])
        if problems:
            hint = (
                f"preset(s) that fit: {', '.join(fitting)}"
                if fitting
                else "no preset of this project fits it"
            )
            what = f" The generator is {_describe_dit(dit)}." if dit else ""
            raise PresetMismatch(
                f"the checkpoint does not fit preset {requested.name!r}: "
                + "; ".join(problems)
                + f".{what} {hint}"
            )
        return requested
    if len(fitting) == 1:
        return PRESETS[fitting[0]]
    if fitting:
        raise PresetMismatch(f"the checkpoint fits several presets ({', '.join(fitting)}); pass --preset")
    paper = PRESETS["imagenet256-dinov2l"]
    problems = (pae_fits(pae, paper) if pae else []) + (dit_fits(dit, paper) if dit else [])
    raise PresetMismatch(
        f"no preset of this project fits the checkpoint; against {paper.name}: " + "; ".join(problems)
    )
