"""TensorRT engines built from the exported ONNX graphs, one per graph and GPU architecture.

An engine is compiled for one GPU architecture and one TensorRT version, so the file name carries
the SM architecture (`dit.sm90.plan`) and the manifest records the GPU, compute capability,
TensorRT version and precision. Dynamic batch needs an optimisation profile with min/opt/max shapes
for every input; that shape logic is plain Python (tested without TensorRT). `tensorrt` itself is
imported only when an engine is actually built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from model.validation import positive_ints

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
DEFAULT_WORKSPACE_BYTES = 4 << 30


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or a CUDA GPU for it) is not present on this machine."""


class TensorRTBuildError(RuntimeError):
    """TensorRT could not parse a graph or build an engine from it."""


@dataclass(frozen=True)
class BatchRange:
    """The batch sizes an engine accepts (`min`..`max`) and the one it is tuned for (`opt`)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        positive_ints(self, "min", "opt", "max")
        if not self.min <= self.opt <= self.max:
            raise ValueError(
                f"need min <= opt <= max for a batch range, got {self.min}, {self.opt}, {self.max}"
            )


def batch_range(batch_sizes: Sequence[int]) -> BatchRange:
    """Profile range covering the batch sizes the service will serve, tuned for the middle one.

    `[1, 8, 32]` → min 1, opt 8, max 32. The middle size is the compromise: TensorRT picks kernels
    for `opt`, and the smallest and largest are served correctly but not tuned for.
    """
    sizes = sorted(set(batch_sizes))
    if not sizes:
        raise ValueError("batch sizes must not be empty")
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"batch sizes must be positive ints, got {size!r}")
    return BatchRange(min=sizes[0], opt=sizes[len(sizes) // 2], max=sizes[-1])


def parse_batch_sizes(text: str) -> list[int]:
    """`"1,8,32"` → `[1, 8, 32]`, with a clear error for anything else."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ValueError(f"batch sizes must be comma-separated positive integers, got {text!r}") from exc
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"batch sizes must be comma-separated positive integers, got {text!r}")
    return sorted(set(sizes))


@dataclass(frozen=True)
class InputSpec:
    """An ONNX graph input: name, dims (an int when fixed, a string or None when symbolic), dtype."""

    name: str
    dims: tuple[int | str | None, ...]
    dtype: str


def onnx_inputs(path: Path) -> list[InputSpec]:
    """Inputs of an ONNX file, read without loading its weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims: list[int | str | None] = []
        for dim in tensor.shape.dim:
            if dim.HasField("dim_value"):
                dims.append(int(dim.dim_value))
            elif dim.HasField("dim_param"):
                dims.append(dim.dim_param)
            else:
                dims.append(None)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        specs.append(InputSpec(value.name, tuple(dims), dtype))
    return specs


Shape = tuple[int, ...]


def profile_shapes(inputs: Sequence[InputSpec], batch: BatchRange) -> dict[str, tuple[Shape, Shape, Shape]]:
    """`{input: (min_shape, opt_shape, max_shape)}` for one optimisation profile.

    Every input must have a symbolic leading (batch) axis and fixed other axes: the graphs here vary
    only in batch, and a symbolic non-batch axis would need a range this function cannot guess.
    """
    if not inputs:
        raise ValueError("a graph without inputs cannot have an optimisation profile")
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
    for spec in inputs:
        if not spec.dims:
            raise ValueError(f"input {spec.name!r} is a scalar; every input needs a leading batch axis")
        if isinstance(spec.dims[0], int):
            raise ValueError(
                f"input {spec.name!r} has a fixed batch axis of {spec.dims[0]}; export with a dynamic batch"
            )
        rest = spec.dims[1:]
        for axis, dim in enumerate(rest, start=1):
            if not isinstance(dim, int):
                raise ValueError(
                    f"input {spec.name!r} has a symbolic axis {axis} ({dim!r}); only batch may vary"
                )
        shapes[spec.name] = tuple((b, *rest) for b in (batch.min, batch.opt, batch.max))  # type: ignore[assignment]
    return shapes


def sm_arch(compute_capability: tuple[int, int]) -> str:
    """(9, 0) → `sm90`: the architecture tag in engine file names."""
    major, minor = compute_capability
    return f"sm{major}{minor}"


def plan_name(graph: str, compute_capability: tuple[int, int]) -> str:
    """`<graph>.<sm_arch>.plan`, e.g. `dit.sm90.plan`."""
    return f"{graph}.{sm_arch(compute_capability)}.plan"


def import_tensorrt():
    """The `tensorrt` module, or TensorRTUnavailable saying how to get it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(
            "TensorRT is not installed; building engines needs NVIDIA's `tensorrt` Python package with "
            "its libraries on a CUDA machine (the PyPI stubs cannot fetch them offline). "
            "Export without --tensorrt to get the ONNX graphs only."
        ) from exc
    return tensorrt


def cuda_gpu() -> dict[str, object]:
    """Name and compute capability of the current CUDA device, or TensorRTUnavailable."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT engines are built on a CUDA GPU, and none is visible to torch")
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "compute_capability": [major, minor]}


@dataclass(frozen=True)
class EngineRecord:
    """What the manifest records about one engine."""

    graph: str
    file: str
    gpu: str
    compute_capability: tuple[int, int]
    tensorrt: str
    precision: str
    batch: BatchRange
    profile: dict[str, tuple[Shape, Shape, Shape]]

    def to_dict(self) -> dict:
        record = asdict(self)
        record["compute_capability"] = list(self.compute_capability)
        record["profile"] = {k: [list(s) for s in v] for k, v in self.profile.items()}
        return record


def build_engine(
    onnx_path: Path,
    out_dir: Path,
    graph: str,
    batch: BatchRange,
    precision: str = "fp16",
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> EngineRecord:
    """Parse `onnx_path`, build a serialized engine with one min/opt/max profile, write `<graph>.<sm>.plan`.

    `precision` `fp16`/`bf16` allows TensorRT to pick reduced-precision kernels where it judges them
    accurate enough (layers it cannot run that way stay fp32).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trt = import_tensorrt()
    gpu = cuda_gpu()
    capability = tuple(gpu["compute_capability"])  # type: ignore[arg-type]
    shapes = profile_shapes(onnx_inputs(onnx_path), batch)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    if explicit is not None:  # TensorRT < 10 needs it; 10+ is always explicit-batch
        flags |= 1 << int(explicit)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        problems = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"TensorRT could not parse {onnx_path.name}: {problems}")

    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if network_inputs != set(shapes):
        raise TensorRTBuildError(
            f"{onnx_path.name}: TensorRT sees inputs {sorted(network_inputs)}, ONNX declares {sorted(shapes)}"
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(
            f"TensorRT failed to build an engine for {onnx_path.name} (see its log above)"
        )
    file = plan_name(graph, capability)  # type: ignore[arg-type]
    (Path(out_dir) / file).write_bytes(bytes(serialized))
    return EngineRecord(
        graph=graph,
        file=file,
        gpu=str(gpu["name"]),
        compute_capability=capability,  # type: ignore[arg-type]
        tensorrt=str(trt.__version__),
        precision=precision,
        batch=batch,
        profile=shapes,
    )
