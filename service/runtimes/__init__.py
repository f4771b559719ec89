"""Runtimes: one interface (`Runtime`), three backends, chosen by `RUNTIME`.

Each backend module is imported only when chosen, so a CPU image never needs TensorRT and the
ONNX Runtime backend never pays for building torch modules.
"""

from __future__ import annotations

from pathlib import Path

from service.runtimes.base import Runtime
from service.settings import Settings


def load_runtime(settings: Settings, version_dir: Path) -> Runtime:
    """Build the runtime named by `settings.runtime` on the model version in `version_dir`."""
    if settings.runtime == "onnxruntime":
        from service.runtimes.onnxruntime import OnnxRuntime

        return OnnxRuntime(
            version_dir,
            provider=settings.ort_provider,
            intra_op_threads=settings.ort_intra_op_threads,
            inter_op_threads=settings.ort_inter_op_threads,
        )
    if settings.runtime == "torch":
        from service.runtimes.torch import TorchRuntime

        return TorchRuntime(version_dir)
    if settings.runtime == "tensorrt":
        from service.runtimes.tensorrt import TensorRTRuntime

        return TensorRTRuntime(version_dir)
    raise ValueError(f"unknown runtime {settings.runtime!r}")


__all__ = ["Runtime", "load_runtime"]
