"""Feature cache: compute once, serve by index, key on the VFM fingerprint, detect damage."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from torch import nn

from training.data import LabeledImages
from training.feature_cache import FeatureCache, FeatureCacheError, WithIndex, build_feature_cache


class FakeVFM(nn.Module):
    """Stand-in for FrozenVFM: a fixed conv giving a 2×2 grid of 5-d tokens, counting its calls."""

    def __init__(self, tag: str = "v1", scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 5, 4, stride=4)
        self.tag, self.scale, self.calls = tag, scale, 0

    def fingerprint(self) -> str:
        return f"fake-{self.tag}"

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (self.conv(x01) * self.scale).flatten(2).transpose(1, 2)


class Images(LabeledImages):
    class_names, image_size = ("a", "b"), 8

    def __init__(self, n: int = 10) -> None:
        self.x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int):
        i = self._check_index(index)
        return self.x[i], i % 2


def _build(vfm: FakeVFM, ds: Images, root: str, **kw) -> FeatureCache:
    kw.setdefault("dtype", "float32")
    return build_feature_cache(
        vfm, ds, dataset_name="toy", split="train", image_size=8, root=root, batch_size=3, shard_size=4, **kw
    )


def test_tokens_match_vfm_and_are_reused(tmp_path) -> None:
    vfm, ds = FakeVFM(), Images()
    cache = _build(vfm, ds, str(tmp_path))
    assert len(cache) == 10 and cache.token_shape == (4, 5)
    assert [s["count"] for s in cache.shards] == [4, 4, 2]
    with torch.no_grad():
        expected = vfm(ds.x)
    idx = [9, 0, 4, 3, 4]
    torch.testing.assert_close(cache[idx], expected[idx])
    torch.testing.assert_close(cache[torch.tensor([7])], expected[[7]])
    torch.testing.assert_close(cache[5], expected[5])
    with pytest.raises(IndexError, match="out of range"):
        cache[[10]]

    calls = vfm.calls
    again = _build(vfm, ds, str(tmp_path))
    assert vfm.calls == calls and again.directory == cache.directory
    restored = pickle.loads(pickle.dumps(again))  # picklable for DataLoader workers
    torch.testing.assert_close(restored[[1, 8]], expected[[1, 8]])


def test_key_changes_recompute(tmp_path) -> None:
    ds = Images()
    first = _build(FakeVFM("v1"), ds, str(tmp_path))
    other_vfm = FakeVFM("v2", scale=2.0)
    second = _build(other_vfm, ds, str(tmp_path))
    assert other_vfm.calls > 0 and second.directory != first.directory
    torch.testing.assert_close(second[[3]], 2.0 * first[[3]])
    flipped = _build(FakeVFM("v1"), ds, str(tmp_path), flip="both")
    half = _build(FakeVFM("v1"), ds, str(tmp_path), dtype="float16")
    assert len({first.directory, flipped.directory, half.directory}) == 3
    assert half[[2]].dtype == torch.float32
    torch.testing.assert_close(half[[2]], first[[2]], atol=2e-3, rtol=2e-3)
    assert first.key_fields["vfm"] == "fake-v1" and flipped.key_fields["flip"] == "both"


def test_damaged_cache_is_reported_or_recomputed(tmp_path) -> None:
    vfm, ds = FakeVFM(), Images()
    cache = _build(vfm, ds, str(tmp_path))
    shard = os.path.join(cache.directory, "shard_00001.safetensors")
    with open(shard, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(FeatureCacheError, match=r"shard_00001\.safetensors has 100 bytes"):
        _build(vfm, ds, str(tmp_path), on_corrupt="error")
    calls = vfm.calls
    repaired = _build(vfm, ds, str(tmp_path))
    assert vfm.calls > calls
    torch.testing.assert_close(repaired[[5]], cache[[5]])

    os.remove(shard)
    with pytest.raises(FeatureCacheError, match=r"shard missing: .*shard_00001\.safetensors"):
        FeatureCache(cache.directory)
    repaired = _build(vfm, ds, str(tmp_path))

    size = os.path.getsize(shard)
    with open(shard, "r+b") as fh:
        fh.seek(size - 8)
        fh.write(b"\xff" * 8)
    FeatureCache(cache.directory)  # cheap checks (size, header) pass; the hash catches the flipped bytes
    with pytest.raises(FeatureCacheError, match=r"shard_00001\.safetensors: sha256 mismatch"):
        FeatureCache(cache.directory, verify_hashes=True)

    meta = os.path.join(cache.directory, "meta.json")
    with open(meta, "w") as fh:
        fh.write("{not json")
    with pytest.raises(FeatureCacheError, match=r"meta\.json: unreadable"):
        FeatureCache(cache.directory)
    with pytest.raises(FeatureCacheError, match=r"no meta\.json"):
        FeatureCache(str(tmp_path / "nowhere"))


def test_metadata_key_mismatch_recomputes(tmp_path) -> None:
    vfm, ds = FakeVFM(), Images()
    cache = _build(vfm, ds, str(tmp_path))
    meta_path = os.path.join(cache.directory, "meta.json")
    with open(meta_path) as fh:
        meta = json.load(fh)
    meta["key"]["vfm"] = "someone-else"
    with open(meta_path, "w") as fh:
        json.dump(meta, fh)
    calls = vfm.calls
    fresh = _build(vfm, ds, str(tmp_path))
    assert vfm.calls > calls and fresh.key_fields["vfm"] == "fake-v1"


def test_bad_inputs(tmp_path) -> None:
    ds = Images()
    with pytest.raises(FeatureCacheError, match=r"not finite once stored as torch\.float16"):
        _build(FakeVFM(scale=1e6), ds, str(tmp_path), dtype="float16")
    assert not [d for d in os.listdir(tmp_path) if "partial" in d]  # no half-written cache left behind
    with pytest.raises(ValueError, match="dtype must be one of"):
        _build(FakeVFM(), ds, str(tmp_path), dtype="int8")
    with pytest.raises(TypeError, match="no fingerprint"):
        build_feature_cache(
            nn.Identity(), ds, dataset_name="toy", split="train", image_size=8, root=str(tmp_path)
        )


def test_with_index() -> None:
    ds = WithIndex(Images(4))
    image, label, index = ds[3]
    assert image.shape == (3, 8, 8) and label == 1 and index == 3 and len(ds) == 4
