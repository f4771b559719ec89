"""A small CNN that labels 32×32 RGB images, for the "conditional accuracy" of generated samples.

Class-conditional generation is judged by whether a sample of class c is recognised as c. The
classifier is trained on the real training set, saved as safetensors next to the default checkpoints,
and is deliberately tiny so it trains in minutes on a CPU.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of `SmallCNN`; stored in the safetensors metadata so a file rebuilds its own net."""

    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    widths: tuple[int, ...] = (16, 32, 64)


class SmallCNN(nn.Module):
    """Stages of conv-BN-ReLU ×2 then 2×2 max-pool, global average pool, linear head."""

    def __init__(self, cfg: ClassifierConfig = ClassifierConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        cin = cfg.in_channels
        for width in cfg.widths:
            for _ in range(2):
                layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                cin = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, cfg.num_classes)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B×C×S×S) → class logits (B×num_classes); centred on 0.5 for the convs."""
        c, s = self.cfg.in_channels, self.cfg.image_size
        if x01.ndim != 4 or tuple(x01.shape[1:]) != (c, s, s):
            raise ValueError(f"SmallCNN: expected images shaped B×{c}×{s}×{s}, got {tuple(x01.shape)}")
        return self.head(self.features(x01 - 0.5).mean(dim=(2, 3)))


def train_classifier(
    dataset: Dataset,
    steps: int,
    seed: int,
    batch_size: int = 128,
    lr: float = 3e-3,
    cfg: ClassifierConfig = ClassifierConfig(),
) -> SmallCNN:
    """Train a `SmallCNN` for ``steps`` minibatches of ``dataset`` (items: (image in [0,1], label)).

    AdamW with a one-cycle schedule (warm-up then cosine decay) converges in a few epochs without
    tuning. Everything random (init, order) comes from ``seed`` and does not touch the global RNG.
    Returns the model in eval mode.
    """
    if steps <= 0:
        raise ValueError(f"train_classifier: steps must be positive, got {steps}")
    if batch_size <= 0:
        raise ValueError(f"train_classifier: batch_size must be positive, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError("train_classifier: the dataset is empty")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(cfg)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=RandomSampler(dataset, generator=generator),
        drop_last=len(dataset) >= batch_size,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    step = 0
    while step < steps:
        for images, labels in loader:
            labels = torch.as_tensor(labels, dtype=torch.long)
            if labels.min() < 0 or labels.max() >= cfg.num_classes:
                raise ValueError(
                    f"train_classifier: labels must lie in [0, {cfg.num_classes}), got {labels.tolist()[:8]}…"
                )
            loss = F.cross_entropy(model(images.float()), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step == steps:
                break
    return model.eval()


@torch.no_grad()
def predict(model: SmallCNN, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted class per image (int64, B)."""
    model.eval()
    device = next(model.parameters()).device
    out = [
        model(images[i : i + batch_size].to(device, torch.float32)).argmax(dim=1).cpu()
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out)


def accuracy(model: SmallCNN, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of images whose predicted class equals the given label (e.g. the requested class)."""
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or images.shape[0] == 0:
        raise ValueError(
            f"accuracy: need a non-empty batch and one label per image, got {tuple(images.shape)} images "
            f"and {tuple(labels.shape)} labels"
        )
    return float((predict(model, images, batch_size) == labels.cpu().long()).float().mean())


def save_classifier(model: SmallCNN, path: str | os.PathLike) -> None:
    """Write the weights and the architecture (as JSON metadata) to one safetensors file."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.fspath(path), metadata={"classifier_config": json.dumps(asdict(model.cfg))})


def load_classifier(path: str | os.PathLike) -> SmallCNN:
    """Rebuild a classifier saved by `save_classifier` (safetensors: no code is unpickled)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classifier weights not found: {path}")
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata() or {}
    if "classifier_config" not in meta:
        raise ValueError(f"{path}: no 'classifier_config' metadata; not a file written by save_classifier")
    raw = json.loads(meta["classifier_config"])
    cfg = ClassifierConfig(**{**raw, "widths": tuple(raw["widths"])})
    model = SmallCNN(cfg)
    model.load_state_dict(load_file(path))
    return model.eval()
