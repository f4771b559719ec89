"""Checkpoint → model-repository version: export, parity gate, optional fp16 and TensorRT, publish.

Order matters for the "writes nothing on failure" promise: everything is produced inside a staging
folder (export.repository.staged_version), the parity gate runs on the staged graphs, and only a
version whose every graph passed is hashed and renamed into place.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from export.onnx_graphs import (
    DEFAULT_OPSET,
    GRAPHS,
    CondDiTGraph,
    DecoderGraph,
    EncoderGraph,
    GuidedDiTGraph,
    export_onnx,
    to_fp16,
    validate_graph,
)
from export.parity import (
    TOLERANCES_FP16,
    TOLERANCES_FP32,
    ParityCase,
    ParityResult,
    Tolerance,
    enforce,
    measure,
    ort_session,
)
from export.repository import CONFIG_NAME, MANIFEST_NAME, TORCH_DIR, staged_version, write_json
from export.samples import fashion_mnist_test, parity_images
from export.tensorrt import batch_range, build_engine
from model.checkpoint import (
    CONFIG_FILE,
    DIT_EMA_FILE,
    LATENT_STATS_FILE,
    PAE_FILE,
    LoadedCheckpoint,
    load_checkpoint,
    preset_config,
)
from model.flow import guided_velocity

PARITY_BATCHES: tuple[int, ...] = (1, 3)
# Per-image CFG scales and times cycled through the parity batches: no guidance, the default-scale
# value and a strong one; times from nearly noise to nearly data.
_CFG_SCALES = (1.0, 2.0, 4.0)
_TIMES = (0.05, 0.5, 0.95, 0.3)


def graph_modules(ckpt: LoadedCheckpoint) -> dict[str, torch.nn.Module]:
    """The four export wrappers around the checkpoint's models."""
    return {
        "encoder": EncoderGraph(ckpt.pae),
        "decoder": DecoderGraph(ckpt.pae),
        "dit": GuidedDiTGraph(ckpt.dit, ckpt.null_class),
        "dit_cond": CondDiTGraph(ckpt.dit),
    }


@torch.no_grad()
def parity_cases(
    ckpt: LoadedCheckpoint, batches: Sequence[int] = PARITY_BATCHES
) -> dict[str, list[ParityCase]]:
    """Real inputs for every graph at each batch size, with torch's answers from the models' own API.

    Encoder: Fashion-MNIST test images and photos. Decoder: those images' latents. DiT: their
    normalised latents mixed with seeded noise at several times, real Fashion-MNIST labels (the last
    image of an odd batch gets the null class) and several CFG scales.
    """
    preset = ckpt.preset
    size, d = preset.pae.image_size, preset.pae.latent_dim
    total = sum(batches)
    images, tags = parity_images(total, size)
    _, fm_labels = fashion_mnist_test(total)
    labels = torch.from_numpy(fm_labels % preset.dit.num_classes)
    mean, std = ckpt.latent_mean.reshape(1, d, 1, 1), ckpt.latent_std.reshape(1, d, 1, 1)
    generator = torch.Generator().manual_seed(0)

    cases: dict[str, list[ParityCase]] = {name: [] for name in GRAPHS}
    start = 0
    for batch in batches:
        idx = slice(start, start + batch)
        start += batch
        x01 = images[idx].contiguous()
        source = ", ".join(tags[idx])
        z = ckpt.pae.encode(x01)
        cases["encoder"].append(ParityCase("encoder", {"images": x01.numpy()}, z.numpy(), source))
        decoded = ckpt.pae.decode(z).clamp(0.0, 1.0)
        cases["decoder"].append(
            ParityCase("decoder", {"latents": z.numpy()}, decoded.numpy(), f"latents of {source}")
        )

        noise = torch.randn(z.shape, generator=generator)
        t = torch.tensor([_TIMES[i % len(_TIMES)] for i in range(batch)], dtype=torch.float32)
        tb = t.reshape(-1, 1, 1, 1)
        x_t = tb * ((z - mean) / std) + (1 - tb) * noise
        y = labels[idx].clone()
        if batch > 1:
            y[-1] = ckpt.null_class
        scale = torch.tensor([_CFG_SCALES[i % len(_CFG_SCALES)] for i in range(batch)], dtype=torch.float32)
        dit_source = f"noised latents of {source}; t={t.tolist()}; y={y.tolist()}"
        v_guided = guided_velocity(ckpt.dit, x_t, t, y, scale, ckpt.null_class)
        cases["dit"].append(
            ParityCase(
                "dit",
                {"x": x_t.numpy(), "t": t.numpy(), "y": y.numpy(), "cfg_scale": scale.numpy()},
                v_guided.numpy(),
                f"{dit_source}; cfg_scale={scale.tolist()}",
            )
        )
        v_cond = ckpt.dit(x_t, t, y)
        cases["dit_cond"].append(
            ParityCase(
                "dit_cond", {"x": x_t.numpy(), "t": t.numpy(), "y": y.numpy()}, v_cond.numpy(), dit_source
            )
        )
    return cases


def _example_inputs(case: ParityCase) -> tuple[torch.Tensor, ...]:
    """Tracing inputs of batch >= 2 (a batch-1 example invites the tracer to specialise the axis)."""
    reps = 1 if case.batch >= 2 else 2
    return tuple(torch.from_numpy(np.concatenate([v] * reps)) for v in case.inputs.values())


def _run_parity(path: Path, cases: Sequence[ParityCase], tolerance: Tolerance) -> list[ParityResult]:
    return measure(ort_session(path), cases, tolerance)


def _repository_config(ckpt: LoadedCheckpoint, name: str, version: int, graphs: dict) -> dict:
    preset = ckpt.preset
    return {
        "name": name,
        "version": version,
        "preset": preset.name,
        "dataset": preset.dataset,
        "image_size": preset.pae.image_size,
        "latent_shape": list(preset.pae.latent_shape),
        "latent_mean": ckpt.latent_mean.tolist(),
        "latent_std": ckpt.latent_std.tolist(),
        "class_names": list(preset.class_names),
        "num_classes": preset.dit.num_classes,
        "null_class": ckpt.null_class,
        "sampler": preset.sampler.to_dict(),
        # Named settings a request may pick (`sampler_preset`); the default's name when it is one.
        "sampler_presets": {name: cfg.to_dict() for name, cfg in preset.sampler_presets.items()},
        "default_sampler_preset": next(
            (name for name, cfg in preset.sampler_presets.items() if cfg == preset.sampler), None
        ),
        "graphs": graphs,
        "torch": {
            "config": f"{TORCH_DIR}/{CONFIG_FILE}",
            "pae": f"{TORCH_DIR}/{PAE_FILE}",
            "dit": f"{TORCH_DIR}/{DIT_EMA_FILE}",
            "latent_stats": f"{TORCH_DIR}/{LATENT_STATS_FILE}",
        },
    }


def software_versions() -> dict[str, str | None]:
    """Versions of everything that shaped or will read the graphs (None for what is absent): ONNX
    graphs and TensorRT engines are not portable across every version."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "numpy", "tensorrt"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def export_checkpoint(
    checkpoint: Path,
    repository: Path,
    name: str | None = None,
    version: int | None = None,
    fp16: bool = False,
    tensorrt: bool = False,
    batch_sizes: Sequence[int] = (1, 8, 32),
    trt_precision: str = "fp16",
    tolerances: Mapping[str, Tolerance] | None = None,
    fp16_tolerances: Mapping[str, Tolerance] | None = None,
    parity_batches: Sequence[int] = PARITY_BATCHES,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
) -> Path:
    """Export a checkpoint directory as `<repository>/<name>/<version>/`; return that folder.

    Graphs over 1.5 GiB (or all, with `external_data=True`) keep their weights in `<graph>.onnx.data`,
    hashed in the manifest like every file. Raises (and writes nothing) when any graph fails to export, fails `onnx.checker`, loses its
    dynamic batch axis, or differs from torch beyond its tolerance; likewise for TensorRT failures.
    """
    ckpt = load_checkpoint(checkpoint)
    name = name or ckpt.preset.name
    tolerances = {**TOLERANCES_FP32, **(tolerances or {})}
    fp16_tolerances = {**TOLERANCES_FP16, **(fp16_tolerances or {})}
    trt_batch = batch_range(batch_sizes)
    modules = graph_modules(ckpt)
    cases = parity_cases(ckpt, parity_batches)

    with staged_version(repository, name, version) as (stage, chosen):
        graphs: dict[str, dict] = {}
        results: list[ParityResult] = []
        fp16_results: list[ParityResult] = []
        for graph, module in modules.items():
            onnx_path = stage / f"{graph}.onnx"
            example = _example_inputs(cases[graph][-1])
            described = export_onnx(module, example, GRAPHS[graph], onnx_path, opset, external_data)
            graphs[graph] = {"file": onnx_path.name, **described}
            # Gate each graph as soon as it exists: a failure stops the export before more work.
            results += _run_parity(onnx_path, cases[graph], tolerances[graph])
            enforce(results)
            if fp16:
                half_path = stage / f"{graph}.fp16.onnx"
                to_fp16(onnx_path, half_path)
                half = validate_graph(half_path, GRAPHS[graph])
                graphs[graph]["fp16_file"] = half_path.name
                if "external_data" in half:
                    graphs[graph]["fp16_external_data"] = half["external_data"]
                fp16_results += _run_parity(half_path, cases[graph], fp16_tolerances[graph])
                enforce(fp16_results)

        engines = None
        if tensorrt:
            records = [build_engine(stage / f"{g}.onnx", stage, g, trt_batch, trt_precision) for g in modules]
            for record in records:
                graphs[record.graph]["engine"] = record.file
            first = records[0]
            engines = {
                "gpu": first.gpu,
                "compute_capability": list(first.compute_capability),
                "tensorrt": first.tensorrt,
                "precision": first.precision,
                "batch": {"min": trt_batch.min, "opt": trt_batch.opt, "max": trt_batch.max},
                "engines": {r.graph: r.to_dict() for r in records},
            }

        # The served PAE weights (EMA when the checkpoint had them) under the plain name: `torch/` is
        # a checkpoint directory of exactly what is served.
        torch_dir = stage / TORCH_DIR
        torch_dir.mkdir()
        shutil.copyfile(ckpt.directory / ckpt.pae_file, torch_dir / PAE_FILE)
        for file in (DIT_EMA_FILE, LATENT_STATS_FILE):
            shutil.copyfile(ckpt.directory / file, torch_dir / file)
        write_json(torch_dir / CONFIG_FILE, preset_config(ckpt.preset))
        write_json(stage / CONFIG_NAME, _repository_config(ckpt, name, chosen, graphs))
        write_json(
            stage / MANIFEST_NAME,
            {
                "name": name,
                "version": chosen,
                "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
                "opset": opset,
                "software": software_versions(),
                "source_checkpoint": {
                    "path": str(ckpt.directory.resolve()),
                    "preset": ckpt.preset.name,
                    "pae_weights": ckpt.pae_file,
                    "sha256": ckpt.file_hashes,
                },
                "vfm": {"kind": ckpt.preset.pae.vfm.kind, "fingerprint": ckpt.pae.vfm.fingerprint()},
                "parity": {
                    "runtime": "onnxruntime CPUExecutionProvider",
                    "max_abs": "max |onnx - torch|",
                    "rel": "||onnx - torch||_2 / ||torch||_2",
                    "fp32": [r.to_dict() for r in results],
                    "fp16": [r.to_dict() for r in fp16_results] if fp16 else None,
                },
                "precision": {"onnx": ["fp32", "fp16"] if fp16 else ["fp32"]},
                "tensorrt": engines,
            },
        )
    return Path(repository) / name / str(chosen)
