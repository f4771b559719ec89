"""Two-process DDP (torchrun, gloo on CPU): tokenizer and generator training keep every rank's weights
equal.

The test launches this file under `torch.distributed.run`; as a script it runs refine → tokenizer →
latents → generator on a tiny config with both ranks training, and each rank writes a sha256 of its own
weights, EMA and optimiser state. Equal hashes mean DDP averaged the gradients every step (the ranks
see different batches, so without it they would diverge at the first step).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
# Every loss term on (GAN from step 1, D from step 0), two steps of each stage, global batch 4.
SETS = [
    "refine.steps=2",
    "refine.batch_size=8",
    "refine.depth=1",
    "tokenizer.steps=3",
    "tokenizer.batch_size=4",
    "tokenizer.warmup_steps=1",
    "tokenizer.gan_start_step=1",
    "tokenizer.disc_start_step=0",
    "generator.steps=3",
    "generator.batch_size=8",
    "generator.sample_every=100",
    "dit.depth=1",
]


def digest(state: object) -> str:
    """sha256 over the named tensors of module, EMA and optimiser state dicts (order-independent)."""
    h = hashlib.sha256()
    for prefix, tensors in state:
        for key in sorted(tensors):
            value = tensors[key]
            if isinstance(value, torch.Tensor):
                h.update(f"{prefix}.{key}".encode())
                h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _trainables_digest(trainables: object) -> str:
    from training.checkpoint import module_state, optimizer_to_flat

    parts = [(f"model.{n}", module_state(m)) for n, m in trainables.modules.items()]
    parts += [(f"ema.{n}", e.state_dict()) for n, e in trainables.emas.items()]
    parts += [(f"optim.{n}", optimizer_to_flat(o)[0]) for n, o in trainables.optimizers.items()]
    return digest(parts)


def worker(out: str, csv: str, cache: str) -> None:
    """One rank of the torchrun job (see module docstring)."""
    from training.distributed import cleanup, init_distributed
    from training.stages import generator, tokenizer
    from training.stages.context import resolve_context
    from training.stages.overrides import parse_sets
    from training.stages.pipeline import run_stage

    torch.set_num_threads(1)
    env = init_distributed("cpu")

    def ctx(stage: str):
        return resolve_context(
            "fmnist32-tiny", out, parse_sets(SETS), stage, env, cache=cache, dataset="mnist-5k", data_root=csv
        )

    hashes = {}
    run_stage(ctx("refine"), "refine")
    tok_ctx = ctx("tokenizer")
    record, trained = tokenizer.fit(tok_ctx)
    tok_ctx.mark_done("tokenizer", record)
    hashes["tokenizer"] = _trainables_digest(trained)
    hashes["tokenizer_world_size"] = record["world_size"]
    run_stage(ctx("latents"), "latents")
    record, trained = generator.fit(ctx("generator"))
    hashes["dit"] = _trainables_digest(trained)
    hashes["dit_world_size"] = record["world_size"]
    Path(out, f"hashes_rank{env.rank}.json").write_text(json.dumps(hashes))
    cleanup()


def test_two_rank_ddp_keeps_weights_identical(tmp_path: Path) -> None:
    from tests.training.test_stages import write_tiny_csv

    csv = write_tiny_csv(tmp_path / "tiny.csv.gz")
    out = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(Path(__file__).resolve()),
        str(out),
        str(csv),
        str(tmp_path / "cache"),
    ]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((out / f"hashes_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["tokenizer_world_size"] == 2 and ranks[0]["dit_world_size"] == 2
    assert ranks[0]["tokenizer"] == ranks[1]["tokenizer"], "tokenizer weights diverged across ranks"
    assert ranks[0]["dit"] == ranks[1]["dit"], "DiT weights diverged across ranks"
    assert (out / "pae_ema.safetensors").is_file() and (out / "dit_ema.safetensors").is_file()


def test_digest_sees_every_tensor() -> None:
    a = [("m", {"w": torch.zeros(2), "b": torch.ones(1)})]
    b = [("m", {"w": torch.zeros(2), "b": torch.ones(1) * 2})]
    assert digest(a) != digest(b) and digest(a) == digest([("m", {"b": torch.ones(1), "w": torch.zeros(2)})])


if __name__ == "__main__":
    worker(*sys.argv[1:4])
