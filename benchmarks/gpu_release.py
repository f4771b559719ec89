"""GPU check of the released model at full size, in one time-boxed run (default budget 8 minutes).

    python -m benchmarks.gpu_release --work /tmp/gpu-release --out benchmarks/results/gpu_release.json
    python -m benchmarks.gpu_release --checkpoint CKPT --work /tmp/gpu-release   # an imported release

1. A checkpoint: the one given (e.g. `pae-import`'s output) or random weights in the paper preset
   with a random DINOv2-L folder (throughput does not depend on the values).
2. `export_checkpoint`: ONNX graphs (the DiT over 2 GiB goes to external data), parity at batch 1 on
   the CPU, and TensorRT engines (fp16, profile 1/8/32) when the `tensorrt` package imports.
3. Images/s of encode, decode and generate (the model's default sampler at 25 and 250 steps) at
   batch 1, 8 and 32 on: ONNX Runtime's CUDA execution provider, the TensorRT engines, and the torch
   PAE in bfloat16 (autocast, as the authors run it) for encode and decode.

Anything the machine lacks (CUDA, TensorRT) or the budget does not leave time for is recorded under
`skipped` with the reason; 250-step runs are estimated from the 25-step ones before they start. The
budget counts from the start, so a slow setup shortens the measurements; building the XL/1 engines
can take minutes on its own, and `--no-tensorrt` keeps a run well inside 8 minutes.
`--device cpu` runs the same code on the CPU (how the test suite keeps the script working).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import describe

ROOT = Path(__file__).resolve().parents[1]
# The random DINOv2-L with registers the paper preset expects (facebook/dinov2-with-registers-large).
DINOV2_L = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "mlp_ratio": 4}


class Clock:
    """The run's time budget."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget_s = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


def random_checkpoint(work: Path, preset_name: str) -> Path:
    """Random-weight checkpoint directory of `preset_name` with a random DINOv2-L folder."""
    import torch
    import transformers

    from model.checkpoint import write_checkpoint
    from model.lightningdit import LightningDiT
    from model.pae import PAE
    from model.presets import get_preset

    preset = get_preset(preset_name)
    vfm_dir = work / "dinov2-l"
    config = transformers.Dinov2WithRegistersConfig(
        **DINOV2_L, patch_size=14, image_size=518, num_register_tokens=4
    )
    transformers.Dinov2WithRegistersModel(config).save_pretrained(str(vfm_dir))
    vfm = dataclasses.replace(preset.pae.vfm, path=str(vfm_dir))
    preset = dataclasses.replace(preset, pae=dataclasses.replace(preset.pae, vfm=vfm))
    dit = LightningDiT(preset.dit)
    with torch.no_grad():  # adaLN-Zero would make every block the identity; give them work to do
        for block in dit.blocks:
            block.adaLN[-1].weight.normal_(0, 0.02)
    d = preset.pae.latent_dim
    return write_checkpoint(work / "checkpoint", preset, PAE(preset.pae), dit, torch.zeros(d), torch.ones(d))


def images_per_s(fn: Callable[[], object], batch: int, clock: Clock, min_reps: int = 2) -> dict[str, float]:
    """Median over timed runs after one warm-up (at least `min_reps`, up to 5 or ~10 s)."""
    fn()
    times: list[float] = []
    while len(times) < min_reps or (len(times) < 5 and sum(times) < 10 and clock.left() > 30):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    median = statistics.median(times)
    return {
        "images_per_s": round(batch / median, 3),
        "seconds_per_batch": round(median, 4),
        "runs": len(times),
    }


def measure(
    name: str, runtime: Any, batches: list[int], steps: list[int], clock: Clock, out: dict, skipped: list
) -> None:
    """encode / decode / generate images/s of one runtime at each batch size."""
    from model.sampling import SamplerConfig

    config = runtime.config
    size, latent = config.image_size, config.latent_shape
    base = SamplerConfig.from_dict(dict(config.sampler))
    rng = np.random.default_rng(0)
    results = out.setdefault(name, [])
    for batch in batches:
        images = rng.random((batch, 3, size, size), dtype=np.float32)
        latents = rng.standard_normal((batch, *latent), dtype=np.float32)
        for task, fn in (
            ("encode", lambda x=images: runtime.encode(x)),
            ("decode", lambda z=latents: runtime.decode(z)),
        ):
            if clock.left() < 20:
                skipped.append({"what": f"{name} {task} batch {batch}", "why": "time budget"})
                continue
            results.append({"task": task, "batch": batch, **images_per_s(fn, batch, clock)})
        per_step = None
        for n in sorted(steps):
            sampler = dataclasses.replace(base, steps=n)
            labels, seeds = np.arange(batch) % config.num_classes, np.arange(batch)
            estimate = per_step * n * 3 if per_step else 0.0  # warm-up + two timed runs
            if clock.left() < estimate + 20:
                skipped.append(
                    {
                        "what": f"{name} generate {n} steps batch {batch}",
                        "why": f"time budget (needs ~{estimate:.0f} s)",
                    }
                )
                continue
            row = images_per_s(
                lambda s=sampler, lb=labels, sd=seeds: runtime.generate(lb, sd, s), batch, clock
            )
            per_step = row["seconds_per_batch"] / n
            results.append(
                {"task": "generate", "steps": n, "sampler": sampler.to_dict(), "batch": batch, **row}
            )


class _Autocast:
    """The torch runtime's PAE under bfloat16 autocast (the DiT is not measured here)."""

    def __init__(self, runtime: Any, device: str) -> None:
        self.pae, self.config, self.device = runtime.pae, runtime.config, device

    def _run(self, fn: Callable[[Any], Any], array: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad(), torch.autocast(self.device, dtype=torch.bfloat16):
            out = fn(torch.from_numpy(array).to(self.device))
        return out.float().cpu().numpy()

    def encode(self, images: np.ndarray) -> np.ndarray:
        return self._run(self.pae.encode, images)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self._run(self.pae.decode, latents)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from export.exporter import export_checkpoint
    from export.tensorrt import TensorRTUnavailable, import_tensorrt

    clock = Clock(args.budget_s)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cuda = args.device == "cuda"
    gpu = torch.cuda.get_device_name(0) if cuda and torch.cuda.is_available() else None
    report: dict[str, Any] = {"machine": describe(gpu=gpu, device=args.device), "budget_s": args.budget_s}
    results: dict[str, list] = {}
    skipped: list[dict[str, str]] = []
    report["results"], report["skipped"], setup = results, skipped, {}
    report["setup_s"] = setup
    if cuda and gpu is None:
        raise SystemExit("--device cuda but torch sees no CUDA device")

    tick = time.perf_counter()
    checkpoint = args.checkpoint or random_checkpoint(work, args.preset)
    setup["checkpoint"] = round(time.perf_counter() - tick, 1)
    try:
        import_tensorrt()
        tensorrt = cuda and not args.no_tensorrt
    except TensorRTUnavailable as exc:
        tensorrt = False
        skipped.append({"what": "TensorRT engines", "why": str(exc)})
    tick = time.perf_counter()
    version = export_checkpoint(
        checkpoint,
        work / "repository",
        name="bench",
        tensorrt=tensorrt,
        batch_sizes=(1, 8, 32),
        parity_batches=(1,),
    )
    setup["export"] = round(time.perf_counter() - tick, 1)

    from service.runtimes.onnxruntime import OnnxRuntime, ProviderUnavailable

    for name, build in (
        (
            "onnxruntime-" + ("cuda" if cuda else "cpu"),
            lambda: OnnxRuntime(version, provider="cuda" if cuda else "cpu"),
        ),
        ("tensorrt-fp16", _tensorrt_runtime(version) if tensorrt else None),
    ):
        if build is None:
            continue
        try:
            tick = time.perf_counter()
            runtime = build()
            setup[f"load {name}"] = round(time.perf_counter() - tick, 1)
        except (ProviderUnavailable, RuntimeError) as exc:
            skipped.append({"what": name, "why": str(exc)})
            continue
        measure(name, runtime, args.batches, args.steps, clock, results, skipped)
        del runtime

    from service.runtimes.torch import TorchRuntime

    torch_runtime = _Autocast(TorchRuntime(version, device=args.device), args.device)
    measure("torch-pae-bf16", torch_runtime, args.batches, [], clock, results, skipped)
    report["left_s"] = round(clock.left(), 1)
    return report


def _tensorrt_runtime(version: Path) -> Callable[[], Any]:
    def build() -> Any:
        from service.runtimes.tensorrt import TensorRTRuntime

        return TensorRTRuntime(version)

    return build


def _sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_release", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (about 15 GB at full size)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_release.json")
    parser.add_argument(
        "--checkpoint", type=Path, help="checkpoint directory (default: random paper weights)"
    )
    parser.add_argument("--preset", default="imagenet256-dinov2l", help="preset of the random checkpoint")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--batches", type=_sizes, default=[1, 8, 32])
    parser.add_argument("--steps", type=_sizes, default=[25, 250])
    parser.add_argument("--budget-s", type=float, default=480.0, help="whole-run time budget")
    parser.add_argument("--no-tensorrt", action="store_true", help="skip building TensorRT engines")
    args = parser.parse_args(argv)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
