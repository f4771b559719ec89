"""ONNX Runtime backend: the four exported graphs of a model-repository version.

Providers are explicit and checked: if the requested execution provider is not active in the
session (a missing CUDA library makes ONNX Runtime fall back to CPU with only a log line), loading
fails instead of serving silently on the wrong device. Spinning thread pools are turned off
because ONNX Runtime's busy-waiting threads starve the API and Redis on a small machine
(measured: batch-1 eager latency rose from 17 ms to 335 ms beside a spinning session).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.repository import ModelConfig, RepositoryError, verify_version
from model.sampling import SamplerConfig
from service.cancellation import PrunedGeneration
from service.runtimes.base import generate_images, warm_up

log = logging.getLogger(__name__)

GRAPHS: tuple[str, ...] = ("encoder.onnx", "decoder.onnx", "dit.onnx", "dit_cond.onnx")
PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class ProviderUnavailable(RuntimeError):
    """The requested ONNX Runtime execution provider is not installed or did not activate."""


def session_options(intra_op_threads: int, inter_op_threads: int) -> ort.SessionOptions:
    """Full graph optimisation, bounded non-spinning thread pools, no per-shape memory patterns."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = inter_op_threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # Memory patterns are planned per input shape; with a dynamic batch they only add arena growth.
    opts.enable_mem_pattern = False
    return opts


def _provider_list(provider: str, cache_dir: Path) -> list[str | tuple[str, dict[str, str]]]:
    name = PROVIDERS[provider]
    if provider == "cpu":
        return [name]
    if provider == "cuda":
        return [(name, {"arena_extend_strategy": "kSameAsRequested"}), "CPUExecutionProvider"]
    options = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache_dir)}
    return [(name, options), ("CUDAExecutionProvider", {}), "CPUExecutionProvider"]


class OnnxRuntime:
    """Runs `encoder`, `decoder`, `dit` (guided) and `dit_cond` with one execution provider."""

    def __init__(
        self,
        version_dir: Path,
        provider: str = "cpu",
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
    ) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"ORT provider must be one of {sorted(PROVIDERS)}, got {provider!r}")
        wanted = PROVIDERS[provider]
        available = ort.get_available_providers()
        if wanted not in available:
            raise ProviderUnavailable(
                f"ONNX Runtime provider {wanted} (ORT_PROVIDER={provider}) is not available in this "
                f"onnxruntime build ({ort.__version__}); available: {', '.join(available)}"
            )
        self.version_dir = version_dir
        self.provider = provider
        self.config = ModelConfig.load(version_dir)
        verify_version(version_dir, GRAPHS)  # with each graph's external-data files
        opts = session_options(intra_op_threads, inter_op_threads)
        cache_dir = (
            Path(tempfile.gettempdir()) / "pae-ort-trt-cache" / f"{self.config.name}-{self.config.version}"
        )
        providers = _provider_list(provider, cache_dir)
        self.sessions: dict[str, ort.InferenceSession] = {}
        for graph in GRAPHS:
            try:
                sess = ort.InferenceSession(str(version_dir / graph), sess_options=opts, providers=providers)
            except Exception as exc:
                raise RepositoryError(f"ONNX Runtime could not load {version_dir / graph}: {exc}") from exc
            active = sess.get_providers()
            if not active or active[0] != wanted:
                raise ProviderUnavailable(
                    f"{graph}: requested {wanted} but the session runs on {active}; refusing to fall back"
                )
            self.sessions[graph.removesuffix(".onnx")] = sess
        self._io = {name: self._names(name) for name in self.sessions}
        self._scale_rank = self._rank("dit", "cfg_scale")
        self._t_rank = self._rank("dit_cond", "t")

    def _names(self, graph: str) -> list[str]:
        sess = self.sessions[graph]
        names = [i.name for i in sess.get_inputs()]
        expected = {"dit": {"x", "t", "y", "cfg_scale"}, "dit_cond": {"x", "t", "y"}}.get(graph)
        if expected is None:
            if len(names) != 1 or len(sess.get_outputs()) != 1:
                raise RepositoryError(
                    f"{graph}.onnx must have one input and one output, has inputs {names} and "
                    f"outputs {[o.name for o in sess.get_outputs()]}"
                )
        elif set(names) != expected:
            raise RepositoryError(f"{graph}.onnx inputs must be {sorted(expected)}, got {names}")
        return names

    def _rank(self, graph: str, name: str) -> int:
        for inp in self.sessions[graph].get_inputs():
            if inp.name == name:
                return len(inp.shape)
        raise RepositoryError(f"{graph}.onnx has no input {name!r}")

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.sessions[graph].run(None, feeds)[0]

    def encode(self, images: np.ndarray) -> np.ndarray:
        return self._run("encoder", {self._io["encoder"][0]: np.ascontiguousarray(images, dtype=np.float32)})

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self._run("decoder", {self._io["decoder"][0]: np.ascontiguousarray(latents, dtype=np.float32)})

    def _t(self, batch: int, t: float) -> np.ndarray:
        return np.full((batch,) if self._t_rank == 1 else (), t, dtype=np.float32)

    def velocity(self, x: np.ndarray, t: float, y: np.ndarray) -> np.ndarray:
        return self._run("dit_cond", {"x": x, "t": self._t(x.shape[0], t), "y": y})

    def guided(self, x: np.ndarray, t: float, y: np.ndarray, scale: float) -> np.ndarray:
        batch = x.shape[0]
        scale_np = np.full((batch,) if self._scale_rank == 1 else (), scale, dtype=np.float32)
        return self._run("dit", {"x": x, "t": self._t(batch, t), "y": y, "cfg_scale": scale_np})

    @staticmethod
    def asarray(values: np.ndarray) -> np.ndarray:
        return values

    def generate(
        self,
        labels: np.ndarray,
        seeds: np.ndarray,
        sampler: SamplerConfig,
        pruning: PrunedGeneration | None = None,
    ) -> np.ndarray:
        return generate_images(self.config, self, self.decode, labels, seeds, sampler, pruning)

    def warmup(self, max_batch: Mapping[str, int]) -> None:
        warm_up(self.config, max_batch, self.encode, self.decode, self)

    def info(self) -> dict[str, object]:
        return {
            "runtime": "onnxruntime",
            "provider": self.provider,
            "execution_providers": self.sessions["decoder"].get_providers(),
            "onnxruntime": ort.__version__,
            "model": self.config.name,
            "version": self.config.version,
        }
