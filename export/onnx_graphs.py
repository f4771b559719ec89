"""The four served graphs as small wrapper modules, and their export to ONNX with a dynamic batch axis.

- `encoder`: image in [0, 1] (B×3×H×W) → sphere latent (B×d×h×w). The frozen VFM is inside the
  graph: resize, normalise, VFM, DAM, projector and sphere norm all run in one call.
- `decoder`: sphere latent → image, clamped to [0, 1] in the graph because it serves pixels.
- `dit`: guided velocity v_u + w·(v_c − v_u) from inputs `x, t, y, cfg_scale` (all batch-leading);
  the conditional and unconditional halves run as ONE batched call on the doubled batch.
- `dit_cond`: the conditional velocity alone (`x, t, y`), used outside the CFG interval.

The sampling loop stays outside the graphs so steps, shift and the CFG interval remain request
parameters. Export goes through `torch.export` first so a shape guard that would pin the batch size
raises instead of silently producing a fixed-batch graph, and every graph is checked afterwards
(`onnx.checker`, a symbolic leading axis on every input and output).

fp16 variants (`to_fp16`) are converted at the ONNX level with float32 inputs and outputs kept, so
every runtime feeds the same arrays; converting the graph rather than the torch model also covers
modules that keep parts in fp32 on purpose (RMS norms, sphere norm). They are meant for GPU
execution providers; they also run on the CPU EP (slowly), which is how the parity gate checks them
on machines without a GPU.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DEFAULT_OPSET = 18
MAX_BATCH = 4096


class ExportError(RuntimeError):
    """A graph could not be exported with the required properties (valid ONNX, dynamic batch)."""


@dataclass(frozen=True)
class GraphSpec:
    """Names of a graph's inputs and outputs, in call order, as runtimes address them."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


GRAPHS: dict[str, GraphSpec] = {
    "encoder": GraphSpec("encoder", ("images",), ("latents",)),
    "decoder": GraphSpec("decoder", ("latents",), ("images",)),
    "dit": GraphSpec("dit", ("x", "t", "y", "cfg_scale"), ("v",)),
    "dit_cond": GraphSpec("dit_cond", ("x", "t", "y"), ("v",)),
}


class EncoderGraph(nn.Module):
    """images (B×3×H×W, [0, 1]) → sphere latents (B×d×h×w), VFM included."""

    def __init__(self, pae: nn.Module) -> None:
        super().__init__()
        self.pae = pae

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pae.encode(images)


class DecoderGraph(nn.Module):
    """sphere latents → images clamped to [0, 1] (the torch decoder is unclamped for training)."""

    def __init__(self, pae: nn.Module) -> None:
        super().__init__()
        self.pae = pae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pae.decode(latents).clamp(0.0, 1.0)


class GuidedDiTGraph(nn.Module):
    """x, t, y, cfg_scale (each batch-leading) → v_u + cfg_scale·(v_c − v_u), one call on 2B.

    The halves are split by explicit slicing at the runtime batch size: `chunk(2)` makes the exporter
    emit a guard that pins the batch, which would silently defeat the dynamic axis.
    """

    def __init__(self, dit: nn.Module, null_class: int) -> None:
        super().__init__()
        self.dit = dit
        self.null_class = null_class

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: torch.Tensor
    ) -> torch.Tensor:
        n = x.shape[0]
        v = self.dit(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.null_class)])
        )
        v_c, v_u = v[:n], v[n:]
        return v_u + cfg_scale.reshape(-1, 1, 1, 1) * (v_c - v_u)


class CondDiTGraph(nn.Module):
    """x, t, y → the conditional velocity (no unconditional half)."""

    def __init__(self, dit: nn.Module) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.dit(x, t, y)


def export_onnx(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    spec: GraphSpec,
    path: Path,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
) -> dict:
    """Export `module` to `path` with a dynamic leading batch axis on every input; check and describe it.

    `example_inputs` should have batch ≥ 2 (a size-1 example invites the tracer to specialise).
    Weights go to `<file>.data` beside the graph when `external_data` is True, or when None and they
    exceed torch's 1.5 GiB threshold (protobuf cannot hold a graph over 2 GiB).
    Returns the graph's I/O description for config.json and the manifest.
    """
    if len(example_inputs) != len(spec.inputs):
        raise ExportError(f"{spec.name}: {len(example_inputs)} example inputs for inputs {spec.inputs}")
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    dynamic = tuple({0: batch} for _ in example_inputs)
    module = module.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(module, example_inputs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        raise ExportError(
            f"{spec.name}: torch.export could not trace with a dynamic batch axis: {exc}"
        ) from exc
    onnx_program = torch.onnx.export(
        program,
        example_inputs,
        input_names=list(spec.inputs),
        output_names=list(spec.outputs),
        opset_version=opset,
        dynamo=True,
        verbose=False,
    )
    path = Path(path)
    onnx_program.save(str(path), external_data=external_data)
    return validate_graph(path, spec)


def validate_graph(path: Path, spec: GraphSpec) -> dict:
    """`onnx.checker` plus the serving contract: named I/O in order, symbolic batch everywhere."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path.name} fails onnx.checker: {exc}") from exc
    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    described: dict[str, list] = {"inputs": [], "outputs": []}
    for kind, values, names in (
        ("inputs", inputs, spec.inputs),
        ("outputs", model.graph.output, spec.outputs),
    ):
        actual = tuple(v.name for v in values)
        if actual != names:
            raise ExportError(f"{path.name}: {kind} are {actual}, expected {names}")
        for value in values:
            tensor = value.type.tensor_type
            dims = [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in tensor.shape.dim]
            if not dims or not isinstance(dims[0], str):
                raise ExportError(
                    f"{path.name}: {kind[:-1]} {value.name!r} has shape {dims}; its batch axis is not dynamic"
                )
            described[kind].append(
                {
                    "name": value.name,
                    "shape": ["batch", *dims[1:]],
                    "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                }
            )
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    described["opset"] = opsets.get("ai.onnx")
    external = sorted(
        {
            entry.value
            for tensor in model.graph.initializer
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data
            if entry.key == "location"
        }
    )
    if external:
        described["external_data"] = external  # weights of a graph over protobuf's 2 GiB limit
    return described


def to_fp16(src: Path, dst: Path) -> None:
    """Write a float16 copy of the ONNX graph at `src` to `dst`, float32 inputs and outputs kept.

    Constants beyond the fp16 range are clipped by the converter; the parity gate (with its fp16
    tolerances) decides whether the result is still faithful.
    """
    import onnx
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        # One warning per clipped constant (e.g. 1e-10 → 1e-7); expected, and judged by parity instead.
        warnings.simplefilter("ignore", UserWarning)
        # From the path: shape inference on an in-memory model cannot serialise one over 2 GiB.
        half = float16.convert_float_to_float16_model_path(str(src), keep_io_types=True)
    try:
        large = half.ByteSize() >= 2**31  # protobuf cannot serialise a single message past 2 GiB
    except ValueError:
        large = True
    onnx.save(half, str(dst), save_as_external_data=large, location=f"{Path(dst).name}.data")
