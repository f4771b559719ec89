"""What every training stage shares: the run context (device, ranks, progress bar, TensorBoard),
seeding, the batch loader, and one shape from start to record — `begin_training` (run, random
stream, resume) and `train_and_record` (loop → save → metrics → record).

The step loop is deliberately dumb: the stage's `step_fn` does one optimiser step (pulling as many
micro-batches as it accumulates), and the loop only counts, logs, and saves. Exact resume follows
from three facts: the batch order is a pure function of (seed, position) (`ShardedBatches`), every
rank's RNG is saved and restored, and the LR schedule is a pure function of the step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from training.checkpoint import load_resume, resume_step, rng_state_tensors, save_resume
from training.distributed import BatchOrder, DistEnv, ShardedBatches, barrier, gather_equal, mean_across_ranks
from training.optim import EMA
from training.stages.context import StageContext


@dataclass
class StageRun:
    """One stage's run: where it writes, which rank this is, and its logging sinks (rank 0 only)."""

    name: str
    out: Path
    env: DistEnv
    writer: SummaryWriter | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(self.out / "tb" / self.name))
        barrier(self.env)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """TensorBoard scalars under `<stage>/<name>` (rank 0)."""
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{self.name}/{key}", float(value), step)

    def progress(self, total: int, initial: int = 0, unit: str = "step") -> tqdm:
        return tqdm(
            total=total,
            initial=initial,
            desc=self.name,
            unit=unit,
            disable=not self.env.is_main,
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def autocast(self, enabled: bool) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA when `enabled`; a no-op on CPU (CPU bf16 is slower and less exact)."""
        if enabled and self.env.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


def seed_init(seed: int) -> None:
    """Same seed on every rank before building models, so their initial weights agree."""
    torch.manual_seed(seed)


def seed_stream(seed: int, env: DistEnv) -> None:
    """A distinct random stream per rank for the training noise (timesteps, dropout, perturbations)."""
    torch.manual_seed(seed * 7919 + 104729 * (env.rank + 1))


def micro_batch(global_batch: int, env: DistEnv, accum: int, what: str) -> int:
    """Per-rank micro-batch of a global batch; it must split evenly."""
    per = global_batch // (env.world_size * accum)
    if per < 1 or per * env.world_size * accum != global_batch:
        raise ValueError(
            f"{what}.batch_size {global_batch} must be a multiple of world size {env.world_size} × "
            f"grad_accum {accum}"
        )
    return per


def grad_sync(module: nn.Module, env: DistEnv, k: int, accum: int) -> contextlib.AbstractContextManager:
    """DDP's `no_sync` for micro-batch `k` of `accum` unless it is the last, so a step all-reduces its
    gradients once."""
    return module.no_sync() if (env.distributed and k < accum - 1) else contextlib.nullcontext()


class IndexedImages(Dataset):
    """`(image, label, index, flip)` for `(index, flip)` keys: the flip is applied here, and the index
    and flip travel with the batch so cached per-image tensors (features, targets) can be looked up."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[torch.Tensor, int, int, bool]:
        index, flip = key
        image, label = self.base[index]
        if flip:
            image = torch.flip(image, dims=(-1,))
        return image, label, index, flip


def image_batches(
    dataset: Dataset, batches: ShardedBatches, start: int, num_workers: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless `(images, labels, indices, flips)` batches from batch position `start`.

    The loader gets its own generator so creating it never consumes the global RNG (which would
    make a resumed run drift from an uninterrupted one).
    """
    loader = DataLoader(
        IndexedImages(dataset),
        batch_sampler=BatchOrder(batches, start),
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )
    yield from loader


@dataclass
class Trainables:
    """Everything a stage checkpoints besides the step: named modules, optimisers, schedules, EMAs."""

    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = field(default_factory=dict)
    emas: dict[str, EMA] = field(default_factory=dict)


def save_state(run: StageRun, step: int, state: Trainables, extra: Mapping[str, Any] | None = None) -> None:
    """Collective: gather every rank's RNG, then rank 0 writes `resume/<stage>/`."""
    rng = rng_state_tensors()
    gathered: list[dict[str, torch.Tensor]] = [{} for _ in range(run.env.world_size)]
    for key in sorted(rng):
        for rank, value in enumerate(gather_equal(rng[key], run.env)):
            gathered[rank][key] = value
    if run.env.is_main:
        save_resume(
            run.out,
            run.name,
            step,
            state.modules,
            state.optimizers,
            state.schedulers,
            state.emas,
            rng_by_rank=gathered,
            extra=extra,
        )
    barrier(run.env)


def restore_state(run: StageRun, state: Trainables) -> tuple[int, dict[str, Any]]:
    """Load `resume/<stage>/` when present (every rank reads it); `(0, {})` for a fresh start."""
    if resume_step(run.out, run.name) is None:
        return 0, {}
    return load_resume(
        run.out,
        run.name,
        state.modules,
        state.optimizers,
        state.schedulers,
        state.emas,
        rank=run.env.rank,
        world_size=run.env.world_size,
    )


def train_loop(
    run: StageRun,
    state: Trainables,
    total_steps: int,
    step_fn: Callable[[int], Mapping[str, torch.Tensor]],
    log_every: int,
    save_every: int,
    start_step: int = 0,
    extra: Callable[[int], Mapping[str, Any]] | None = None,
    on_step_end: Callable[[int], None] | None = None,
    stop_at: int | None = None,
) -> dict[str, float]:
    """Run `step_fn(step)` for steps `start_step … total_steps − 1`, logging and checkpointing.

    `step_fn` returns detached scalar tensors; at log steps they are averaged over ranks and written
    to TensorBoard and the progress bar. A resumable checkpoint is written every `save_every` steps,
    at the end, and at `stop_at` (a session limit: the run stops there, to be resumed later).
    Returns the last logged scalars, `wall_s` (seconds this call trained) and `step` (where it stopped).
    """
    if log_every < 1 or save_every < 1:
        raise ValueError(f"log_every and save_every must be >= 1, got {log_every}, {save_every}")
    end = total_steps if stop_at is None else max(start_step, min(stop_at, total_steps))
    last: dict[str, float] = {}
    started = time.perf_counter()
    bar = run.progress(total_steps, initial=start_step)
    try:
        for step in range(start_step, end):
            values = step_fn(step)
            done = step + 1
            if done % log_every == 0 or done == total_steps:
                keys = sorted(values)
                if keys:
                    stacked = torch.stack([values[k].detach().float().reshape(()).cpu() for k in keys])
                    averaged = mean_across_ranks(stacked, run.env)
                    last = {k: float(v) for k, v in zip(keys, averaged, strict=True)}
                for group in state.optimizers.values():
                    last[f"lr_{_opt_name(state, group)}"] = group.param_groups[0]["lr"]
                run.scalars(done, last)
                bar.set_postfix(
                    {k: f"{v:.4g}" for k, v in last.items() if not k.startswith("lr_")}, refresh=False
                )
            bar.update(1)
            if on_step_end is not None:
                on_step_end(done)
            if done % save_every == 0 or done == end:
                save_state(run, done, state, extra(done) if extra else None)
    finally:
        bar.close()
    last["wall_s"] = time.perf_counter() - started
    last["step"] = float(end)
    return last


def _opt_name(state: Trainables, optimizer: torch.optim.Optimizer) -> str:
    for name, opt in state.optimizers.items():
        if opt is optimizer:
            return name
    return "opt"


def train_summary(last: Mapping[str, float]) -> dict[str, float]:
    """The last logged losses and the training seconds, for metrics.json (no LRs, no step)."""
    return {k: v for k, v in last.items() if not k.startswith("lr_") and k != "step"}


def begin_training(ctx: StageContext, name: str, state: Trainables) -> tuple[StageRun, int]:
    """Open stage `name`'s run, start this rank's training random stream, and restore the resume state
    when there is one; returns the run and the step to continue from.

    Call it once every module is built: the stream is (re)seeded here, so building never shifts it.
    """
    stage_run = StageRun(name, ctx.out, ctx.env)
    seed_stream(ctx.seed, ctx.env)
    start, _ = restore_state(stage_run, state)
    return stage_run, start


def train_and_record(
    ctx: StageContext,
    stage_run: StageRun,
    state: Trainables,
    step_fn: Callable[[int], Mapping[str, torch.Tensor]],
    *,
    steps: int,
    log_every: int,
    ckpt_every: int,
    start_step: int,
    save: Callable[[], None],
    outputs: Callable[[], dict[str, Any]] | None = None,
    on_step_end: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The ending every training stage shares: the loop, then the stage's files, metrics and record.

    The loop runs to `steps` (or pauses at `--stop-at`, returning `{"finished": False, "step": …}` for
    a later run to resume). A finished run calls `save` on rank 0 (the stage's weights), then
    `outputs` on every rank (what the record names besides the counts: hashes, cache directories),
    and merges the last logged losses into metrics.json under `train.<stage>`.
    """
    try:
        last = train_loop(
            stage_run,
            state,
            steps,
            step_fn,
            log_every,
            ckpt_every,
            start_step=start_step,
            on_step_end=on_step_end,
            stop_at=ctx.stop_at,
        )
    finally:
        stage_run.close()
    if last["step"] < steps:
        return {"finished": False, "step": int(last["step"])}
    if ctx.env.is_main:
        save()
    barrier(ctx.env)
    record = {
        "finished": True,
        "steps": steps,
        "wall_s": last.get("wall_s"),
        "world_size": ctx.env.world_size,
        **(outputs() if outputs is not None else {}),
    }
    ctx.write_metrics({"train": {stage_run.name: train_summary(last)}})
    return record
