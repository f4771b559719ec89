"""TensorRT backend: serialized engines (`.plan`) built by export/ for this GPU architecture.

`tensorrt` is imported only when this runtime is chosen, with a clear error when it is absent.
Engines are not portable across GPU architectures or TensorRT versions, so the engine for the
running GPU is picked by compute capability and deserialisation failures are reported with the
versions involved. Buffers are torch CUDA tensors; a batch larger than an engine's optimisation
profile allows is run in profile-sized chunks.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from export.repository import ModelConfig, RepositoryError, verify_version
from model.sampling import SamplerConfig
from service.cancellation import PrunedGeneration
from service.runtimes.base import generate_images, warm_up
from service.runtimes.onnxruntime import ProviderUnavailable

GRAPHS: tuple[str, ...] = ("encoder", "decoder", "dit", "dit_cond")


def import_tensorrt() -> ModuleType:
    """The `tensorrt` module, or ProviderUnavailable saying how to get it."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise ProviderUnavailable(
            "RUNTIME=tensorrt needs the NVIDIA TensorRT Python package (pip install tensorrt, on a "
            f"machine with a CUDA GPU); it could not be imported: {exc}"
        ) from None


def gpu_arch(device: int = 0) -> str:
    """`sm<major><minor>` of the CUDA device, the key engines are stored under."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def plan_name(graph: str, arch: str) -> str:
    """File name of a graph's engine for one GPU architecture, e.g. `dit.sm90.plan`."""
    return f"{graph}.{arch}.plan"


class _Engine:
    """One deserialised engine with its execution context and I/O description."""

    def __init__(self, trt: ModuleType, runtime: object, path: Path) -> None:
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise RepositoryError(
                f"TensorRT {trt.__version__} could not deserialise {path}; engines only load on the GPU "
                "architecture and TensorRT version they were built with (see manifest.json)"
            )
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self.outputs) != 1:
            raise RepositoryError(f"{path} must have exactly one output, has {self.outputs}")
        self.dtypes = {n: _torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        self.ranks = {n: len(engine.get_tensor_shape(n)) for n in names}
        batched = [n for n in self.inputs if self.ranks[n] >= 1]
        self.max_batch = min(engine.get_tensor_profile_shape(n, 0)[2][0] for n in batched)

    def __call__(self, feeds: Mapping[str, torch.Tensor], stream: torch.cuda.Stream) -> torch.Tensor:
        batch = next(t.shape[0] for n, t in feeds.items() if self.ranks[n] >= 1)
        if batch > self.max_batch:
            parts = [
                self(
                    {n: (t[i : i + self.max_batch] if self.ranks[n] >= 1 else t) for n, t in feeds.items()},
                    stream,
                )
                for i in range(0, batch, self.max_batch)
            ]
            return torch.cat(parts)
        keep = []
        for name in self.inputs:
            tensor = feeds[name].to(device="cuda", dtype=self.dtypes[name]).contiguous()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        out_name = self.outputs[0]
        out = torch.empty(
            tuple(self.context.get_tensor_shape(out_name)), dtype=self.dtypes[out_name], device="cuda"
        )
        self.context.set_tensor_address(out_name, out.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {out_name} failed")
        stream.synchronize()
        return out


def _torch_dtype(trt: ModuleType, dtype: object) -> torch.dtype:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int64: torch.int64,
        trt.int32: torch.int32,
    }
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise RepositoryError(f"TensorRT tensor dtype {dtype} is not supported by this runtime")
    return table[dtype]


class TensorRTRuntime:
    """Runs the four engines on one CUDA device with the real TensorRT Python API."""

    def __init__(self, version_dir: Path, device: int = 0) -> None:
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise ProviderUnavailable("RUNTIME=tensorrt needs a CUDA GPU, and torch sees none")
        torch.cuda.set_device(device)
        self.version_dir = version_dir
        self.config = ModelConfig.load(version_dir)
        self.arch = gpu_arch(device)
        names = [plan_name(graph, self.arch) for graph in GRAPHS]
        missing = [n for n in names if not (version_dir / n).is_file()]
        if missing:
            raise RepositoryError(
                f"{version_dir} has no TensorRT engines for this GPU ({self.arch}): missing {missing}; "
                "build them with pae-export on a machine with this GPU"
            )
        verify_version(version_dir, names)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engines = {
            g: _Engine(trt, self._runtime, version_dir / n) for g, n in zip(GRAPHS, names, strict=True)
        }
        for graph, expected in (("dit", {"x", "t", "y", "cfg_scale"}), ("dit_cond", {"x", "t", "y"})):
            if set(self.engines[graph].inputs) != expected:
                raise RepositoryError(
                    f"{graph} engine inputs must be {sorted(expected)}, got {self.engines[graph].inputs}"
                )
        self.stream = torch.cuda.Stream()

    def _single(self, graph: str, x: torch.Tensor) -> torch.Tensor:
        engine = self.engines[graph]
        return engine({engine.inputs[0]: x}, self.stream).float()

    def encode(self, images: np.ndarray) -> np.ndarray:
        return self._single("encoder", torch.from_numpy(np.ascontiguousarray(images))).cpu().numpy()

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self._single("decoder", torch.from_numpy(np.ascontiguousarray(latents))).cpu().numpy()

    def _t(self, graph: str, x: torch.Tensor, t: float) -> torch.Tensor:
        shape = (x.shape[0],) if self.engines[graph].ranks["t"] == 1 else ()
        return torch.full(shape, t, dtype=torch.float32, device="cuda")

    def velocity(self, x: torch.Tensor, t: float, y: torch.Tensor) -> torch.Tensor:
        return self.engines["dit_cond"]({"x": x, "t": self._t("dit_cond", x, t), "y": y}, self.stream).float()

    def guided(self, x: torch.Tensor, t: float, y: torch.Tensor, scale: float) -> torch.Tensor:
        engine = self.engines["dit"]
        shape = (x.shape[0],) if engine.ranks["cfg_scale"] == 1 else ()
        scale_t = torch.full(shape, scale, dtype=torch.float32, device="cuda")
        feeds = {"x": x, "t": self._t("dit", x, t), "y": y, "cfg_scale": scale_t}
        return engine(feeds, self.stream).float()

    @staticmethod
    def asarray(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values)).to("cuda")

    def generate(
        self,
        labels: np.ndarray,
        seeds: np.ndarray,
        sampler: SamplerConfig,
        pruning: PrunedGeneration | None = None,
    ) -> np.ndarray:
        def decode(z: torch.Tensor) -> np.ndarray:
            return self._single("decoder", z).cpu().numpy()

        return generate_images(self.config, self, decode, labels, seeds, sampler, pruning)

    def warmup(self, max_batch: Mapping[str, int]) -> None:
        warm_up(self.config, max_batch, self.encode, self.decode, self)

    def info(self) -> dict[str, object]:
        return {
            "runtime": "tensorrt",
            "provider": "tensorrt",
            "gpu": torch.cuda.get_device_name(),
            "arch": self.arch,
            "tensorrt": self._trt.__version__,
            "model": self.config.name,
            "version": self.config.version,
        }
