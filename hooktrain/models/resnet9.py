"""ResNet-9, the network of the seed notebook."""

from __future__ import annotations

import math

from torch import nn

from hooktrain.errors import HooktrainError
from hooktrain.models.layers import Dropout, Residual, Scale, conv_bn_relu


def resnet9(
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 64,
    dropout: float = 0.0,
    conv_bias: bool = True,
    logit_scale: float = 1.0,
) -> nn.Sequential:
    """The ResNet-9 of the seed notebook; ``width`` scales every layer (64 is the original).

    conv 64, conv 128 + pool, residual(conv 128, conv 128), conv 256 + pool, conv 512 + pool,
    residual(conv 512, conv 512), 4x4 max-pool, dropout, linear. Fast variants drop the conv
    biases (``conv_bias=False``: batch norm cancels them, so their gradient is zero) and scale
    the logits down (``logit_scale=0.125``), which keeps early training from overconfidence.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise HooktrainError(f"model.width must be a whole number of 1 or more, not {width!r}.")
    if not (math.isfinite(logit_scale) and logit_scale > 0):
        raise HooktrainError(f"model.logit_scale must be above 0 and finite, not {logit_scale!r}.")
    w = width

    def block(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
        return conv_bn_relu(c_in, c_out, pool=pool, bias=conv_bias)

    head: list[nn.Module] = [
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        Dropout(dropout),
        nn.Linear(8 * w, num_classes),
    ]
    if logit_scale != 1:
        head.append(Scale(logit_scale))
    return nn.Sequential(
        block(in_channels, w),
        block(w, 2 * w, pool=True),
        Residual(nn.Sequential(block(2 * w, 2 * w), block(2 * w, 2 * w))),
        block(2 * w, 4 * w, pool=True),
        block(4 * w, 8 * w, pool=True),
        Residual(nn.Sequential(block(8 * w, 8 * w), block(8 * w, 8 * w))),
        nn.Sequential(*head),
    )
