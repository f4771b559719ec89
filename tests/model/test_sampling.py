"""The torch-free sampler: grids, seeded noise, CFG interval and solvers checked on an exact field."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from model.sampling import (
    RELEASE_SAMPLERS,
    RELEASE_SDE_LAST_STEP,
    SamplerConfig,
    generate,
    model_evaluations,
    noise_from_seeds,
    sample,
    shift_time,
    time_grid,
)


class GaussianField:
    """Exact velocity for data ~ N(μ_y, σ²) per dimension on the path x_t = t·x₁ + (1 − t)·x₀, as the
    sampler's `Networks` on float64 numpy arrays.

    x_t is Gaussian with mean t·μ and variance V_t = t²σ² + (1 − t)², and Cov(x₁ − x₀, x_t) =
    t·σ² − (1 − t), so v(x, t) = E[x₁ − x₀ | x_t = x] = μ + (t·σ² − (1 − t))/V_t · (x − t·μ).
    Its ODE flow is x_t = t·μ + √V_t · x₀, so the exact sample for noise x₀ is μ + σ·x₀.
    """

    def __init__(self, means: list[float], sigma: float, null_class: int | None = None) -> None:
        self.means = np.asarray(means, dtype=np.float64)
        self.sigma = sigma
        self.null_class = len(means) - 1 if null_class is None else null_class
        self.calls: list[tuple[str, int, float]] = []

    def field(self, x: np.ndarray, t: float, y: np.ndarray) -> np.ndarray:
        mu = self.means[y].reshape(-1, *([1] * (x.ndim - 1)))
        var = t**2 * self.sigma**2 + (1 - t) ** 2
        return mu + (t * self.sigma**2 - (1 - t)) / var * (x - t * mu)

    def velocity(self, x: np.ndarray, t: float, y: np.ndarray) -> np.ndarray:
        self.calls.append(("cond", x.shape[0], t))
        return self.field(x, t, y)

    def guided(self, x: np.ndarray, t: float, y: np.ndarray, scale: float) -> np.ndarray:
        self.calls.append(("guided", x.shape[0], t))
        v_c, v_u = self.field(x, t, y), self.field(x, t, np.full_like(y, self.null_class))
        return v_u + scale * (v_c - v_u)

    @staticmethod
    def asarray(values: np.ndarray) -> np.ndarray:
        return values


def _labels(n: int, value: int = 0) -> np.ndarray:
    return np.full(n, value, dtype=np.int64)


def _noise(seeds, shape) -> np.ndarray:
    return noise_from_seeds(list(seeds), shape).astype(np.float64)


def test_sampler_config_validates_every_field() -> None:
    assert SamplerConfig(cfg_interval=[0.25, 1]).cfg_interval == (0.25, 1.0)
    bad = [
        ({"sampler": "dopri5"}, "sampler"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"steps": True}, "steps"),
        ({"sampler": "sde", "steps": 2}, "sde"),
        ({"grid": "release", "steps": 1}, "release"),
        ({"grid": "cosine"}, "grid"),
        ({"shift": 0.0}, "shift"),
        ({"shift": float("nan")}, "shift"),
        ({"shift": True}, "shift"),
        ({"cfg_scale": -1.0}, "cfg_scale"),
        ({"cfg_interval": (0.6, 0.4)}, "cfg_interval"),
        ({"cfg_interval": (0.0, 1.5)}, "cfg_interval"),
        ({"cfg_interval": (0.1,)}, "cfg_interval"),
    ]
    for kwargs, field in bad:
        with pytest.raises(ValueError, match=field):
            SamplerConfig(**kwargs)
    cfg = SamplerConfig("heun", 12, 0.4, 2.0, (0.2, 0.9), "release")
    assert SamplerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown sampler settings"):
        SamplerConfig.from_dict({"steps": 3, "solver": "euler"})


def test_shift_time_fixes_the_ends_and_inverts() -> None:
    t = np.linspace(0, 1, 11)
    for s in (0.4, 0.7, 1.0, 3.0):
        w = shift_time(t, s)
        assert w[0] == 0 and w[-1] == 1 and np.all(w[1:] > w[:-1])
        np.testing.assert_allclose(shift_time(w, 1 / s), t, atol=1e-12)
    assert np.all(shift_time(t, 0.4)[1:-1] < t[1:-1])  # s < 1 lingers near the noise end
    assert shift_time(0.5, 0.7) == pytest.approx(0.35 / 0.85)
    with pytest.raises(ValueError, match="shift"):
        shift_time(t, -1.0)


@pytest.mark.parametrize("steps", [1, 4, 25, 250])
def test_the_updates_grid_has_steps_intervals(steps: int) -> None:
    grid = time_grid(steps, 0.4)
    assert len(grid) == steps + 1 and grid[0] == 0 and grid[-1] == 1
    assert model_evaluations(SamplerConfig("euler", steps, 0.4)) == steps


def test_the_release_grid_has_n_points_and_n_minus_one_updates() -> None:
    grid = time_grid(250, 0.4, "release")
    assert len(grid) == 250 and grid[0] == 0 and grid[-1] == 1
    for k, t in enumerate(grid):  # the shifted grid is s·u / (1 + (s − 1)·u) point by point
        u = k / 249
        assert t == pytest.approx(0.4 * u / (1 + (0.4 - 1) * u), rel=1e-14, abs=1e-15)
    assert model_evaluations(RELEASE_SAMPLERS["release-800ep"]) == 249
    field = GaussianField([1.0, 0.0], 0.5)
    sample(field, _noise(range(2), (1, 2, 2)), _labels(2), SamplerConfig("euler", 250, 0.4, grid="release"))
    assert len(field.calls) == 249


def test_grids_equal_torch_linspace_to_the_last_bit() -> None:
    """The authors' code builds its grids with torch.linspace; ours must be the same float64 values."""
    torch = pytest.importorskip("torch")
    for n in (2, 3, 25, 250, 251, 1000):
        expected = shift_time(torch.linspace(0.0, 1.0, n, dtype=torch.float64), 0.4).tolist()
        assert list(time_grid(n, 0.4, "release")) == expected
        sde = torch.linspace(1e-5, 1 - RELEASE_SDE_LAST_STEP, n, dtype=torch.float64)
        if n >= 3:
            assert list(time_grid(n, 0.4, "release", "sde")) == shift_time(sde, 0.4).tolist()


def test_release_sde_ends_with_one_noise_free_drift_step() -> None:
    cfg = SamplerConfig("sde", 6, 0.4, grid="release")
    grid = time_grid(6, 0.4, "release", "sde")
    assert grid[0] == pytest.approx(shift_time(1e-5, 0.4)) and grid[-1] == shift_time(0.996, 0.4)
    assert model_evaluations(cfg) == 6
    inputs: list[np.ndarray] = []

    class Recording(GaussianField):
        def velocity(self, x, t, y):
            inputs.append(x.copy())
            return super().velocity(x, t, y)

    field = Recording([0.5, 0.0], 0.8)
    seeds = [3, 4]
    out = sample(field, _noise(seeds, (1, 4, 4)), _labels(2), cfg, seeds=seeds)
    # Five Euler–Maruyama updates on the six grid points, then the drift step at the last point.
    assert [c[2] for c in field.calls] == [*grid[:-1], grid[-1]]
    x, t = inputs[-1], grid[-1]
    v = field.field(x, t, _labels(2))
    drift = v + (1 - t) / t * (-(x - t * v) / (1 - t))
    np.testing.assert_array_equal(out, x + RELEASE_SDE_LAST_STEP * drift)  # no noise in the last step


def test_named_release_samplers_match_the_published_table() -> None:
    assert RELEASE_SAMPLERS["release-80ep"] == SamplerConfig("euler", 250, 0.4, 2.5, (0.25, 1.0), "release")
    assert RELEASE_SAMPLERS["release-800ep"] == SamplerConfig("euler", 250, 0.4, 3.3, (0.3, 1.0), "release")
    sde = RELEASE_SAMPLERS["release-sde"]
    assert (sde.sampler, sde.steps, sde.shift, sde.guided, sde.grid) == ("sde", 250, 0.4, False, "release")


def test_noise_from_seeds_is_per_image() -> None:
    batch = noise_from_seeds([7, 3, 7], (2, 3, 3))
    assert batch.shape == (3, 2, 3, 3) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], noise_from_seeds(np.array([3]), (2, 3, 3))[0])
    assert np.array_equal(batch[0], batch[2]) and not np.array_equal(batch[0], batch[1])
    for seeds in ([-1], [2**63], [1.5], [], [True]):
        with pytest.raises(ValueError, match="seed"):
            noise_from_seeds(seeds, (1,))


def test_ode_samplers_converge_to_the_exact_transport() -> None:
    field = GaussianField([1.5, 0.0], sigma=0.5)
    noise = _noise(range(64), (1, 4, 4))
    exact = 1.5 + 0.5 * noise
    errors: dict[str, list[float]] = {"euler": [], "heun": []}
    for name in errors:
        for steps in (8, 16, 32, 64):
            out = sample(field, noise, _labels(64), SamplerConfig(name, steps, shift=0.4))
            errors[name].append(float(np.abs(out - exact).max()))
    euler, heun = errors["euler"], errors["heun"]
    # Euler is first order (halving h halves the error), Heun second order (quarters it).
    for coarse, fine in itertools.pairwise(euler):
        assert 1.7 < coarse / fine < 2.3
    for coarse, fine in itertools.pairwise(heun):
        assert 3.4 < coarse / fine < 4.6
    assert heun[-1] < 0.01 and heun[-1] < euler[-1] / 10
    field.calls.clear()
    sample(field, noise, _labels(64), SamplerConfig("heun", 8, shift=0.4))
    assert len(field.calls) == model_evaluations(SamplerConfig("heun", 8, shift=0.4)) == 15


@pytest.mark.parametrize("grid", ["updates", "release"])
def test_sde_sampler_matches_the_target_distribution(grid: str) -> None:
    field = GaussianField([1.5, 0.0], sigma=0.5)
    n, shape = 256, (1, 16, 16)  # 65 536 independent scalars: SE(mean) ≈ 0.002, SE(std) ≈ 0.0014
    seeds = list(range(n))
    noise = _noise(seeds, shape)

    def moments_error(steps: int) -> tuple[float, float]:
        out = sample(field, noise, _labels(n), SamplerConfig("sde", steps, shift=0.4, grid=grid), seeds=seeds)
        return abs(float(out.mean()) - 1.5), abs(float(out.std()) - 0.5)

    coarse, fine = moments_error(4), moments_error(64)
    # 5 standard errors plus the O(1/steps) Euler–Maruyama bias (≈0.002 at 64 steps when measured).
    assert fine[0] < 0.012 and fine[1] < 0.01
    # With 4 steps the first-order bias dominates the Monte-Carlo error: the std is visibly off.
    assert coarse[1] > 0.05 and coarse[1] > 5 * fine[1]


def test_sde_step_noise_is_fresh_standard_normal() -> None:
    """Recover the first stochastic step's dW from recorded states: it must be N(0, 1) and not
    the initial noise replayed (both streams come from the same user seed)."""
    states: list[tuple[np.ndarray, float]] = []

    class Recording(GaussianField):
        def velocity(self, x, t, y):
            states.append((x.copy(), t))
            return super().velocity(x, t, y)

    field = Recording([0.5, 0.0], sigma=0.8)
    noise = _noise([5], (1, 32, 32))
    sample(field, noise, _labels(1), SamplerConfig("sde", 6), seeds=[5])
    (x1, t1), (x2, t2) = states[1], states[2]
    v = field.field(x1, t1, _labels(1))
    diffusion, dt = (1 - t1) / t1, t2 - t1
    drift = v - diffusion * (x1 - t1 * v) / (1 - t1)
    dw = ((x2 - x1 - dt * drift) / math.sqrt(2 * diffusion * dt)).ravel()
    assert float(dw.mean()) == pytest.approx(0.0, abs=0.15)  # 1024 draws: SE 0.03
    assert float(dw.std()) == pytest.approx(1.0, abs=0.1)
    assert abs(float(np.corrcoef(dw, noise.ravel())[0, 1])) < 0.15


def test_cfg_scale_one_is_the_conditional_model_alone() -> None:
    field = GaussianField([1.0, -1.0, 0.0], sigma=0.5)
    noise = _noise(range(4), (2, 2, 2))
    y = np.array([0, 1, 0, 1])
    for sampler in ("euler", "heun", "sde"):
        field.calls.clear()
        out = sample(field, noise, y, SamplerConfig(sampler, 6, cfg_scale=1.0), seeds=range(4))
        assert {c[0] for c in field.calls} == {"cond"}
        plain = sample(field, noise, y, SamplerConfig(sampler, 6), seeds=range(4))
        np.testing.assert_array_equal(out, plain)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_unconditional_half_runs_only_inside_the_interval(sampler: str) -> None:
    field = GaussianField([1.0, -1.0, 0.0], sigma=0.5)
    noise = _noise(range(3), (2, 2, 2))
    cfg = SamplerConfig(sampler, 10, shift=1.0, cfg_scale=2.0, cfg_interval=(0.5, 1.0))
    sample(field, noise, np.array([0, 1, 0]), cfg)
    grid = time_grid(10, 1.0)
    evaluated = (
        grid[:10] if sampler == "euler" else [t for k in range(10) for t in (grid[k], grid[k + 1])][:-1]
    )
    expected = ["guided" if 0.5 <= t <= 1.0 else "cond" for t in evaluated]
    assert [c[0] for c in field.calls] == expected and {"guided", "cond"} <= set(expected)


def test_on_step_runs_before_every_interval_and_can_stop_the_batch() -> None:
    field = GaussianField([1.0, 0.0], sigma=0.5)
    seen: list[int] = []
    sample(field, _noise(range(2), (1, 2, 2)), _labels(2), SamplerConfig("heun", 5), on_step=seen.append)
    assert seen == [0, 1, 2, 3, 4]

    class Cancelled(Exception):
        pass

    def cancel_at_two(k: int) -> None:
        if k == 2:
            raise Cancelled

    field.calls.clear()
    with pytest.raises(Cancelled):
        sample(
            field, _noise(range(2), (1, 2, 2)), _labels(2), SamplerConfig("euler", 50), on_step=cancel_at_two
        )
    assert len(field.calls) == 2  # no network call after the cancellation


def test_generate_denormalises_and_decodes_each_seed_alone() -> None:
    field = GaussianField([1.0, -1.0, 0.0], sigma=0.5)
    cfg = SamplerConfig("sde", 5, shift=0.4, cfg_scale=2.0, cfg_interval=(0.3, 1.0))
    mean, std = [0.5, -0.25], [2.0, 0.5]

    def run(labels: list[int], seeds: list[int]) -> np.ndarray:
        return generate(field, lambda z: z, np.array(labels), np.array(seeds), cfg, (2, 2, 2), mean, std, 2)

    batch = run([0, 1, 0], [11, 99, 12])
    alone = run([1], [99])
    np.testing.assert_array_equal(alone[0], batch[1])
    latent = sample(field, noise_from_seeds([99], (2, 2, 2)), np.array([1]), cfg, seeds=[99])
    np.testing.assert_allclose(
        alone[0], latent[0] * np.array(std).reshape(2, 1, 1) + np.array(mean).reshape(2, 1, 1)
    )
    with pytest.raises(ValueError, match="class labels"):
        run([3], [1])
    with pytest.raises(ValueError, match="one seed per label"):
        generate(field, lambda z: z, np.array([0, 1]), np.array([1]), cfg, (2, 2, 2), mean, std, 2)


def test_sample_rejects_bad_inputs() -> None:
    field = GaussianField([0.0, 1.0], sigma=1.0)
    noise = np.zeros((2, 1, 2, 2))
    with pytest.raises(ValueError, match="needs seeds"):
        sample(field, noise, _labels(2), SamplerConfig("sde", 5))
    with pytest.raises(ValueError, match="seeds for a batch"):
        sample(field, noise, _labels(2), SamplerConfig("sde", 5), seeds=[1])
    with pytest.raises(ValueError, match="SamplerConfig"):
        sample(field, noise, _labels(2), {"steps": 3})
