"""Evaluation metrics: reconstruction (PSNR, SSIM), Fréchet distances (named FD networks; FID only on
the user's InceptionV3 file), latent geometry (SSC, LPC, GSQ, eRank) and the label classifier for
conditional accuracy. Each module is importable on its own; heavy networks load only when built."""

from training.metrics.classifier import (
    ClassifierConfig,
    SmallCNN,
    accuracy,
    load_classifier,
    predict,
    save_classifier,
    train_classifier,
)
from training.metrics.frechet import (
    EfficientNetLite2Features,
    FeatureNetwork,
    GaussianStats,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_stats,
    image_set_frechet_distance,
)
from training.metrics.geometry import erank, foreground_masks, gsq, lpc, lpc_weights, ssc
from training.metrics.inception import FIDInceptionV3, FIDWeightsMissing, load_fid_inception
from training.metrics.recon import psnr, ssim

__all__ = [
    "ClassifierConfig",
    "EfficientNetLite2Features",
    "FIDInceptionV3",
    "FIDWeightsMissing",
    "FeatureNetwork",
    "GaussianStats",
    "SmallCNN",
    "accuracy",
    "erank",
    "feature_statistics",
    "foreground_masks",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gsq",
    "image_set_frechet_distance",
    "load_classifier",
    "load_fid_inception",
    "lpc",
    "lpc_weights",
    "predict",
    "psnr",
    "save_classifier",
    "ssc",
    "ssim",
    "train_classifier",
]
