"""Resumable training state: everything a stage needs to continue a run exactly where it stopped.

A different format from the checkpoint directory (`model/checkpoint.py`), built from its pieces:
nothing is pickled. Weights, optimiser moments, EMA shadows and RNG states are tensors in one
safetensors file; everything else (step, optimiser hyper-parameters, scheduler counters, Python's
RNG) is JSON. The state of a stage lives in `DIR/resume/<stage>/` as `state.safetensors` +
`state.json`, and the folder is replaced atomically, so a run killed mid-save resumes from the
previous state:

- `model.<name>.<key>`   module state dicts (without DDP's `module.` prefix)
- `optim.<name>.<param index>.<key>`   optimiser per-parameter state (AdamW: step, exp_avg, exp_avg_sq)
- `ema.<name>.<key>`     EMA shadows
- `rng.<rank>.<kind>`    every rank's torch (CPU and CUDA), NumPy and Python RNG state
"""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.checkpoint import CheckpointError, load_state, load_tensors, read_json, save_tensors, write_json
from training.distributed import unwrap
from training.optim import EMA

RESUME_DIR = "resume"


def module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict without wrapper prefixes (`module.`, `_orig_mod.`)."""
    return dict(unwrap(module).state_dict())


def load_module(module: nn.Module, tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Strictly load `tensors` into a (possibly DDP-wrapped) module; a mismatch raises `CheckpointError`."""
    load_state(unwrap(module), tensors, what)


# --- optimiser state ----------------------------------------------------------------------------


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into per-parameter tensors and a JSON-able remainder."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping
) -> None:
    """Inverse of `optimizer_to_flat`; checks the parameter layout matches before loading."""
    groups = meta["param_groups"]
    current = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in current]:
        raise CheckpointError(
            "optimizer state has a different parameter-group layout "
            f"({[len(g['params']) for g in groups]} vs {[len(g['params']) for g in current]})"
        )
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --- RNG state ----------------------------------------------------------------------------------


def rng_state_tensors() -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors: torch CPU, each CUDA device, NumPy, Python."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    if kind != "MT19937":
        raise CheckpointError(f"unsupported NumPy RNG kind {kind!r}")
    out["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    out["numpy.aux"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    out["numpy.gauss"] = torch.tensor([gauss], dtype=torch.float64)
    version, internal, py_gauss = random.getstate()
    out["python.state"] = torch.tensor(internal, dtype=torch.int64)
    out["python.aux"] = torch.tensor([version, 0 if py_gauss is None else 1], dtype=torch.int64)
    out["python.gauss"] = torch.tensor([0.0 if py_gauss is None else py_gauss], dtype=torch.float64)
    return out


def set_rng_state_tensors(state: Mapping[str, torch.Tensor]) -> None:
    """Restore what `rng_state_tensors` captured (CUDA states only when the devices exist)."""
    torch.set_rng_state(state["torch"].to(torch.uint8))
    cuda = [state[k] for k in sorted(k for k in state if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in cuda])
    pos, has_gauss = (int(v) for v in state["numpy.aux"])
    keys = state["numpy.keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy.gauss"][0])))
    version, has_py_gauss = (int(v) for v in state["python.aux"])
    py_gauss = float(state["python.gauss"][0]) if has_py_gauss else None
    random.setstate((version, tuple(int(v) for v in state["python.state"]), py_gauss))


# --- resume state -------------------------------------------------------------------------------


def resume_dir(out_dir: str | Path, stage: str) -> Path:
    return Path(out_dir) / RESUME_DIR / stage


def save_resume(
    out_dir: str | Path,
    stage: str,
    step: int,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, torch.optim.lr_scheduler.LRScheduler] | None = None,
    emas: Mapping[str, EMA] | None = None,
    rng_by_rank: list[dict[str, torch.Tensor]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the full training state of `stage` at `step` (call on rank 0 only).

    `rng_by_rank` is every rank's `rng_state_tensors()` (gathered by the caller), so a resumed DDP
    run continues each rank's random stream. The directory is replaced atomically.
    """
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"stage": stage, "step": step, "extra": dict(extra or {})}
    for name, module in modules.items():
        for key, value in module_state(module).items():
            tensors[f"model.{name}.{key}"] = value
    meta["optimizers"] = {}
    for name, opt in optimizers.items():
        flat, opt_meta = optimizer_to_flat(opt)
        for key, value in flat.items():
            tensors[f"optim.{name}.{key}"] = value
        meta["optimizers"][name] = opt_meta
    meta["schedulers"] = {name: _scheduler_json(s) for name, s in (schedulers or {}).items()}
    for name, ema in (emas or {}).items():
        for key, value in ema.state_dict().items():
            tensors[f"ema.{name}.{key}"] = value
        meta.setdefault("ema_decay", {})[name] = ema.decay
    for rank, rng in enumerate(rng_by_rank or []):
        for key, value in rng.items():
            tensors[f"rng.{rank}.{key}"] = value
    meta["world_size"] = len(rng_by_rank or [])

    final = resume_dir(out_dir, stage)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{stage}.", dir=final.parent))
    try:
        save_tensors(staging / "state.safetensors", tensors)
        write_json(staging / "state.json", meta)
        old = final.with_name(f".{stage}.old")
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _scheduler_json(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict:
    """A scheduler's state without its (unserialisable, rebuilt from config) lambdas."""
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def resume_step(out_dir: str | Path, stage: str) -> int | None:
    """The step a saved state of `stage` is at, or None when there is none."""
    path = resume_dir(out_dir, stage) / "state.json"
    return int(read_json(path)["step"]) if path.is_file() else None


def load_resume(
    out_dir: str | Path,
    stage: str,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, torch.optim.lr_scheduler.LRScheduler] | None = None,
    emas: Mapping[str, EMA] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[int, dict[str, Any]]:
    """Restore everything `save_resume` wrote into live objects; returns `(step, extra)`.

    The RNG of `rank` is restored only when the saved run had the same world size (otherwise the
    streams cannot be matched and each rank keeps the seed it was started with).
    """
    directory = resume_dir(out_dir, stage)
    meta = read_json(directory / "state.json")
    if meta.get("stage") != stage:
        raise CheckpointError(f"{directory} holds state of stage {meta.get('stage')!r}, not {stage!r}")
    tensors = load_tensors(directory / "state.safetensors")
    groups = _split_prefix(tensors)
    for name, module in modules.items():
        load_module(module, groups.get(f"model.{name}", {}), f"{directory}: model {name!r}")
    for name, opt in optimizers.items():
        if name not in meta["optimizers"]:
            raise CheckpointError(f"{directory} has no optimizer state named {name!r}")
        optimizer_from_flat(opt, groups.get(f"optim.{name}", {}), meta["optimizers"][name])
    for name, sched in (schedulers or {}).items():
        if name not in meta["schedulers"]:
            raise CheckpointError(f"{directory} has no scheduler state named {name!r}")
        sched.load_state_dict({**meta["schedulers"][name], "lr_lambdas": [None] * len(sched.lr_lambdas)})
    for name, ema in (emas or {}).items():
        if f"ema.{name}" not in groups:
            raise CheckpointError(f"{directory} has no EMA state named {name!r}")
        ema.load_state_dict(groups[f"ema.{name}"])
    if meta.get("world_size") == world_size and f"rng.{rank}" in groups:
        set_rng_state_tensors(groups[f"rng.{rank}"])
    return int(meta["step"]), dict(meta.get("extra", {}))


def _split_prefix(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group `a.b.rest` keys by their `a.b` prefix."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        kind, name, rest = key.split(".", 2)
        out.setdefault(f"{kind}.{name}", {})[rest] = value
    return out
