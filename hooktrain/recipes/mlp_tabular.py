"""Tabular regression with an MLP: an image's colour statistics from its 4x4 thumbnail.

The data source is the function below, in this recipe's own module: a recipe can bring its
data as plain code. From CIFAR-10 (``--data-dir``, as for the other recipes) it makes a table
of real measurements: the features of an image are its 4x4 average-pooled thumbnail, 48
numbers in [0, 1] (4x4 pixels, 3 channels), and its targets are the mean and the standard
deviation of each channel over the full 32x32 image, 6 numbers. The means follow from the
thumbnail exactly (a linear function of it); the standard deviations do not (the thumbnail
lost the detail inside each 8x8 block), so the network has to estimate them. Float targets
make it a regression: mean squared error, reported with the mean absolute error.

An MLP of two hidden layers of 64, no augmentation, Adam one-cycled up to 0.003 on batches of
500 for 10 epochs, L2 weight decay 1e-4 on the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from hooktrain.config.recipe import Recipe
from hooktrain.config.ref import Ref
from hooktrain.data.device import Splits
from hooktrain.data.in_memory import from_tensors
from hooktrain.data.sources import load_cifar10
from hooktrain.plugins.checkpoint import Checkpoint
from hooktrain.plugins.data_parallel import DataParallel
from hooktrain.plugins.metrics import Metrics
from hooktrain.plugins.nan_guard import NanGuard
from hooktrain.plugins.onecycle import OneCycle
from hooktrain.plugins.weight_decay import WeightDecay

THUMBNAIL = 4
_CHUNK = 5000  # images converted at a time: float64 copies of all 50,000 would take 1.2 GB


def colour_table(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, 48) and targets (N, 6) of uint8 (N, H, W, 3) images, float32: the
    thumbnail's pixels channel by channel, then each channel's mean and its standard deviation
    (population, over all H x W pixels), all on the [0, 1] scale; computed in float64."""
    features, targets = [], []
    for chunk in images.split(_CHUNK):
        pixels = chunk.permute(0, 3, 1, 2).to(torch.float64) / 255
        features.append(F.adaptive_avg_pool2d(pixels, THUMBNAIL).flatten(1))
        flat = pixels.flatten(2)
        targets.append(torch.cat([flat.mean(dim=2), flat.std(dim=2, correction=0)], dim=1))
    return torch.cat(features).float(), torch.cat(targets).float()


def cifar10_colour(data_dir: Path | None, echo: Callable[[str], None] = print) -> Splits:
    """CIFAR-10's train and test images as :func:`colour_table` rows (the labels unused)."""
    images = load_cifar10(data_dir, echo)
    return from_tensors(
        colour_table(images.train.inputs), colour_table(images.test.inputs), classes=None
    )


recipe = Recipe(
    name="mlp_tabular",
    model=Ref("mlp", hidden=(64, 64)),
    data=Ref(cifar10_colour),
    task=Ref("regression"),
    epochs=10,
    batch_size=500,
    optimizer="adam",
    max_lr=0.003,
    plugins=(
        DataParallel(),
        NanGuard(),
        OneCycle(pct_start=0.3),
        WeightDecay(rate=1e-4),
        Metrics(),
        Checkpoint(every=1),
    ),
)
