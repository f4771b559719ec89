"""`torch.distributed` plumbing for the training stages: process-group setup from the `torchrun`
environment, the DDP wrapper, small collectives, and a resumable sharded batch order.

One process per device. Without `torchrun` (no `WORLD_SIZE` in the environment, or 1) everything
degrades to a single process with no process group, so the same stage code runs both ways. Gloo is
the backend on CPU and NCCL on CUDA; only rank 0 writes files.

The batch order comes from `torch.utils.data.DistributedSampler` (a permutation seeded by
`seed + epoch`, split across ranks), cut into fixed-size batches; a run can start at any global
batch position, which is what makes a resumed run see exactly the batches it would have seen.
Horizontal-flip bits are drawn from the same seed per epoch and index, so they do not depend on the
number of ranks either.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints, logs and images."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from exc


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """`None`/`auto` → this rank's CUDA device when one exists, else CPU; `cuda` without CUDA fails."""
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available in this torch build")
        return torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
    if device != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return torch.device("cpu")


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistEnv:
    """Read `RANK`/`WORLD_SIZE`/`LOCAL_RANK` (set by `torchrun`) and join the process group.

    NCCL when the device is CUDA, gloo otherwise. Idempotent: a second call reuses the group.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ValueError(f"WORLD_SIZE={world_size} but {name} is not set; launch with torchrun")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup() -> None:
    """Leave the process group (no-op for a single process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, env: DistEnv, find_unused_parameters: bool = False) -> nn.Module:
    """DDP on more than one rank (parameters are broadcast from rank 0 at construction); the bare
    module otherwise, so single-process runs pay nothing."""
    if not env.distributed:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / `torch.compile` wrappers, so state-dict keys never carry `module.`."""
    while isinstance(model, DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def mean_across_ranks(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Average a tensor over ranks (for logging losses); a detached copy either way."""
    out = value.detach().clone()
    if env.distributed:
        comm = out.to(env.device) if env.device.type == "cuda" else out
        dist.all_reduce(comm, op=dist.ReduceOp.SUM)
        out = comm.to(value.device) / env.world_size
    return out


def gather_equal(tensor: torch.Tensor, env: DistEnv) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor, in rank order (on CPU)."""
    if not env.distributed:
        return [tensor.detach().cpu().clone()]
    comm = tensor.detach().to(env.device if env.device.type == "cuda" else "cpu")
    parts = [torch.empty_like(comm) for _ in range(env.world_size)]
    dist.all_gather(parts, comm)
    return [p.cpu() for p in parts]


def broadcast_flag(flag: bool, env: DistEnv) -> bool:
    """Rank 0's boolean, on every rank (so all ranks take the same branch)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=env.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


class ShardedBatches:
    """Resumable, rank-sharded batch order over `num_items` examples.

    Each epoch: `DistributedSampler(shuffle, seed)` with `set_epoch(epoch)`, this rank's share cut into
    `batch_size` batches (the ragged tail dropped so every rank takes the same number of steps).
    Yields lists of `(index, flip)` pairs; flips are Bernoulli(`flip_prob`) per (epoch, index).
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        env: DistEnv,
        seed: int,
        shuffle: bool = True,
        flip_prob: float = 0.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.env = env
        self.seed = seed
        self.flip_prob = flip_prob
        self._sampler = DistributedSampler(
            range(num_items),
            num_replicas=env.world_size,
            rank=env.rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=True,
        )
        self.batches_per_epoch = len(self._sampler) // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{num_items} examples over {env.world_size} rank(s) do not fill one batch of {batch_size}"
            )

    def _flips(self, epoch: int) -> torch.Tensor:
        if self.flip_prob == 0.0:
            return torch.zeros(self.num_items, dtype=torch.bool)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
        return torch.rand(self.num_items, generator=gen) < self.flip_prob

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[list[tuple[int, bool]]]:
        """This rank's batches of `epoch`, from batch `start_batch` on."""
        self._sampler.set_epoch(epoch)
        order = list(self._sampler)
        flips = self._flips(epoch)
        for b in range(start_batch, self.batches_per_epoch):
            chunk = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(i, bool(flips[i])) for i in chunk]

    def __call__(self, start: int = 0) -> Iterator[list[tuple[int, bool]]]:
        """Endless batches starting at global batch position `start` (= batches already consumed)."""
        epoch, offset = divmod(start, self.batches_per_epoch)
        while True:
            yield from self.epoch(epoch, offset)
            epoch, offset = epoch + 1, 0


class BatchOrder(torch.utils.data.Sampler[list[tuple[int, bool]]]):
    """`ShardedBatches` from a fixed start position, as a `DataLoader` batch sampler."""

    def __init__(self, batches: ShardedBatches, start: int = 0) -> None:
        self.batches = batches
        self.start = start

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        return self.batches(self.start)
