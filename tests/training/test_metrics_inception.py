"""FID InceptionV3: architecture size, pool3 output, weight-file loading and its errors (random weights)."""

from pathlib import Path

import pytest
import torch

from training.metrics.frechet import FeatureNetwork
from training.metrics.inception import (
    FID_WEIGHTS_ENV,
    FID_WEIGHTS_FILE,
    FIDInceptionV3,
    FIDWeightsMissing,
    _avg_pool_no_pad,
    load_fid_inception,
)

# InceptionV3 has 27,161,264 parameters with its auxiliary head (3,326,696) and a 1000-way classifier
# (2,049,000); the trunk up to pool3 is the difference.
TRUNK_PARAMS = 27_161_264 - 3_326_696 - 2_049_000


@pytest.fixture(scope="module")
def model() -> FIDInceptionV3:
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for module in net.modules():  # non-trivial BN statistics so a bad load would show in the output
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return net


def _weights_file(model: FIDInceptionV3, folder: Path) -> Path:
    """A file laid out like the converted TF weights: no BN step counters, plus a 1008-way classifier."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"] = torch.zeros(1008, 2048)
    state["fc.bias"] = torch.zeros(1008)
    path = folder / FID_WEIGHTS_FILE
    torch.save(state, path)
    return path


def test_architecture_size_and_pool3_shape(model: FIDInceptionV3) -> None:
    assert sum(p.numel() for p in model.parameters()) == TRUNK_PARAMS
    assert isinstance(model, FeatureNetwork) and model.dim == 2048
    feats = model.features(torch.rand(2, 3, 299, 299))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert (feats >= 0).all()  # pool3 averages ReLU outputs


def test_fid_pooling_excludes_padding() -> None:
    pooled = _avg_pool_no_pad(torch.ones(1, 1, 5, 5))
    assert torch.equal(pooled, torch.ones(1, 1, 5, 5))  # a zero-padded mean would dim the border


def test_weights_round_trip_through_file_env_and_directory(
    model: FIDInceptionV3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _weights_file(model, tmp_path)
    x = torch.rand(1, 3, 64, 64)
    expected = model.features(x)
    loaded = load_fid_inception(path)
    assert torch.allclose(loaded.features(x), expected, atol=1e-5)
    assert loaded.weights_sha256 is not None and len(loaded.weights_sha256) == 64
    monkeypatch.setenv(FID_WEIGHTS_ENV, str(tmp_path))
    from_env = load_fid_inception()
    assert torch.equal(from_env.Mixed_7c.branch_pool.conv.weight, model.Mixed_7c.branch_pool.conv.weight)


def test_missing_file_says_what_fid_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FID_WEIGHTS_ENV, raising=False)
    with pytest.raises(FIDWeightsMissing, match=f"FID needs the InceptionV3 weights file {FID_WEIGHTS_FILE}"):
        load_fid_inception()
    with pytest.raises(FIDWeightsMissing, match="does not exist"):
        load_fid_inception(tmp_path / "nowhere.pth")


def test_wrong_layout_is_rejected(model: FIDInceptionV3, tmp_path: Path) -> None:
    path = _weights_file(model, tmp_path)
    state = torch.load(path, weights_only=True)
    state["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(64, 192, 3, 3)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"Mixed_5b\.branch1x1\.conv\.weight has shape"):
        load_fid_inception(path)
    del state["Mixed_5b.branch1x1.conv.weight"]
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    torch.save(state, path)
    with pytest.raises(ValueError, match="not the FID Inception state dict"):
        load_fid_inception(path)
