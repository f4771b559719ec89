"""The TensorRT runtime: a clear error without TensorRT; on a GPU, parity with ONNX Runtime."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export.tiny_repository import write_manifest
from model.sampling import SamplerConfig
from service.runtimes.onnxruntime import OnnxRuntime, ProviderUnavailable
from service.runtimes.tensorrt import TensorRTRuntime, import_tensorrt

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_missing_tensorrt_is_a_clear_error(tiny_repository: Path) -> None:
    with pytest.raises(ProviderUnavailable, match="pip install tensorrt"):
        import_tensorrt()
    with pytest.raises(ProviderUnavailable, match="RUNTIME=tensorrt"):
        TensorRTRuntime(tiny_repository / "tiny" / "1")


@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_TRT and torch.cuda.is_available()), reason="needs TensorRT and a CUDA GPU")
def test_engines_match_onnxruntime(tiny_repository: Path, tmp_path: Path) -> None:
    from export.tensorrt import batch_range, build_engine

    version = tmp_path / "tiny" / "1"
    shutil.copytree(tiny_repository / "tiny" / "1", version)
    for graph in ("encoder", "decoder", "dit", "dit_cond"):
        build_engine(version / f"{graph}.onnx", version, graph, batch_range([1, 4, 8]), precision="fp32")
    write_manifest(version)
    trt_runtime = TensorRTRuntime(version)
    reference = OnnxRuntime(version)
    trt_runtime.warmup({"encode": 2, "decode": 2, "generate": 2})
    images = np.random.default_rng(0).random((11, 3, 16, 16), dtype=np.float32)  # > profile max: chunked
    assert np.abs(trt_runtime.encode(images) - reference.encode(images)).max() < 1e-3
    cfg = SamplerConfig(steps=4, cfg_scale=2.0, cfg_interval=(0.2, 1.0))
    labels, seeds = np.array([0, 1, 2]), np.array([5, 6, 7])
    got = trt_runtime.generate(labels, seeds, cfg)
    assert np.abs(got - reference.generate(labels, seeds, cfg)).max() < 1e-3
    assert trt_runtime.info()["runtime"] == "tensorrt"
