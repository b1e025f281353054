"""Models, used by the engine only as shapes for ``torch.func.functional_call``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hooktrain.errors import HooktrainError


def conv_bn_relu(in_channels: int, out_channels: int, pool: bool = False) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU, then 2x2 max-pooling if ``pool``."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """``x + block(x)``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def resnet9(num_classes: int = 10, width: int = 64, dropout: float = 0.0) -> nn.Sequential:
    """The ResNet-9 of the seed notebook; ``width`` scales every layer (64 is the original).

    conv 64, conv 128 + pool, residual(conv 128, conv 128), conv 256 + pool, conv 512 + pool,
    residual(conv 512, conv 512), 4x4 max-pool, dropout, linear.
    """
    w = width
    return nn.Sequential(
        conv_bn_relu(3, w),
        conv_bn_relu(w, 2 * w, pool=True),
        Residual(nn.Sequential(conv_bn_relu(2 * w, 2 * w), conv_bn_relu(2 * w, 2 * w))),
        conv_bn_relu(2 * w, 4 * w, pool=True),
        conv_bn_relu(4 * w, 8 * w, pool=True),
        Residual(nn.Sequential(conv_bn_relu(8 * w, 8 * w), conv_bn_relu(8 * w, 8 * w))),
        nn.Sequential(
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(8 * w, num_classes),
        ),
    )


MODELS: dict[str, Callable[..., nn.Module]] = {"resnet9": resnet9}


def build_model(name: str, num_classes: int, width: int, dropout: float) -> nn.Module:
    """The model a recipe names."""
    if name not in MODELS:
        raise HooktrainError(
            f"Unknown model {name!r}; set model to one of {', '.join(sorted(MODELS))}."
        )
    return MODELS[name](num_classes=num_classes, width=width, dropout=dropout)
