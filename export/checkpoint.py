"""Read a training checkpoint directory (docs/INTERFACES.md) into eval-mode torch models.

Export must not import `training/`, so this reads the directory with safetensors and the `model/`
configs directly. Every file it uses is hashed, so the manifest can name the exact checkpoint a
repository version came from.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from export.manifest import sha256_file
from model.lightningdit import DiTConfig, LightningDiT
from model.pae import PAE, PAEConfig
from model.presets import Preset, get_preset
from model.sampling import SamplerConfig
from model.vfm import build_vfm

CONFIG = "config.json"
PAE_FILES = ("pae_ema.safetensors", "pae.safetensors")  # EMA weights are what is served, when present
DIT_FILE = "dit_ema.safetensors"
STATS_FILE = "latent_stats.safetensors"
_SECTIONS: dict[str, type] = {"pae": PAEConfig, "dit": DiTConfig, "sampler": SamplerConfig}


class CheckpointError(RuntimeError):
    """A checkpoint directory is incomplete, unreadable or inconsistent with its config."""


@dataclass
class LoadedCheckpoint:
    """The models and metadata export needs, all on CPU in eval mode."""

    directory: Path
    preset: Preset
    pae: PAE
    dit: LightningDiT
    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    pae_file: str
    file_hashes: dict[str, str]

    @property
    def null_class(self) -> int:
        return self.preset.dit.num_classes


def from_jsonable(cls: type, data: Any, where: str) -> Any:
    """Rebuild a frozen dataclass (nested dataclasses, tuples, optionals) from its JSON form.

    Unknown keys are an error (a config from a newer code base must not be half-read); missing keys
    take the field's default, or fail naming the field.
    """
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} must be a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CheckpointError(f"{where}: unknown {cls.__name__} field(s) {unknown}")
    values = {name: _convert(hints[name], data[name], f"{where}.{name}") for name in fields if name in data}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where} is not a valid {cls.__name__}: {exc}") from exc


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_jsonable(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where) if len(inner) == 1 else value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise CheckpointError(f"{where} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, where) for v in value)
        if args and len(args) != len(value):
            raise CheckpointError(f"{where} must have {len(args)} items, got {value!r}")
        return (
            tuple(value)
            if not args
            else tuple(_convert(a, v, where) for a, v in zip(args, value, strict=True))
        )
    return value


def preset_from_config(config: dict, where: str = CONFIG) -> Preset:
    """The named preset with the checkpoint's resolved `pae`, `dit` and `sampler` sections applied."""
    name = config.get("preset")
    if isinstance(name, dict):
        name = name.get("name")
    if not isinstance(name, str):
        raise CheckpointError(f"{where} has no 'preset' name (got {config.get('preset')!r})")
    try:
        base = get_preset(name)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    overrides = {
        key: from_jsonable(cls, config[key], f"{where}:{key}")
        for key, cls in _SECTIONS.items()
        if key in config
    }
    try:
        return dataclasses.replace(base, **overrides)
    except ValueError as exc:
        raise CheckpointError(f"{where}: the resolved configs do not fit together: {exc}") from exc


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc


def _load_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in expected if k in tensors and tensors[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path.name} does not fit {type(module).__name__} of this config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    module.load_state_dict(tensors, strict=True)


def load_checkpoint(directory: Path) -> LoadedCheckpoint:
    """Build PAE (with its frozen VFM) and the EMA LightningDiT from a checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    config_path = directory / CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    preset = preset_from_config(config, str(config_path))

    pae_path = next((directory / f for f in PAE_FILES if (directory / f).is_file()), None)
    if pae_path is None:
        raise CheckpointError(f"{directory} has neither {' nor '.join(PAE_FILES)}")
    for required in (DIT_FILE, STATS_FILE):
        if not (directory / required).is_file():
            raise CheckpointError(f"{directory} has no {required}")

    pae = PAE(preset.pae, build_vfm(preset.pae.vfm)).eval()
    _load_strict(pae, _tensors(pae_path), pae_path)
    dit = LightningDiT(preset.dit).eval()
    _load_strict(dit, _tensors(directory / DIT_FILE), directory / DIT_FILE)

    stats = _tensors(directory / STATS_FILE)
    d = preset.pae.latent_dim
    for key in ("mean", "std"):
        if key not in stats or stats[key].numel() != d:
            raise CheckpointError(f"{STATS_FILE} needs '{key}' with {d} values (one per latent channel)")
    mean, std = stats["mean"].float().reshape(d), stats["std"].float().reshape(d)
    if not bool((std > 0).all()):
        raise CheckpointError(f"{STATS_FILE}: every latent std must be > 0, got {std.tolist()}")

    hashes = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file()}
    return LoadedCheckpoint(directory, preset, pae, dit, mean, std, pae_path.name, hashes)


def torch_config(preset: Preset) -> dict:
    """The checkpoint `config.json` format (INTERFACES.md) for a resolved preset: what `torch/` ships."""
    return {"preset": preset.name, **{key: _jsonable(getattr(preset, key)) for key in _SECTIONS}}


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj
