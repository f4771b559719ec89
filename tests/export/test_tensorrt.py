"""TensorRT: the pure-Python profile/shape logic, the missing-library error, and the builder's use of
the TensorRT API (against a recording stand-in for the library, since no machine here has TensorRT;
a `gpu`-marked test builds a real engine where TensorRT and a GPU exist)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

import export.tensorrt as trt_mod
from export.tensorrt import (
    BatchRange,
    InputSpec,
    TensorRTBuildError,
    TensorRTUnavailable,
    batch_range,
    build_engine,
    import_tensorrt,
    onnx_inputs,
    parse_batch_sizes,
    plan_name,
    profile_shapes,
    sm_arch,
)


def _dit_like_onnx(path: Path, batch_dim: str | int = "batch") -> Path:
    """A valid little graph with the dit I/O signature: v = x * cfg_scale (+ t and y consumed)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 4, 2, 2])
    t = helper.make_tensor_value_info("t", TensorProto.FLOAT, [batch_dim])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [batch_dim])
    w = helper.make_tensor_value_info("cfg_scale", TensorProto.FLOAT, [batch_dim])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [batch_dim, 4, 2, 2])
    shape = helper.make_tensor("shape", TensorProto.INT64, [4], [-1, 1, 1, 1])
    nodes = [
        helper.make_node("Reshape", ["cfg_scale", "shape"], ["w4"]),
        helper.make_node("Mul", ["x", "w4"], ["v"]),
    ]
    graph = helper.make_graph(nodes, "dit", [x, t, y, w], [v], initializer=[shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_batch_range_and_parsing() -> None:
    assert batch_range([32, 1, 8]) == BatchRange(1, 8, 32)
    assert batch_range([4]) == BatchRange(4, 4, 4)
    assert batch_range([1, 2, 4, 8]) == BatchRange(1, 4, 8)
    assert parse_batch_sizes("1,8,32") == [1, 8, 32]
    assert parse_batch_sizes(" 8, 1 ,8") == [1, 8]
    for bad in ("", "1,x", "0,4", "-1"):
        with pytest.raises(ValueError, match=r"comma-separated positive integers"):
            parse_batch_sizes(bad)
    with pytest.raises(ValueError, match=r"min <= opt <= max"):
        BatchRange(4, 2, 8)
    with pytest.raises(ValueError, match=r"must not be empty"):
        batch_range([])


def test_profile_shapes_from_onnx_inputs(tmp_path: Path) -> None:
    specs = onnx_inputs(_dit_like_onnx(tmp_path / "dit.onnx"))
    assert [s.name for s in specs] == ["x", "t", "y", "cfg_scale"]
    assert specs[0] == InputSpec("x", ("batch", 4, 2, 2), "float32") and specs[2].dtype == "int64"
    shapes = profile_shapes(specs, BatchRange(1, 8, 32))
    assert shapes["x"] == ((1, 4, 2, 2), (8, 4, 2, 2), (32, 4, 2, 2))
    assert shapes["t"] == shapes["y"] == shapes["cfg_scale"] == ((1,), (8,), (32,))


def test_profile_shapes_refuse_fixed_batch_and_symbolic_spatial_axes(tmp_path: Path) -> None:
    fixed = onnx_inputs(_dit_like_onnx(tmp_path / "fixed.onnx", batch_dim=2))
    with pytest.raises(ValueError, match=r"'x' has a fixed batch axis of 2"):
        profile_shapes(fixed, BatchRange(1, 1, 1))
    with pytest.raises(ValueError, match=r"symbolic axis 2 .* only batch may vary"):
        profile_shapes([InputSpec("images", ("b", 3, "h", 32), "float32")], BatchRange(1, 1, 1))
    with pytest.raises(ValueError, match=r"scalar"):
        profile_shapes([InputSpec("s", (), "float32")], BatchRange(1, 1, 1))


def test_engine_names_carry_the_sm_arch() -> None:
    assert sm_arch((9, 0)) == "sm90" and sm_arch((8, 6)) == "sm86"
    assert plan_name("dit_cond", (8, 9)) == "dit_cond.sm89.plan"


def test_missing_tensorrt_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(TensorRTUnavailable, match=r"TensorRT is not installed; .*without --tensorrt"):
        import_tensorrt()
    with pytest.raises(TensorRTUnavailable, match=r"TensorRT is not installed"):
        build_engine(_dit_like_onnx(tmp_path / "dit.onnx"), tmp_path, "dit", BatchRange(1, 8, 32))


class _Recorder:
    """Stand-in for the `tensorrt` module: records what the builder is asked to do."""

    def __init__(self, parse_ok: bool = True) -> None:
        self.calls: list[tuple] = []
        self.parse_ok = parse_ok

    def module(self) -> types.ModuleType:
        rec = self
        mod = types.ModuleType("tensorrt")
        mod.__version__ = "10.0.0-recorder"

        class Logger:
            WARNING = "warning"

            def __init__(self, level: str) -> None:
                rec.calls.append(("logger", level))

        class _Input:
            def __init__(self, name: str) -> None:
                self.name = name

        class Network:
            def __init__(self) -> None:
                self.inputs: list[_Input] = []

            @property
            def num_inputs(self) -> int:
                return len(self.inputs)

            def get_input(self, i: int) -> _Input:
                return self.inputs[i]

        class Parser:
            num_errors = 1

            def __init__(self, network: Network, logger: Logger) -> None:
                self.network = network

            def parse_from_file(self, path: str) -> bool:
                rec.calls.append(("parse", Path(path).name))
                self.network.inputs = [_Input(s.name) for s in onnx_inputs(Path(path))]
                return rec.parse_ok

            def get_error(self, i: int) -> str:
                return "unsupported operator Foo"

        class Profile:
            def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
                rec.calls.append(("set_shape", name, lo, opt, hi))

        class Config:
            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                rec.calls.append(("workspace", pool, size))

            def set_flag(self, flag: str) -> None:
                rec.calls.append(("flag", flag))

            def add_optimization_profile(self, profile: Profile) -> None:
                rec.calls.append(("add_profile",))

        class Builder:
            def __init__(self, logger: Logger) -> None:
                pass

            def create_network(self, flags: int) -> Network:
                rec.calls.append(("network_flags", flags))
                return Network()

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> bytes:
                rec.calls.append(("build",))
                return b"serialized-engine"

        mod.Logger = Logger
        mod.Builder = Builder
        mod.OnnxParser = Parser
        mod.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
        mod.BuilderFlag = types.SimpleNamespace(FP16="FP16", BF16="BF16")
        mod.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        return mod


def _fake_gpu() -> dict:
    return {"name": "Recorder GPU", "compute_capability": [9, 0]}


def test_builder_sets_a_profile_for_every_input_and_records_the_engine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    rec = _Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", rec.module())
    monkeypatch.setattr(trt_mod, "cuda_gpu", _fake_gpu)
    onnx_path = _dit_like_onnx(tmp_path / "dit.onnx")
    record = build_engine(onnx_path, tmp_path, "dit", BatchRange(1, 8, 32), precision="bf16")

    assert (tmp_path / "dit.sm90.plan").read_bytes() == b"serialized-engine"
    set_shapes = {c[1]: c[2:] for c in rec.calls if c[0] == "set_shape"}
    assert set_shapes == {
        "x": ((1, 4, 2, 2), (8, 4, 2, 2), (32, 4, 2, 2)),
        "t": ((1,), (8,), (32,)),
        "y": ((1,), (8,), (32,)),
        "cfg_scale": ((1,), (8,), (32,)),
    }
    assert ("flag", "BF16") in rec.calls and ("flag", "FP16") not in rec.calls
    assert ("network_flags", 1) in rec.calls  # explicit batch where the flag still exists
    assert rec.calls.index(("add_profile",)) < rec.calls.index(("build",))
    described = record.to_dict()
    assert described["file"] == "dit.sm90.plan" and described["compute_capability"] == [9, 0]
    assert described["gpu"] == "Recorder GPU" and described["tensorrt"] == "10.0.0-recorder"
    assert described["precision"] == "bf16" and described["profile"]["t"] == [[1], [8], [32]]


def test_builder_reports_parser_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", _Recorder(parse_ok=False).module())
    monkeypatch.setattr(trt_mod, "cuda_gpu", _fake_gpu)
    with pytest.raises(TensorRTBuildError, match=r"could not parse dit.onnx: unsupported operator Foo"):
        build_engine(_dit_like_onnx(tmp_path / "dit.onnx"), tmp_path, "dit", BatchRange(1, 8, 32))
    assert not list(tmp_path.glob("*.plan"))
    with pytest.raises(ValueError, match=r"precision must be one of"):
        build_engine(tmp_path / "dit.onnx", tmp_path, "dit", BatchRange(1, 1, 1), precision="int8")


@pytest.mark.gpu
def test_real_engine_builds_on_a_gpu(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    record = build_engine(_dit_like_onnx(tmp_path / "dit.onnx"), tmp_path, "dit", BatchRange(1, 8, 32))
    assert (tmp_path / record.file).stat().st_size > 0
    assert record.compute_capability == tuple(torch.cuda.get_device_capability())
