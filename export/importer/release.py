"""Official PAE / LightningDiT checkpoints → a checkpoint directory `pae-export` takes.

`plan_import` reads the inputs lazily and checks everything before a byte is written: which preset
the tensors fit (sizes read off the tensors), that every tensor is mapped or accounted for, that the
stored fixed tables equal the recomputed ones, and that the latent statistics fit. `write_import`
then converts the weights into this project's names and writes, atomically:

```
<out>/config.json                 preset + resolved pae/dit/sampler sections (what export reads)
<out>/pae.safetensors             tokenizer weights (the entry the authors' tools use, or --pae-weights)
<out>/dit_ema.safetensors         generator weights (EMA unless --dit-weights model)
<out>/latent_stats.safetensors    per-channel mean/std of the latents
<out>/vfm/                        the frozen DINOv2 as a Hugging Face folder, when the checkpoint holds it
<out>/MODEL_CARD.md, import.json  sources with sha256, what was mapped, checked and left out
```
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from export.importer import check, infer, vfm_folder
from export.importer.card import model_card
from export.importer.layout import VFM_PREFIX, Layout, dit_layout, pae_layout
from export.importer.sources import (
    SourceError,
    SourceFile,
    TensorRef,
    read_diffusers,
    read_latent_stats,
    read_weights,
)
from model.checkpoint import DIT_EMA_FILE, LATENT_STATS_FILE, PAE_FILE, preset_config, save_tensors
from model.presets import Preset
from model.vfm.hf import weight_files

VFM_DIR = "vfm"
# Which entry of a `.pt` holds the weights: the authors' tools read the tokenizer's `model` and the
# generator's `ema` (falling back to the file's own dict). "" stands for the file's own dict.
PAE_ENTRIES: dict[str, tuple[str, ...]] = {"model": ("model",), "ema": ("ema",)}
DIT_ENTRIES: dict[str, tuple[str, ...]] = {"ema": ("ema", ""), "model": ("model",)}


@dataclass(frozen=True)
class Inputs:
    """The files a user brings; `diffusers` replaces `pae` and `dit`."""

    pae: Path | None = None
    dit: Path | None = None
    latent_stats: Path | None = None
    diffusers: Path | None = None


@dataclass
class ImportPlan:
    """Everything read and checked, nothing converted or written yet."""

    preset: Preset
    sources: list[SourceFile]
    pae: dict[str, TensorRef] | None = None
    dit: dict[str, TensorRef] | None = None
    stats: tuple[torch.Tensor, torch.Tensor] | None = None
    vfm: dict[str, TensorRef] | None = None
    vfm_shape: vfm_folder.DinoV2Shape | None = None
    vfm_dir: Path | None = None
    report: dict = field(default_factory=dict)

    def layouts(self) -> tuple[Layout, Layout]:
        return pae_layout(self.preset.pae), dit_layout(self.preset.dit)


def _shapes(tensors: dict[str, TensorRef]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(ref.shape) for name, ref in tensors.items()}


def _read(
    inputs: Inputs, pae_weights: str, dit_weights: str
) -> tuple[dict | None, dict | None, dict[str, SourceFile]]:
    if pae_weights not in PAE_ENTRIES or dit_weights not in DIT_ENTRIES:
        raise ValueError(
            f"pae_weights must be one of {list(PAE_ENTRIES)}, dit_weights one of {list(DIT_ENTRIES)}"
        )
    if inputs.diffusers is not None:
        if inputs.pae is not None or inputs.dit is not None:
            raise SourceError("give either a diffusers folder or the PAE/DiT checkpoint files, not both")
        pae, pae_source, dit, dit_source = read_diffusers(inputs.diffusers)
        return pae, dit, {"pae": pae_source, "dit": dit_source}
    pae = dit = None
    sources = {}
    if inputs.pae is not None:
        pae, sources["pae"] = read_weights(inputs.pae, "PAE tokenizer", PAE_ENTRIES[pae_weights])
    if inputs.dit is not None:
        dit, sources["dit"] = read_weights(inputs.dit, "LightningDiT", DIT_ENTRIES[dit_weights])
    return pae, dit, sources


def _plan_vfm(plan: ImportPlan, encoder: dict[str, TensorRef], vfm_dir: Path | None, where: str) -> None:
    spec = plan.preset.pae.vfm
    if vfm_dir is not None:
        weight_files(spec.kind, str(vfm_dir))  # a clear error when the folder is incomplete
        plan.vfm_dir = Path(vfm_dir).resolve()
        plan.report["vfm"] = {
            "origin": "--vfm-dir",
            "path": str(plan.vfm_dir),
            "checkpoint_encoder_tensors": len(encoder),
        }
        return
    if not encoder:
        raise SourceError(
            f"{where} holds no frozen encoder ({VFM_PREFIX}*); pass --vfm-dir with the {spec.kind} Hugging Face folder"
        )
    if spec.kind != "dinov2":
        raise SourceError(
            f"writing a {spec.kind} folder from the checkpoint's encoder tensors is not supported; pass --vfm-dir"
        )
    stray = sorted(n for n in encoder if not n.startswith(vfm_folder.HF_PREFIX))
    if stray:
        raise check.TensorMismatch(
            f"{where}: unexpected encoder tensors outside {vfm_folder.HF_PREFIX}*: {stray[:8]}"
        )
    tensors = vfm_folder.encoder_tensors(encoder)
    shape = vfm_folder.infer_dinov2(tensors)
    vfm_folder.check_against_spec(shape, spec)
    expected = vfm_folder.dinov2_shapes(shape)
    prefixed = {vfm_folder.HF_PREFIX + n: r for n, r in tensors.items()}
    check.check_names(
        f"{where} (frozen DINOv2, names in transformers-5 form)",
        prefixed,
        {vfm_folder.HF_PREFIX + n: s for n, s in expected.items()},
        plan.preset.name,
    )
    plan.vfm, plan.vfm_shape = tensors, shape
    plan.report["vfm"] = {"origin": "checkpoint", "tensors": len(tensors), **dataclasses.asdict(shape)}


def plan_import(
    inputs: Inputs,
    preset: str | Preset | None = None,
    pae_weights: str = "model",
    dit_weights: str = "ema",
    vfm_dir: Path | None = None,
    sampler_preset: str | None = None,
) -> ImportPlan:
    """Read and check the inputs; raise (naming the tensor, file or preset) at the first problem."""
    pae, dit, sources = _read(inputs, pae_weights, dit_weights)
    encoder = {n: r for n, r in (pae or {}).items() if n.startswith(VFM_PREFIX)}
    pae_own = None if pae is None else {n: r for n, r in pae.items() if not n.startswith(VFM_PREFIX)}
    pae_facts = infer.pae_facts(_shapes(pae_own)) if pae_own is not None else None
    dit_facts = infer.dit_facts(_shapes(dit)) if dit is not None else None
    if pae_facts is None and dit_facts is None and preset is None:
        raise SourceError(
            "nothing to import: give a PAE checkpoint, a LightningDiT checkpoint or a diffusers folder"
        )
    chosen = infer.choose_preset(pae_facts, dit_facts, preset)
    if dit_facts is not None:
        qknorm = next(f.value for f in dit_facts if f.field == "use_qknorm")
        chosen = dataclasses.replace(chosen, dit=dataclasses.replace(chosen.dit, use_qknorm=qknorm))
    default_sampler = None
    if sampler_preset or chosen.sampler_presets:
        # The 800-epoch release is the one trained with qk-norm (paper §3.2, §3.7).
        default_sampler = sampler_preset or ("release-800ep" if chosen.dit.use_qknorm else "release-80ep")
        if default_sampler not in chosen.sampler_presets:
            raise ValueError(
                f"unknown sampler preset {default_sampler!r}; {chosen.name} has {sorted(chosen.sampler_presets)}"
            )
        chosen = dataclasses.replace(chosen, sampler=chosen.sampler_presets[default_sampler])
    plan = ImportPlan(chosen, list(sources.values()), pae_own, dit)
    plan.report = {
        "preset": chosen.name,
        "architecture": {
            "pae": {f.field: f.value for f in pae_facts or []},
            "dit": {f.field: f.value for f in dit_facts or []},
        },
        "sampler": {"default": default_sampler, "presets": sorted(chosen.sampler_presets)},
        "weights": {s.role: s.entry for s in sources.values()},
        "tensors": {},
    }
    pae_map, dit_map = plan.layouts()
    for tensors, layout, source in ((pae_own, pae_map, "pae"), (dit, dit_map, "dit")):
        if tensors is None:
            continue
        where = str(sources[source].path)
        check.check_names(where, tensors, layout.shapes(), chosen.name)
        fixed = check.check_fixed_tables(where, tensors, layout)
        plan.report["tensors"][source] = {
            "official": len(tensors) + (len(encoder) if source == "pae" else 0),
            "parameters": len(layout.rules),
            "fixed_tables_max_abs_diff": fixed,
            "source_dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        }
    if pae_own is not None:
        _plan_vfm(plan, encoder, vfm_dir, str(sources["pae"].path))
    elif vfm_dir is not None:
        plan.vfm_dir = Path(vfm_dir).resolve()
    if inputs.latent_stats is not None:
        mean, std, plan_source = read_latent_stats(inputs.latent_stats)
        plan.sources.append(plan_source)
        if mean.numel() != chosen.pae.latent_dim:
            raise SourceError(
                f"{inputs.latent_stats} holds {mean.numel()} channels; preset {chosen.name} has {chosen.pae.latent_dim}"
            )
        plan.stats = (mean, std)
    return plan


def _fresh(out: Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new output folder")
    return out


def write_import(plan: ImportPlan, out: Path) -> Path:
    """Convert and write the checkpoint directory (atomically: a failure leaves no `out`)."""
    missing = [
        name
        for name, part in (("PAE", plan.pae), ("LightningDiT", plan.dit), ("latent statistics", plan.stats))
        if part is None
    ]
    if missing:
        raise SourceError(
            f"a checkpoint directory needs the PAE, the LightningDiT and the latent statistics; missing: {missing}"
        )
    out = _fresh(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.importing-", dir=out.parent))
    try:
        preset = plan.preset
        if plan.vfm is not None:
            vfm_path = out.resolve() / VFM_DIR
            vfm_folder.write_dinov2_folder(plan.vfm, plan.vfm_shape, stage / VFM_DIR)
        else:
            vfm_path = plan.vfm_dir
        preset = dataclasses.replace(
            preset,
            pae=dataclasses.replace(preset.pae, vfm=dataclasses.replace(preset.pae.vfm, path=str(vfm_path))),
        )
        pae_map, dit_map = plan.layouts()
        save_tensors(stage / PAE_FILE, check.convert(plan.pae, pae_map))
        save_tensors(stage / DIT_EMA_FILE, check.convert(plan.dit, dit_map))
        mean, std = plan.stats
        save_tensors(stage / LATENT_STATS_FILE, {"mean": mean, "std": std})
        plan.report["sources"] = [s.describe() for s in plan.sources]
        config = {**preset_config(preset), "stage": "import", "imported": {"sources": plan.report["sources"]}}
        (stage / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (stage / "import.json").write_text(json.dumps(plan.report, indent=2, sort_keys=True) + "\n")
        (stage / "MODEL_CARD.md").write_text(model_card(plan.report, preset))
        for path in (stage, *stage.rglob("*")):  # mkdtemp and safetensors create owner-only modes
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            out.rmdir()
        os.rename(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def import_release(out: Path | None, inputs: Inputs, **options: object) -> dict:
    """Plan, check and (unless `out` is None) write; return the import report."""
    if out is not None:
        _fresh(out)  # before minutes of reading
    plan = plan_import(inputs, **options)  # type: ignore[arg-type]
    if out is None:
        plan.report["sources"] = [s.describe(hash_files=False) for s in plan.sources]
    else:
        write_import(plan, out)
        plan.report["written"] = str(Path(out).resolve())
    return plan.report
