"""A small CNN classifier trained on the dataset itself: the feature space for small domains.

Inception features mean little on 8x8 digits; a classifier of the domain gives a Fréchet
distance that tracks sample quality there (PAPER.md section 6). Features are the 64-d
penultimate activations.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FEATURE_DIM = 64


def build_classifier(in_channels: int, num_classes: int):  # noqa: ANN201 - torch is imported lazily
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(64 * 16, FEATURE_DIM),
        nn.ReLU(),  # features end here
        nn.Linear(FEATURE_DIM, num_classes),
    )


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    epochs: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 2e-3,
):  # noqa: ANN201
    """Train on float32 (N, C, H, W) in [-1, 1] with Adam; deterministic given ``seed``."""
    import torch

    torch.manual_seed(seed)
    model = build_classifier(images.shape[1], num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(batch_size):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def accuracy(model, images: np.ndarray, labels: np.ndarray) -> float:  # noqa: ANN001
    return float((predict(model, images) == labels).mean())


def predict(model, images: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """int64 (N,) predicted classes; buckets unconditional samples for per-class metrics."""
    import torch

    with torch.no_grad():
        return torch.cat([model(b).argmax(1) for b in torch.from_numpy(images).split(512)]).numpy().astype(np.int64)


def features(model, images: np.ndarray, batch_size: int = 512) -> np.ndarray:  # noqa: ANN001
    """float32 (N, 64) penultimate features of float32 (N, C, H, W) images in [-1, 1]."""
    import torch

    body = model[:-1]
    with torch.no_grad():
        return torch.cat([body(b) for b in torch.from_numpy(images).split(batch_size)]).numpy()


def save_classifier(model, path: Path, in_channels: int, num_classes: int) -> None:  # noqa: ANN001
    from safetensors.torch import save_file

    from dedt.store import atomic_path, atomic_write_text

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    atomic_write_text(path.with_suffix(".json"), json.dumps({"in_channels": in_channels, "num_classes": num_classes}))


def load_classifier(path: Path):  # noqa: ANN201
    from safetensors.torch import load_file

    meta = json.loads(path.with_suffix(".json").read_text())
    model = build_classifier(meta["in_channels"], meta["num_classes"])
    model.load_state_dict(load_file(str(path)))
    return model.eval()
