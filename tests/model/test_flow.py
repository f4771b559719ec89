"""Flow matching for training (path, time sampling, loss), the fused CFG call, and the DiT as the
sampler's torch networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.flow import TorchNetworks, flow_loss, guided_velocity, interpolate, sample_training_t
from model.lightningdit import LightningDiT, dit_config
from model.sampling import SamplerConfig, generate, noise_from_seeds, sample


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


@pytest.mark.parametrize("sampler", ["euler", "heun", "sde"])
def test_an_image_does_not_depend_on_its_batch(sampler: str) -> None:
    torch.manual_seed(0)
    model = LightningDiT(dit_config("tiny", 4, 4, 10, hidden=64, depth=2, heads=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    networks = TorchNetworks(model)
    cfg = SamplerConfig(sampler, 4, shift=0.4, cfg_scale=2.5, cfg_interval=(0.3, 1.0))
    seeds = np.array([11, 12, 13, 14, 99, 15, 16, 17, 18])
    labels = np.array([0, 1, 2, 3, 7, 5, 6, 8, 9])
    stats = ((4, 4, 4), [0.0] * 4, [1.0] * 4, 10)
    batch = generate(networks, lambda z: z, labels, seeds, cfg, *stats)
    alone = generate(networks, lambda z: z, labels[4:5], seeds[4:5], cfg, *stats)
    assert batch[4].abs().max() > 0.1
    torch.testing.assert_close(alone[0], batch[4], rtol=0, atol=1e-5)


def test_torch_networks_need_eval_mode_and_match_the_dit() -> None:
    model = LightningDiT(dit_config("tiny", 1, 2, 1, hidden=32, depth=1, heads=2))
    with pytest.raises(ValueError, match="eval mode"):
        TorchNetworks(model)
    networks = TorchNetworks(model.eval())
    x = torch.from_numpy(noise_from_seeds([1, 2], (1, 2, 2)))
    y = networks.asarray(np.array([0, 1]))
    with torch.no_grad():
        torch.testing.assert_close(networks.velocity(x, 0.25, y), model(x, torch.full((2,), 0.25), y))
        expected = guided_velocity(model, x, torch.full((2,), 0.25), y, 3.0, model.null_class)
    torch.testing.assert_close(networks.guided(x, 0.25, y, 3.0), expected)
    out = sample(networks, x, y, SamplerConfig(steps=2))
    assert isinstance(out, torch.Tensor) and math.isfinite(float(out.sum()))


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
