"""Datasets for training: Fashion-MNIST, MNIST-5k, ImageNet-layout image folders, flips."""

from training.data.augment import RandomHFlip, WithFlips
from training.data.base import LabeledImages
from training.data.factory import DATASETS, FLIP_MODES, build_dataset
from training.data.grey_digits import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    GreyDigits,
    load_fashion_mnist,
    load_mnist5k,
    mnist5k_csv_path,
)
from training.data.image_folder import ImageFolder, read_class_index
from training.data.transforms import adm_center_crop, grey_to_rgb_padded, hflip, pil_to_tensor

__all__ = [
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FLIP_MODES",
    "GreyDigits",
    "ImageFolder",
    "LabeledImages",
    "RandomHFlip",
    "WithFlips",
    "adm_center_crop",
    "build_dataset",
    "grey_to_rgb_padded",
    "hflip",
    "load_fashion_mnist",
    "load_mnist5k",
    "mnist5k_csv_path",
    "pil_to_tensor",
    "read_class_index",
]
