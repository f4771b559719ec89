"""`pae-import`: the authors' released checkpoints → a checkpoint directory `pae-export` takes.

    pae-import --pae ep-last.pt --dit 1000000.pt --latent-stats latents_stats.pt --out ckpt/
    pae-import --diffusers PAE-diffusers/ --latent-stats latents_stats.pt --out ckpt/
    pae-import --pae ep-last.pt --check          # read and check only, write nothing

Nothing pickled is ever run: `.pt` files are read for tensors only, and every refused object is named.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from export.importer.release import DIT_ENTRIES, PAE_ENTRIES, Inputs, import_release


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pae-import",
        description="Convert the authors' PAE tokenizer and LightningDiT checkpoints (or the diffusers "
        "port) into a checkpoint directory for pae-export, checking every tensor on the way.",
    )
    parser.add_argument("--pae", type=Path, help="PAE tokenizer checkpoint (.pt or .safetensors)")
    parser.add_argument("--dit", type=Path, help="LightningDiT checkpoint (.pt or .safetensors)")
    parser.add_argument("--latent-stats", type=Path, help="latents_stats.pt (per-channel mean and std)")
    parser.add_argument("--diffusers", type=Path, help="diffusers-port folder (vae/, transformer/)")
    parser.add_argument("--out", type=Path, help="new checkpoint directory to write")
    parser.add_argument("--check", action="store_true", help="read and check only; write nothing")
    parser.add_argument("--preset", help="paper preset (default: the one the tensors fit)")
    parser.add_argument(
        "--pae-weights",
        choices=sorted(PAE_ENTRIES),
        default="model",
        help="entry of the PAE .pt to read (default 'model', what the authors' tools use)",
    )
    parser.add_argument(
        "--dit-weights",
        choices=sorted(DIT_ENTRIES),
        default="ema",
        help="entry of the DiT .pt to read (default 'ema', falling back to the file's own dict)",
    )
    parser.add_argument(
        "--vfm-dir",
        type=Path,
        help="Hugging Face folder of the frozen encoder, when the PAE checkpoint lacks it",
    )
    parser.add_argument(
        "--sampler-preset",
        help="default sampler of the model (default release-800ep for a qk-norm DiT, else release-80ep)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `pae-import`; prints the import report as JSON."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check == (args.out is not None):
        parser.error("give exactly one of --out DIR and --check")
    inputs = Inputs(args.pae, args.dit, args.latent_stats, args.diffusers)
    try:
        report = import_release(
            None if args.check else args.out,
            inputs,
            preset=args.preset,
            pae_weights=args.pae_weights,
            dit_weights=args.dit_weights,
            vfm_dir=args.vfm_dir,
            sampler_preset=args.sampler_preset,
        )
    except Exception as exc:
        print(f"pae-import: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("pae-import: nothing was written", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
