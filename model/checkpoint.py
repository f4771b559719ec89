"""The checkpoint directory: the one format training writes and export and the torch runtime read.

Like a diffusers `from_pretrained` folder, a checkpoint is a `config.json` beside one safetensors file
per network. Nothing is pickled, so loading a checkpoint never runs code from it. `config.json` holds
the preset's name and the resolved `pae`, `dit` and `sampler` configs as JSON objects of their fields
(tuples as lists); a missing section falls back to the named preset's. Training keeps its own keys
(recipes, stage records) in the same file; readers of the model ignore them.

Every write goes to a temporary name that is renamed into place, so a run killed mid-save leaves the
previous file intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from model.autoencoders import AutoencoderConfig, build_autoencoder
from model.hashing import sha256_file
from model.kl_autoencoder import KLAutoencoder
from model.lightningdit import DiTConfig, LightningDiT
from model.pae import PAE, PAEConfig
from model.presets import Preset, get_preset
from model.rae import RAE
from model.vfm import FrozenVFM, build_vfm

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
PAE_FILE = "pae.safetensors"
PAE_EMA_FILE = "pae_ema.safetensors"
DIT_EMA_FILE = "dit_ema.safetensors"
LATENT_STATS_FILE = "latent_stats.safetensors"  # `mean` and `std`, one value per latent channel
CLASSIFIER_FILE = "classifier.safetensors"  # the judge of conditional accuracy in the metrics
REFINE_FILE = "refine.safetensors"  # the refine stage's projector and deprojector
# EMA weights are what is served; the raw ones stand in when a run kept no EMA.
SERVED_PAE_FILES = (PAE_EMA_FILE, PAE_FILE)
# The sections of config.json that describe the model: fields of `Preset` holding config dataclasses.
MODEL_SECTIONS = ("pae", "dit", "sampler")
# Written only for a latent other than PAE's (the comparison autoencoders), so PAE checkpoints keep
# exactly the sections above.
AUTOENCODER_SECTION = "autoencoder"


def autoencoder_files(kind: str) -> tuple[str, str]:
    """(live, EMA) weight files of the tokenizer stage's autoencoder: PAE's, or `rae`/`vae` ones, so
    a directory never holds one family's weights under another's name."""
    return (PAE_FILE, PAE_EMA_FILE) if kind == "pae" else (f"{kind}.safetensors", f"{kind}_ema.safetensors")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not fit the config it is loaded into."""


# --- JSON ---------------------------------------------------------------------------------------


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, mappings, tuples and paths as plain JSON values (dataclasses as field objects)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


def from_jsonable(cls: type, data: Any, where: str) -> Any:
    """Rebuild a frozen dataclass (nested dataclasses, tuples, optionals) from its JSON form.

    Unknown keys are an error (a config from a newer code base must not be half-read); missing keys
    take the field's default, or fail naming the field.
    """
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} must be a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
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


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would make shipped files unreadable to other users
    return Path(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    """Pretty, key-sorted JSON, written atomically."""
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"JSON file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def update_json(path: str | Path, updates: Mapping[str, Any]) -> dict:
    """Merge `updates` into a JSON object file (created when absent), recursively for nested dicts."""
    path = Path(path)
    current = read_json(path) if path.is_file() else {}
    if not isinstance(current, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    _deep_merge(current, updates)
    write_json(path, current)
    return current


def _deep_merge(into: dict, updates: Mapping[str, Any]) -> None:
    for key, value in updates.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


# --- safetensors --------------------------------------------------------------------------------


def save_tensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write tensors (moved to CPU, made contiguous, shared storage broken) to a safetensors file."""
    path = Path(path)
    clean = {}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{path.name}: value for {key!r} is {type(value).__name__}, not a tensor")
        clean[key] = value.detach().to("cpu").contiguous().clone()
    tmp = _atomic_target(path)
    try:
        save_file(clean, str(tmp), metadata=dict(metadata) if metadata else None)
        os.chmod(tmp, 0o644)  # safetensors recreates the file with 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file; a missing or corrupt file raises `CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:
        raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata header of a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc


def load_state(module: nn.Module, tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Strictly load `tensors` into `module`; a key or shape mismatch raises `CheckpointError`."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{what} does not fit {type(module).__name__} of this config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]} (was it written by another preset?)"
        )
    module.load_state_dict(dict(tensors), strict=True)


# --- the directory ------------------------------------------------------------------------------


def preset_config(preset: Preset) -> dict[str, Any]:
    """The model sections of `config.json` for a resolved preset (what `preset_from_config` reads)."""
    out = {"preset": preset.name, **{key: to_jsonable(getattr(preset, key)) for key in MODEL_SECTIONS}}
    if preset.autoencoder.kind != "pae":
        out[AUTOENCODER_SECTION] = to_jsonable(preset.autoencoder)
    return out


def read_section(config: Mapping[str, Any], key: str, where: str = CONFIG_FILE) -> Any:
    """One model section of `config.json` (`pae`, `dit` or `sampler`) as its config dataclass."""
    if key not in config:
        raise CheckpointError(f"{where} has no {key!r} section")
    return from_jsonable(typing.get_type_hints(Preset)[key], config[key], f"{where}:{key}")


def preset_from_config(config: Mapping[str, Any], where: str = CONFIG_FILE) -> Preset:
    """The named preset with the checkpoint's resolved model sections applied."""
    name = config.get("preset")
    if isinstance(name, dict):
        name = name.get("name")
    if not isinstance(name, str):
        raise CheckpointError(f"{where} has no 'preset' name (got {config.get('preset')!r})")
    try:
        base = get_preset(name)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    overrides = {key: read_section(config, key, where) for key in MODEL_SECTIONS if key in config}
    if AUTOENCODER_SECTION in config:
        overrides[AUTOENCODER_SECTION] = from_jsonable(
            AutoencoderConfig, config[AUTOENCODER_SECTION], f"{where}:{AUTOENCODER_SECTION}"
        )
    try:
        return dataclasses.replace(base, **overrides)
    except ValueError as exc:
        raise CheckpointError(f"{where}: the resolved configs do not fit together: {exc}") from exc


def load_pae(path: Path, cfg: PAEConfig, vfm: FrozenVFM | None = None) -> PAE:
    """A PAE of `cfg` with the weights of `path` (its frozen VFM is never in the file), in eval mode."""
    pae = PAE(cfg, vfm)
    load_state(pae, load_tensors(path), str(path))
    return pae.eval()


def load_autoencoder(path: Path, preset: Preset, vfm: FrozenVFM | None = None) -> PAE | RAE | KLAutoencoder:
    """The preset's autoencoder (PAE, RAE or KL) with the weights of `path`, in eval mode."""
    model = build_autoencoder(preset.autoencoder, preset.pae, vfm if preset.autoencoder.uses_vfm else None)
    load_state(model, load_tensors(path), str(path))
    return model.eval()


def load_dit(path: Path, cfg: DiTConfig) -> LightningDiT:
    """A LightningDiT of `cfg` with the weights of `path`, in eval mode."""
    dit = LightningDiT(cfg)
    load_state(dit, load_tensors(path), str(path))
    return dit.eval()


def load_latent_stats(path: Path, latent_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel mean and std (float32, one value per latent channel) the generator's latents use."""
    stats = load_tensors(path)
    for key in ("mean", "std"):
        if key not in stats or stats[key].numel() != latent_dim:
            raise CheckpointError(f"{path}: '{key}' must hold {latent_dim} values (one per latent channel)")
    mean, std = stats["mean"].float().reshape(latent_dim), stats["std"].float().reshape(latent_dim)
    if not bool((std > 0).all()):
        raise CheckpointError(f"{path}: every latent std must be > 0, got {std.tolist()}")
    return mean, std


def served_pae_file(directory: Path) -> Path | None:
    """The PAE weights a served model uses: the EMA file when present, else the raw one."""
    return next((directory / f for f in SERVED_PAE_FILES if (directory / f).is_file()), None)


@dataclass
class LoadedCheckpoint:
    """A checkpoint's served models and metadata, all on CPU in eval mode."""

    directory: Path
    preset: Preset
    pae: PAE
    dit: LightningDiT
    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    pae_file: str
    # sha256 of every file in the directory, so an export can name the exact checkpoint it came from
    file_hashes: dict[str, str]

    @property
    def null_class(self) -> int:
        return self.preset.dit.num_classes


def load_checkpoint(directory: Path) -> LoadedCheckpoint:
    """PAE (with its frozen VFM), the EMA LightningDiT and the latent statistics of a checkpoint."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not (directory / CONFIG_FILE).is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}")
    config_path = directory / CONFIG_FILE
    preset = preset_from_config(read_json(config_path), str(config_path))
    if preset.autoencoder.kind != "pae":
        raise CheckpointError(
            f"{directory} holds a {preset.autoencoder.kind} comparison model; only PAE checkpoints are served"
        )
    pae_path = served_pae_file(directory)
    if pae_path is None:
        raise CheckpointError(f"{directory} has neither {' nor '.join(SERVED_PAE_FILES)}")
    for required in (DIT_EMA_FILE, LATENT_STATS_FILE):
        if not (directory / required).is_file():
            raise CheckpointError(f"{directory} has no {required}")
    pae = load_pae(pae_path, preset.pae, build_vfm(preset.pae.vfm))
    dit = load_dit(directory / DIT_EMA_FILE, preset.dit)
    mean, std = load_latent_stats(directory / LATENT_STATS_FILE, preset.pae.latent_dim)
    hashes = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file()}
    return LoadedCheckpoint(directory, preset, pae, dit, mean, std, pae_path.name, hashes)


def write_checkpoint(
    directory: Path,
    preset: Preset,
    pae: PAE,
    dit: LightningDiT,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    ema: bool = True,
) -> Path:
    """Save a complete served checkpoint of `preset` (models built outside training: tests, benchmarks)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / (PAE_EMA_FILE if ema else PAE_FILE), pae.trainable_state_dict())
    save_tensors(directory / DIT_EMA_FILE, dit.state_dict())
    save_tensors(directory / LATENT_STATS_FILE, {"mean": latent_mean, "std": latent_std})
    write_json(directory / CONFIG_FILE, preset_config(preset))
    return directory


def is_complete(directory: Path) -> bool:
    """Whether `directory` holds everything `load_checkpoint` needs."""
    needed = (CONFIG_FILE, DIT_EMA_FILE, LATENT_STATS_FILE)
    return served_pae_file(directory) is not None and all((directory / f).is_file() for f in needed)
