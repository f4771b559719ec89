"""Flow matching: path, time sampling, loss, seeded noise, CFG, and samplers checked on exact fields."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from model.flow import (
    SamplerConfig,
    flow_loss,
    guided_velocity,
    interpolate,
    noise_from_seeds,
    sample,
    sample_training_t,
    shift_time,
    time_grid,
)
from model.lightningdit import LightningDiT, dit_config


class GaussianField:
    """Exact velocity for data ~ N(μ_y, σ²) per dimension on the path x_t = t·x₁ + (1 − t)·x₀.

    x_t is Gaussian with mean t·μ and variance V_t = t²σ² + (1 − t)², and Cov(x₁ − x₀, x_t) =
    t·σ² − (1 − t), so v(x, t) = E[x₁ − x₀ | x_t = x] = μ + (t·σ² − (1 − t))/V_t · (x − t·μ).
    Its ODE flow is x_t = t·μ + √V_t · x₀, so the exact sample for noise x₀ is μ + σ·x₀.
    """

    def __init__(self, means: list[float], sigma: float) -> None:
        self.means = torch.tensor(means, dtype=torch.float64)
        self.sigma = sigma
        self.calls: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        shape = (-1, *([1] * (x.dim() - 1)))
        mu = self.means[y].to(x.dtype).reshape(shape)
        t = t.to(x.dtype).reshape(shape)
        var = t**2 * self.sigma**2 + (1 - t) ** 2
        return mu + (t * self.sigma**2 - (1 - t)) / var * (x - t * mu)


def _labels(n: int, value: int = 0) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.long)


def test_sampler_config_validates_every_field() -> None:
    assert SamplerConfig(cfg_interval=[0.25, 1]).cfg_interval == (0.25, 1.0)
    bad = [
        ({"sampler": "dopri5"}, "sampler"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"sampler": "sde", "steps": 2}, "sde"),
        ({"shift": 0.0}, "shift"),
        ({"shift": float("nan")}, "shift"),
        ({"cfg_scale": -1.0}, "cfg_scale"),
        ({"cfg_interval": (0.6, 0.4)}, "cfg_interval"),
        ({"cfg_interval": (0.0, 1.5)}, "cfg_interval"),
        ({"cfg_interval": (0.1,)}, "cfg_interval"),
    ]
    for kwargs, field in bad:
        with pytest.raises(ValueError, match=field):
            SamplerConfig(**kwargs)


def test_shift_time_fixes_the_ends_and_inverts() -> None:
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    for s in (0.4, 0.7, 1.0, 3.0):
        w = shift_time(t, s)
        assert w[0] == 0 and w[-1] == 1 and torch.all(w[1:] > w[:-1])
        torch.testing.assert_close(shift_time(w, 1 / s), t)
    assert torch.all(shift_time(t, 0.4)[1:-1] < t[1:-1])  # s < 1 lingers near the noise end
    assert shift_time(0.5, 0.7) == pytest.approx(0.35 / 0.85)
    with pytest.raises(ValueError, match="shift"):
        shift_time(t, -1.0)
    grid = time_grid(4, 0.4)
    assert grid.shape == (5,) and grid[0] == 0 and grid[-1] == 1


def test_training_times_are_shifted_logit_normal_and_reproducible() -> None:
    t = sample_training_t(40000, 0.7, torch.Generator().manual_seed(0))
    assert torch.equal(t, sample_training_t(40000, 0.7, torch.Generator().manual_seed(0)))
    assert t.min() > 0 and t.max() < 1
    # The shift is monotone, so the median is the shifted median of sigmoid(N(0,1)), i.e. of 0.5.
    assert float(t.median()) == pytest.approx(0.35 / 0.85, abs=0.01)
    logits = torch.logit(sample_training_t(40000, 1.0, torch.Generator().manual_seed(1)).double())
    assert float(logits.std()) == pytest.approx(1.0, abs=0.02)


def test_interpolate_and_loss() -> None:
    gen = torch.Generator().manual_seed(0)
    data, noise = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    x_t, target = interpolate(data, noise, torch.tensor([0.0, 1.0, 0.25]))
    torch.testing.assert_close(x_t[0], noise[0])
    torch.testing.assert_close(x_t[1], data[1])
    torch.testing.assert_close(x_t[2], 0.25 * data[2] + 0.75 * noise[2])
    torch.testing.assert_close(target, data - noise)
    with pytest.raises(ValueError, match="t must have shape"):
        interpolate(data, noise, torch.rand(2))

    total, parts = flow_loss(target, target)
    assert float(total) == pytest.approx(0.0, abs=1e-6)
    total, parts = flow_loss(2 * target, target)  # same direction: only the MSE term
    assert float(parts["cos"]) == pytest.approx(0.0, abs=1e-6)
    assert float(parts["mse"]) == pytest.approx(float(target.square().mean()), rel=1e-5)
    total, parts = flow_loss(-target, target)  # opposite direction: 1 − cos = 2 everywhere
    assert float(parts["cos"]) == pytest.approx(2.0, abs=1e-5)
    assert float(total) == pytest.approx(float(parts["mse"] + parts["cos"]))


def test_noise_from_seeds_is_per_image() -> None:
    batch = noise_from_seeds([7, 3, 7], (2, 3, 3))
    assert batch.shape == (3, 2, 3, 3)
    torch.testing.assert_close(batch[1], noise_from_seeds(np.array([3]), (2, 3, 3))[0], rtol=0, atol=0)
    assert torch.equal(batch[0], batch[2]) and not torch.equal(batch[0], batch[1])
    for seeds in ([-1], [2**63], [1.5], []):
        with pytest.raises(ValueError, match="seed"):
            noise_from_seeds(seeds, (1,))


def test_guided_velocity_is_one_call_on_all_channels() -> None:
    field = GaussianField([1.0, -2.0, 0.0], sigma=0.5)
    x, t, y = torch.randn(2, 3, 2, 2, dtype=torch.float64), torch.tensor([0.3, 0.6]), torch.tensor([0, 1])
    v = guided_velocity(field, x, t, y, 3.0, null_class=2)
    assert field.calls == [4]
    v_c, v_u = field(x, t, y), field(x, t, _labels(2, 2))
    torch.testing.assert_close(v, v_u + 3.0 * (v_c - v_u))
    per_image = guided_velocity(field, x, t, y, torch.tensor([1.0, 3.0]), null_class=2)
    torch.testing.assert_close(per_image[0], v_c[0])
    torch.testing.assert_close(per_image[1], v[1])


def test_ode_samplers_converge_to_the_exact_transport() -> None:
    field = GaussianField([1.5], sigma=0.5)
    noise = noise_from_seeds(range(64), (1, 4, 4), dtype=torch.float64)
    exact = 1.5 + 0.5 * noise
    errors: dict[str, list[float]] = {"euler": [], "heun": []}
    for name in errors:
        for steps in (8, 16, 32, 64):
            out = sample(field, noise, _labels(64), SamplerConfig(name, steps, shift=0.4), null_class=1)
            errors[name].append(float((out - exact).abs().max()))
    euler, heun = errors["euler"], errors["heun"]
    # Euler is first order (halving h halves the error), Heun second order (quarters it).
    for coarse, fine in itertools.pairwise(euler):
        assert 1.7 < coarse / fine < 2.3
    for coarse, fine in itertools.pairwise(heun):
        assert 3.4 < coarse / fine < 4.6
    assert heun[-1] < 0.01 and heun[-1] < euler[-1] / 10
    # At 64 steps the sample moments match N(1.5, 0.5²) to the solver error above.
    out = sample(field, noise, _labels(64), SamplerConfig("heun", 64, shift=0.4), null_class=1)
    assert float(out.mean()) == pytest.approx(float(exact.mean()), abs=0.01)
    assert float(out.std()) == pytest.approx(float(exact.std()), abs=0.01)


def test_sde_sampler_matches_the_target_distribution() -> None:
    field = GaussianField([1.5], sigma=0.5)
    n, shape = 256, (1, 16, 16)  # 65 536 independent scalars: SE(mean) ≈ 0.002, SE(std) ≈ 0.0014
    seeds = list(range(n))
    noise = noise_from_seeds(seeds, shape, dtype=torch.float64)

    def moments_error(steps: int) -> tuple[float, float]:
        cfg = SamplerConfig("sde", steps, shift=0.4)
        out = sample(field, noise, _labels(n), cfg, null_class=1, generator_seeds=seeds)
        return abs(float(out.mean()) - 1.5), abs(float(out.std()) - 0.5)

    coarse, fine = moments_error(4), moments_error(64)
    # 5 standard errors plus the O(1/steps) Euler–Maruyama bias (≈0.002 at 64 steps when measured).
    assert fine[0] < 0.012 and fine[1] < 0.01
    # With 4 steps the first-order bias dominates the Monte-Carlo error: the std is visibly off.
    assert coarse[1] > 0.05 and coarse[1] > 5 * fine[1]


def test_sde_step_noise_is_fresh_standard_normal() -> None:
    """Recover the first stochastic step's dW from recorded states: it must be N(0, 1) and not
    the initial noise replayed (both streams come from the same user seed)."""
    field = GaussianField([0.5], sigma=0.8)
    states: list[tuple[torch.Tensor, float]] = []

    def recording(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        states.append((x.clone(), float(t[0])))
        return field(x, t, y)

    noise = noise_from_seeds([5], (1, 32, 32), dtype=torch.float64)
    sample(recording, noise, _labels(1), SamplerConfig("sde", 6), null_class=1, generator_seeds=[5])
    (x1, t1), (x2, t2) = states[1], states[2]
    v = field(x1, torch.tensor([t1]), _labels(1))
    diffusion, dt = (1 - t1) / t1, t2 - t1
    drift = v - diffusion * (x1 - t1 * v) / (1 - t1)
    dw = ((x2 - x1 - dt * drift) / math.sqrt(2 * diffusion * dt)).flatten()
    assert float(dw.mean()) == pytest.approx(0.0, abs=0.15)  # 1024 draws: SE 0.03
    assert float(dw.std()) == pytest.approx(1.0, abs=0.1)
    assert abs(float(torch.corrcoef(torch.stack([dw, noise.flatten()]))[0, 1])) < 0.15


def test_cfg_scale_one_is_the_conditional_model_alone() -> None:
    field = GaussianField([1.0, -1.0, 0.0], sigma=0.5)
    noise = noise_from_seeds(range(4), (2, 2, 2), dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    for sampler in ("euler", "heun", "sde"):
        field.calls.clear()
        kwargs = {"generator_seeds": range(4)}
        guided_cfg = SamplerConfig(sampler, 6, cfg_scale=1.0, cfg_interval=(0.0, 1.0))
        out = sample(field, noise, y, guided_cfg, null_class=2, **kwargs)
        assert set(field.calls) == {4}
        plain = sample(field, noise, y, SamplerConfig(sampler, 6), null_class=2, **kwargs)
        torch.testing.assert_close(out, plain, rtol=0, atol=0)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_unconditional_half_runs_only_inside_the_interval(sampler: str) -> None:
    field = GaussianField([1.0, -1.0, 0.0], sigma=0.5)
    noise = noise_from_seeds(range(3), (2, 2, 2), dtype=torch.float64)
    cfg = SamplerConfig(sampler, 10, shift=1.0, cfg_scale=2.0, cfg_interval=(0.5, 1.0))
    sample(field, noise, torch.tensor([0, 1, 0]), cfg, null_class=2)
    grid = time_grid(10, 1.0).tolist()
    evaluated = (
        grid[:10] if sampler == "euler" else [t for k in range(10) for t in (grid[k], grid[k + 1])][:-1]
    )
    expected = [6 if 0.5 <= t <= 1.0 else 3 for t in evaluated]
    assert field.calls == expected and 3 in expected and 6 in expected

    # An exported guided graph replaces guided_velocity inside the interval; the plain model runs outside.
    field.calls.clear()
    guided_calls: list[tuple[int, float]] = []

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
        guided_calls.append((x.shape[0], scale))
        return guided_velocity(GaussianField([1.0, -1.0, 0.0], 0.5), x, t, y, scale, 2)

    via_graph = sample(field, noise, torch.tensor([0, 1, 0]), cfg, null_class=2, guided=guided)
    assert field.calls == [3] * expected.count(3)
    assert guided_calls == [(3, 2.0)] * expected.count(6)
    torch.testing.assert_close(
        via_graph, sample(GaussianField([1.0, -1.0, 0.0], 0.5), noise, torch.tensor([0, 1, 0]), cfg, 2)
    )


@pytest.mark.parametrize("sampler", ["euler", "heun", "sde"])
def test_an_image_does_not_depend_on_its_batch(sampler: str) -> None:
    torch.manual_seed(0)
    model = LightningDiT(dit_config("tiny", 4, 4, 10, hidden=64, depth=2, heads=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = SamplerConfig(sampler, 4, shift=0.4, cfg_scale=2.5, cfg_interval=(0.3, 1.0))
    seeds = [11, 12, 13, 14, 99, 15, 16, 17, 18]
    labels = torch.tensor([0, 1, 2, 3, 7, 5, 6, 8, 9])
    shape = (4, 4, 4)
    batch = sample(model, noise_from_seeds(seeds, shape), labels, cfg, 10, generator_seeds=seeds)
    alone = sample(model, noise_from_seeds([99], shape), labels[4:5], cfg, 10, generator_seeds=[99])
    assert batch[4].abs().max() > 0.1
    torch.testing.assert_close(alone[0], batch[4], rtol=0, atol=1e-5)


def test_sample_rejects_bad_inputs() -> None:
    field = GaussianField([0.0, 1.0], sigma=1.0)
    noise = torch.randn(2, 1, 2, 2)
    with pytest.raises(ValueError, match="generator_seeds"):
        sample(field, noise, _labels(2), SamplerConfig("sde", 5), null_class=1)
    with pytest.raises(ValueError, match="seeds for a batch"):
        sample(field, noise, _labels(2), SamplerConfig("sde", 5), null_class=1, generator_seeds=[1])
    with pytest.raises(ValueError, match="class labels"):
        sample(field, noise, torch.tensor([0, 2]), SamplerConfig(), null_class=1)
    with pytest.raises(ValueError, match="y must be"):
        sample(field, noise, torch.zeros(3, dtype=torch.long), SamplerConfig(), null_class=1)
    model = LightningDiT(dit_config("tiny", 1, 2, 1, hidden=32, depth=1, heads=2))
    with pytest.raises(ValueError, match="eval mode"):
        sample(model, noise, _labels(2), SamplerConfig(steps=2), null_class=1)
    assert math.isfinite(float(sample(model.eval(), noise, _labels(2), SamplerConfig(steps=2), 1).sum()))


@pytest.mark.slow
def test_guided_velocity_exports_with_a_dynamic_batch(tmp_path) -> None:
    """The guided graph (x, t, y, per-image cfg_scale) keeps its batch axis symbolic and matches torch."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = LightningDiT(dit_config("tiny", 4, 4, 10, hidden=64, depth=2, heads=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))

    class Guided(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: torch.Tensor
        ) -> torch.Tensor:
            return guided_velocity(self.model, x, t, y, cfg_scale, null_class=10)

    graph = Guided().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    args = (torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([1, 2]), torch.tensor([2.0, 3.0]))
    program = torch.onnx.export(
        graph,
        args,
        dynamo=True,
        dynamic_shapes={name: {0: batch} for name in ("x", "t", "y", "cfg_scale")},
        input_names=["x", "t", "y", "cfg_scale"],
        verbose=False,
    )
    path = tmp_path / "guided.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(3)
    for b in (1, 3):
        x, t = torch.randn(b, 4, 4, 4, generator=gen), torch.rand(b, generator=gen)
        y, w = torch.randint(0, 10, (b,), generator=gen), 4 * torch.rand(b, generator=gen)
        with torch.no_grad():
            ref = graph(x, t, y, w).numpy()
        feed = {"x": x.numpy(), "t": t.numpy(), "y": y.numpy(), "cfg_scale": w.numpy()}
        np.testing.assert_allclose(session.run(None, feed)[0], ref, atol=1e-4, rtol=0)
