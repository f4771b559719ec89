"""`pae-export`: turn a training checkpoint directory into a verified model-repository version.

There is deliberately no way to skip the parity gate: a version that was never compared with torch
must not reach the service.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from export.repository import read_manifest
from export.tensorrt import PRECISIONS, parse_batch_sizes


def _batch_sizes(text: str) -> list[int]:
    try:
        return parse_batch_sizes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _version(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"version must be a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pae-export",
        description="Export PAE + LightningDiT checkpoints to ONNX (and TensorRT) in a versioned model "
        "repository, after checking every graph against torch on real images.",
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="training checkpoint directory")
    parser.add_argument("--repository", type=Path, required=True, help="model repository root")
    parser.add_argument("--name", help="model name (default: the checkpoint's preset name)")
    parser.add_argument("--version", type=_version, help="integer version (default: latest + 1)")
    parser.add_argument(
        "--fp16",
        action="store_true",
        help="also write <graph>.fp16.onnx (fp16 weights/activations, for GPU EPs)",
    )
    parser.add_argument(
        "--tensorrt", action="store_true", help="also build TensorRT engines (needs TensorRT and a CUDA GPU)"
    )
    parser.add_argument(
        "--trt-precision", choices=PRECISIONS, default="fp16", help="TensorRT builder precision flag"
    )
    parser.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        default=[1, 8, 32],
        help="batch sizes to serve, comma-separated: the TensorRT min/opt/max profile (default 1,8,32)",
    )
    parser.add_argument(
        "--parity-batches",
        type=_batch_sizes,
        default=None,
        help="batch sizes the parity gate runs each graph at (default 1,3; 1,2 halves a full-size gate)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `pae-export`; prints the published folder and the parity summary as JSON."""
    args = build_parser().parse_args(argv)
    from export.exporter import export_checkpoint

    try:
        out = export_checkpoint(
            args.checkpoint,
            args.repository,
            name=args.name,
            version=args.version,
            fp16=args.fp16,
            tensorrt=args.tensorrt,
            batch_sizes=args.batch_sizes,
            trt_precision=args.trt_precision,
            **({"parity_batches": tuple(args.parity_batches)} if args.parity_batches else {}),
        )
    except Exception as exc:
        print(f"pae-export: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("pae-export: nothing was written to the repository", file=sys.stderr)
        return 1
    manifest = read_manifest(out)
    worst = {}
    for precision in ("fp32", "fp16"):
        for result in manifest["parity"][precision] or []:
            key = f"{result['graph']}:{precision}"
            worst[key] = max(worst.get(key, 0.0), result["rel"])
    print(json.dumps({"published": str(out), "worst_relative_error": worst}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
