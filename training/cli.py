"""`pae-train`: the training stages as sub-commands.

    pae-train STAGE --preset NAME --out DIR [--set section.key=value ...] [options]

STAGE is `refine`, `tokenizer`, `latents`, `generator`, `evaluate`, or `all` (every stage in order,
then the shipped checkpoint layout). Every stage reads and writes the one checkpoint directory DIR
(`config.json`, `*.safetensors`, `metrics.json`, TensorBoard logs in DIR/tb, resume state in
DIR/resume), resumes from its last checkpoint there, and is skipped when it already finished with the
same settings. Large regenerable data (VFM feature cache, refined targets, latent shards) goes under
`--cache` (default $PAE_CACHE_DIR or ~/.cache/pae).

`--set section.field=value` overrides a field, typed by its dataclass. The architecture sections are
`pae`, `dit`, `sampler` and `autoencoder` (`pae.latent_dim=8`, `dit.depth=4`, `sampler.steps=50`;
`autoencoder.kind=rae` or `vae` trains a comparison latent instead of PAE's); the training recipe's
are named after the stages that read them (`refine.depth=4`, `tokenizer.steps=200`,
`generator.lr=1e-4`, `evaluate.gen_num_samples=500`), plus `data.train_per_class` and the comparison
autoencoders' own terms (`rae.noise_tau`, `vae.kl_weight`). Inside a single stage its own section may
be omitted (`pae-train tokenizer … --set steps=200`).

Distributed: `torchrun --nproc_per_node=2 -m training.cli tokenizer ...` (DDP; gloo on CPU, NCCL on
CUDA; only rank 0 writes).
"""

from __future__ import annotations

import argparse
import sys

import torch

from model.presets import PRESETS
from training.distributed import cleanup, init_distributed
from training.stages.context import STAGES, resolve_context
from training.stages.overrides import parse_sets
from training.stages.pipeline import run_all, run_stage, summary

COMMANDS = (*STAGES, "all")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pae-train",
        description="Train PAE + LightningDiT stage by stage into one checkpoint directory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2] if __doc__ else None,
    )
    parser.add_argument("stage", choices=COMMANDS, help="stage to run ('all' runs every stage in order)")
    parser.add_argument(
        "--preset",
        required=True,
        choices=sorted(PRESETS),
        help="named preset (architecture: model/presets.py; recipe: training/recipes.py)",
    )
    parser.add_argument("--out", required=True, help="checkpoint directory (read and written by every stage)")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an architecture or recipe field, e.g. tokenizer.steps=200 (repeatable)",
    )
    parser.add_argument("--cache", default=None, help="directory for feature caches and latent shards")
    parser.add_argument("--dataset", default=None, help="replace the preset's dataset (same class count)")
    parser.add_argument(
        "--data-root", default=None, help="dataset location (default: the dataset's standard place)"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation, data order and noise")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per rank")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    parser.add_argument("--force", action="store_true", help="rerun the stage(s) from scratch even if done")
    parser.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="stop a training stage after this global step (checkpointed; a later run resumes it)",
    )
    parser.add_argument(
        "--keep-resume", action="store_true", help="'all': keep DIR/resume (optimiser state) at the end"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("pae-train: --threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.workers < 0:
        raise SystemExit("pae-train: --workers must be >= 0")
    try:
        sets = parse_sets(args.sets)
        env = init_distributed(args.device)
    except ValueError as exc:
        raise SystemExit(f"pae-train: {exc}") from None
    try:
        try:
            ctx = resolve_context(
                args.preset,
                args.out,
                sets,
                args.stage,
                env,
                cache=args.cache,
                seed=args.seed,
                force=args.force,
                num_workers=args.workers,
                data_root=args.data_root,
                dataset=args.dataset,
                stop_at=args.stop_at,
            )
        except ValueError as exc:
            raise SystemExit(f"pae-train: {exc}") from None
        if args.stage == "all":
            run_all(ctx, keep_resume=args.keep_resume)
        else:
            run_stage(ctx, args.stage)
        if env.is_main:
            print(summary(ctx))
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
