"""Resumable training state, optimiser pieces and exact resume of the generic step loop."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from model.checkpoint import CheckpointError
from training.checkpoint import (
    load_resume,
    resume_step,
    rng_state_tensors,
    save_resume,
    set_rng_state_tensors,
)
from training.distributed import DistEnv, ShardedBatches
from training.optim import EMA, build_adamw, build_scheduler, lr_factor, param_groups
from training.stages.common import StageRun, Trainables, restore_state, train_loop
from training.stages.overrides import apply_overrides, parse_sets

CPU1 = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))


def test_param_groups_exclude_biases_norms_and_vectors() -> None:
    net = _net()
    net.register_parameter("scale", nn.Parameter(torch.ones(16)))
    decay, no_decay = param_groups(net, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(net[0].weight), id(net[3].weight)}
    assert len(no_decay["params"]) == 5  # two biases, the LayerNorm's weight and bias, `scale`


def test_lr_schedule_shape() -> None:
    f = [lr_factor(s, 4, 20, "cosine", 0.1) for s in range(25)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(f[4:])), "cosine part must not increase"
    assert math.isclose(f[20], 0.1) and math.isclose(f[24], 0.1)
    assert lr_factor(100, 0, 10, "constant", 0.1) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 0, 10, "linear", 0.1)


def test_ema_is_a_moving_average() -> None:
    net = nn.Linear(2, 2)
    ema = EMA(net, decay=0.75)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(4.0)
    ema.update(net)
    assert torch.allclose(ema.shadow["weight"], start + 1.0)
    target = nn.Linear(2, 2)
    ema.copy_to(target)
    assert torch.equal(target.weight, ema.shadow["weight"])


def test_rng_state_roundtrip() -> None:
    state = rng_state_tensors()
    a = (torch.rand(3), torch.randn(2))
    set_rng_state_tensors(state)
    b = (torch.rand(3), torch.randn(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_resume_restores_optimizer_scheduler_ema(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _net()
    opt = build_adamw(net, 1e-2, weight_decay=0.1)
    sched = build_scheduler(opt, 2, 10)
    ema = EMA(net, 0.9)
    for _ in range(3):
        net(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        ema.update(net)
    save_resume(
        tmp_path, "s", 3, {"net": net}, {"opt": opt}, {"sched": sched}, {"net": ema}, [rng_state_tensors()]
    )
    assert resume_step(tmp_path, "s") == 3

    net2 = _net()
    opt2 = build_adamw(net2, 1e-2, weight_decay=0.1)
    sched2 = build_scheduler(opt2, 2, 10)
    ema2 = EMA(net2, 0.9)
    step, _ = load_resume(tmp_path, "s", {"net": net2}, {"opt": opt2}, {"sched": sched2}, {"net": ema2})
    assert step == 3 and sched2.last_epoch == 3
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for p, q in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])
    assert all(torch.equal(ema.shadow[k], ema2.shadow[k]) for k in ema.shadow)

    with pytest.raises(CheckpointError, match="does not fit"):
        load_resume(tmp_path, "s", {"net": nn.Linear(4, 3)}, {})


def _run(out: Path, total: int, stop: int) -> dict[str, torch.Tensor]:
    """Train a small regression up to `stop` (of a `total`-step schedule), resuming from `out`."""
    torch.manual_seed(1)
    net = _net()
    opt = build_adamw(net, 5e-3, weight_decay=0.01)
    sched = build_scheduler(opt, 2, total)
    ema = EMA(net, 0.8)
    state = Trainables({"net": net}, {"opt": opt}, {"opt": sched}, {"net": ema})
    run = StageRun("toy", out, CPU1)
    start, _ = restore_state(run, state)
    data_x = torch.linspace(-1, 1, 48).reshape(12, 4)
    order = ShardedBatches(12, 4, CPU1, seed=3, flip_prob=0.5)
    batches = order(start)

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        batch = next(batches)
        idx = torch.tensor([i for i, _ in batch])
        x = data_x[idx] + 0.1 * torch.randn(len(batch), 4)  # global RNG: must be restored on resume
        loss = (net(x) - x[:, :3]).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        ema.update(net)
        return {"loss": loss.detach()}

    train_loop(run, state, stop, step_fn, log_every=2, save_every=100, start_step=start)
    run.close()
    return {
        **{f"p.{k}": v.clone() for k, v in net.state_dict().items()},
        **{f"e.{k}": v for k, v in ema.shadow.items()},
    }


def test_train_loop_resume_is_exact(tmp_path: Path) -> None:
    straight = _run(tmp_path / "a", total=10, stop=10)
    _run(tmp_path / "b", total=10, stop=5)
    assert resume_step(tmp_path / "b", "toy") == 5
    resumed = _run(tmp_path / "b", total=10, stop=10)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert (tmp_path / "b" / "tb" / "toy").is_dir()


def test_sharded_batches_cover_each_epoch_once() -> None:
    envs = [DistEnv(r, 2, r, torch.device("cpu")) for r in range(2)]
    seen = []
    for env in envs:
        order = ShardedBatches(12, 2, env, seed=0)
        for batch in order.epoch(0):
            seen += [i for i, _ in batch]
    assert sorted(seen) == list(range(12))
    assert ShardedBatches(10, 2, envs[0], seed=0).batches_per_epoch == 2  # ragged tail dropped
    single = ShardedBatches(10, 3, CPU1, seed=0)
    it = single(start=4)  # 3 batches per epoch → batch 1 of epoch 1
    assert next(it) == list(single.epoch(1))[1]


@dataclasses.dataclass(frozen=True)
class _Cfg:
    lr: float = 1e-3
    steps: int = 10
    betas: tuple[float, float] = (0.9, 0.95)
    name: str | None = None
    bf16: bool = True


def test_overrides_are_typed_and_checked() -> None:
    cfg = apply_overrides(_Cfg(), parse_sets(["lr=2e-4", "betas=0.8,0.99", "name=none", "bf16=false"]), "t")
    assert cfg == _Cfg(lr=2e-4, betas=(0.8, 0.99), name=None, bf16=False)
    with pytest.raises(ValueError, match="unknown t setting 'lrr'"):
        apply_overrides(_Cfg(), {"lrr": "1"}, "t")
    with pytest.raises(ValueError, match=r"t\.steps: expected an integer"):
        apply_overrides(_Cfg(), {"steps": "ten"}, "t")
    with pytest.raises(ValueError, match="key=value"):
        parse_sets(["steps"])
