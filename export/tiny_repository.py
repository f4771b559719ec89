"""A small random-weight model repository for tests and benchmarks.

    python -m export.tiny_repository DIR      # writes DIR/tiny/1/

Four small torch modules (convolutions, an embedding, a nonlinearity) with fixed, seeded weights,
exported with the dynamo ONNX exporter beside a config.json and manifest.json in the layout the
service reads. It stands in for a trained model wherever what is measured is the service's code path,
not the model: it exports in seconds, and its networks are real graphs run by the same code that
serves trained ones. The weights and inputs are seeded, so every build exports the same graphs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from export import repository

IMAGE_SIZE = 16
LATENT_SHAPE = (4, 4, 4)
LATENT_MEAN = [0.1, -0.1, 0.0, 0.05]
LATENT_STD = [1.0, 0.9, 1.1, 1.0]
CLASS_NAMES = ["circle", "square", "stripe"]
NULL_CLASS = len(CLASS_NAMES)


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, LATENT_SHAPE[0], 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = nn.functional.avg_pool2d(torch.tanh(self.conv(x * 2 - 1)), IMAGE_SIZE // LATENT_SHAPE[1])
        return z / torch.sqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-6)


class TinyDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(LATENT_SHAPE[0], 3, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        up = nn.functional.interpolate(z, scale_factor=IMAGE_SIZE // LATENT_SHAPE[1], mode="nearest")
        return torch.sigmoid(self.conv(up))


class TinyDiT(nn.Module):
    """v(x, t, y): a conv on x, a class embedding and a time ramp."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(LATENT_SHAPE[0], LATENT_SHAPE[0], 3, padding=1)
        self.emb = nn.Embedding(NULL_CLASS + 1, LATENT_SHAPE[0])

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cond = self.emb(y)[:, :, None, None] * (1 + t[:, None, None, None])
        return torch.tanh(self.conv(x)) + cond - 0.5 * x


class TinyGuided(nn.Module):
    """Both CFG halves in one call, as the exported `dit` graph must be."""

    def __init__(self, dit: TinyDiT) -> None:
        super().__init__()
        self.dit = dit

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: torch.Tensor
    ) -> torch.Tensor:
        v = self.dit(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL_CLASS)]))
        batch = x.shape[0]
        v_c, v_u = v[:batch], v[batch:]
        return v_u + cfg_scale[:, None, None, None] * (v_c - v_u)


def _export(module: nn.Module, args: tuple, names: list[str], path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    shapes = tuple({0: batch} for _ in names)
    torch.onnx.export(
        module.eval(), args, str(path), input_names=names, dynamic_shapes=shapes, dynamo=True, verbose=False
    )


def write_manifest(version_dir: Path) -> None:
    """(Re)seal a hand-made version: the manifest lists every file with its hash, as export writes it."""
    repository.write_manifest(version_dir, {"name": version_dir.parent.name})


def tiny_modules() -> tuple[TinyEncoder, TinyDecoder, TinyDiT]:
    """The three networks with fixed weights (seeded), in eval mode: the reference for parity tests."""
    torch.manual_seed(0)
    return TinyEncoder().eval(), TinyDecoder().eval(), TinyDiT().eval()


def build_tiny_repository(root: Path, name: str = "tiny", version: str = "1") -> Path:
    """Export the tiny graphs to `root/<name>/<version>/` and return that folder."""
    encoder, decoder, dit = tiny_modules()
    out = root / name / version
    out.mkdir(parents=True)
    b = 2
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(b, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    latent = torch.randn(b, *LATENT_SHAPE, generator=generator)
    t = torch.rand(b, generator=generator)
    y = torch.tensor([0, 1])
    with torch.no_grad():
        _export(encoder, (image,), ["images"], out / "encoder.onnx")
        _export(decoder, (latent,), ["latents"], out / "decoder.onnx")
        _export(
            TinyGuided(dit),
            (latent, t, y, torch.full((b,), 2.0)),
            ["x", "t", "y", "cfg_scale"],
            out / "dit.onnx",
        )
        _export(dit, (latent, t, y), ["x", "t", "y"], out / "dit_cond.onnx")
    config = {
        "name": name,
        "image_size": IMAGE_SIZE,
        "latent_shape": list(LATENT_SHAPE),
        "latent_mean": LATENT_MEAN,
        "latent_std": LATENT_STD,
        "class_names": CLASS_NAMES,
        "sampler": {
            "sampler": "euler",
            "steps": 4,
            "shift": 1.0,
            "cfg_scale": 2.0,
            "cfg_interval": [0.0, 1.0],
        },
    }
    repository.write_json(out / repository.CONFIG_NAME, config)
    write_manifest(out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m export.tiny_repository", description=__doc__.split("\n")[0]
    )
    parser.add_argument("root", type=Path, help="repository folder; the model goes to ROOT/tiny/1")
    args = parser.parse_args(argv)
    print(build_tiny_repository(args.root))


if __name__ == "__main__":
    main()
