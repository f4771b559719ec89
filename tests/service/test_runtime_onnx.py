import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export.repository import ModelConfig, RepositoryError, resolve_version_dir
from export.tiny_repository import LATENT_MEAN, LATENT_STD, NULL_CLASS, tiny_modules, write_manifest
from model.flow import TorchNetworks
from model.sampling import SamplerConfig, generate
from service.runtimes.base import Runtime
from service.runtimes.onnxruntime import OnnxRuntime, ProviderUnavailable


@pytest.fixture(scope="module")
def runtime(tiny_repository: Path) -> OnnxRuntime:
    return OnnxRuntime(tiny_repository / "tiny" / "1", intra_op_threads=1)


@pytest.fixture
def repo_copy(tiny_repository: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "repo"
    shutil.copytree(tiny_repository, dst)
    return dst / "tiny" / "1"


def test_protocol_shapes_and_info(runtime: OnnxRuntime) -> None:
    assert isinstance(runtime, Runtime)
    z = runtime.encode(np.random.default_rng(0).random((3, 3, 16, 16), dtype=np.float32))
    assert z.shape == (3, 4, 4, 4) and z.dtype == np.float32
    assert np.allclose(np.sqrt((z**2).mean(axis=1)), 1.0, atol=1e-3)  # on the RMS sphere
    assert runtime.decode(z).shape == (3, 3, 16, 16)
    info = runtime.info()
    assert info["runtime"] == "onnxruntime" and info["provider"] == "cpu"
    assert info["execution_providers"][0] == "CPUExecutionProvider"


def test_matches_the_torch_modules(runtime: OnnxRuntime) -> None:
    encoder, decoder, dit = tiny_modules()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z_ref = encoder(images)
        x_ref = decoder(z_ref)
    assert np.abs(runtime.encode(images.numpy()) - z_ref.numpy()).max() < 1e-5
    assert np.abs(runtime.decode(z_ref.numpy()) - x_ref.numpy()).max() < 1e-5

    # generate = decode(sample(...)·std + mean), guided inside the CFG interval only.
    cfg = SamplerConfig(sampler="heun", steps=3, shift=0.7, cfg_scale=3.0, cfg_interval=(0.3, 1.0))
    seeds, labels = [11, 12], [0, 2]
    with torch.no_grad():
        ref = generate(
            TorchNetworks(dit.eval(), NULL_CLASS),
            lambda z: decoder(z).numpy(),
            np.array(labels),
            np.array(seeds),
            cfg,
            (4, 4, 4),
            LATENT_MEAN,
            LATENT_STD,
            NULL_CLASS,
        )
    got = runtime.generate(np.array(labels), np.array(seeds), cfg)
    assert np.abs(got - ref).max() < 1e-5


def test_generation_is_batch_invariant(runtime: OnnxRuntime) -> None:
    cfg = SamplerConfig(sampler="sde", steps=5, cfg_scale=2.0)
    batch = runtime.generate(np.array([0, 1, 2, 1]), np.array([7, 8, 9, 10]), cfg)
    alone = runtime.generate(np.array([1]), np.array([8]), cfg)
    assert np.array_equal(batch[1], alone[0])
    assert not np.array_equal(batch[1], batch[3])  # same class, other seed: another image


def test_warmup_runs_each_batch_size(runtime: OnnxRuntime) -> None:
    runtime.warmup({"encode": 3, "decode": 2, "generate": 2})


def test_unavailable_provider_is_refused(tiny_repository: Path) -> None:
    with pytest.raises(ProviderUnavailable, match="CUDAExecutionProvider"):
        OnnxRuntime(tiny_repository / "tiny" / "1", provider="cuda")


@pytest.mark.parametrize("name", ["decoder.onnx", "dit.onnx.data"])
def test_tampered_file_is_refused_naming_it(repo_copy: Path, name: str) -> None:
    # dit.onnx.data holds external weights: it is found through the graph and verified too.
    path = repo_copy / name
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(RepositoryError, match=rf"{name.replace('.', '[.]')} sha256 .* does not match"):
        OnnxRuntime(repo_copy)


def test_unlisted_or_missing_manifest_is_refused(repo_copy: Path) -> None:
    manifest = json.loads((repo_copy / "manifest.json").read_text())
    del manifest["files"]["dit.onnx"]
    (repo_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RepositoryError, match=r"not listed in the manifest: dit\.onnx"):
        OnnxRuntime(repo_copy)
    (repo_copy / "manifest.json").unlink()
    with pytest.raises(RepositoryError, match=r"manifest\.json is missing"):
        OnnxRuntime(repo_copy)


def test_a_file_the_manifest_does_not_list_is_refused(repo_copy: Path) -> None:
    # Not one of the graphs the runtime loads, but a version holding unverified files is refused whole.
    (repo_copy / "encoder.fp16.onnx").write_bytes((repo_copy / "encoder.onnx").read_bytes())
    with pytest.raises(RepositoryError, match=r"not listed in the manifest: encoder\.fp16\.onnx"):
        OnnxRuntime(repo_copy)


def test_a_manifest_path_outside_the_version_is_refused(repo_copy: Path) -> None:
    outside = repo_copy.parent / "stray.onnx"
    outside.write_bytes(b"x")
    manifest = json.loads((repo_copy / "manifest.json").read_text())
    manifest["files"]["../stray.onnx"] = {"sha256": "0" * 64, "bytes": 1}
    (repo_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RepositoryError, match=r"'\.\./stray\.onnx' points outside the version folder"):
        OnnxRuntime(repo_copy)


def test_config_problems_name_the_key(repo_copy: Path) -> None:
    config = json.loads((repo_copy / "config.json").read_text())
    config["latent_std"] = [1.0, 1.0]
    (repo_copy / "config.json").write_text(json.dumps(config))
    write_manifest(repo_copy)
    with pytest.raises(RepositoryError, match="latent_std must be 4 finite numbers"):
        ModelConfig.load(repo_copy)


def test_version_resolution(tiny_repository: Path, tmp_path: Path) -> None:
    assert resolve_version_dir(tiny_repository, "tiny", None).name == "1"
    (tmp_path / "m" / "2").mkdir(parents=True)
    (tmp_path / "m" / "10").mkdir()
    (tmp_path / "m" / ".staging-x").mkdir()
    assert resolve_version_dir(tmp_path, "m", None).name == "10"
    with pytest.raises(RepositoryError, match="no version '3'"):
        resolve_version_dir(tmp_path, "m", "3")
    with pytest.raises(RepositoryError, match="not found"):
        resolve_version_dir(tmp_path, "other", None)
