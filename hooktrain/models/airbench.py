"""The network of airbench94 (Keller Jordan's CIFAR-10 speedrun, PyPI ``airbench`` 0.1.8).

A frozen 2x2 "whitening" convolution (its weights are set from training patches by the
``whitening`` plugin, its bias trains), then three groups of conv 3x3, max-pool 2, BatchNorm,
GELU, conv 3x3, BatchNorm, GELU, then a 3x3 max-pool, a linear layer without bias and the
logits scaled by 1/9. BatchNorm keeps its scale at 1 (only the bias trains) and follows the
batch closely (momentum 0.4, eps 1e-12); each convolution starts as a random one whose first
filters pass their input channels through (a partial identity, airbench's ``dirac_`` init).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from hooktrain.errors import HooktrainError
from hooktrain.models.layers import Scale

WHITEN_KERNEL = 2


def _identity_start(weight: torch.Tensor) -> None:
    """Make the first ``in_channels`` filters pass one input channel each (airbench's init)."""
    with torch.no_grad():
        nn.init.dirac_(weight[: weight.shape[1]])


class Whitening(nn.Module):
    """A convolution whose weight is a buffer (not trained) and whose bias is a parameter.

    ``2 * in_channels * kernel**2`` filters: the whitening plugin sets them to the eigenvectors
    of the training patches' covariance, scaled to unit variance, and their negatives.
    """

    def __init__(
        self, in_channels: int, kernel: int = WHITEN_KERNEL, random_bias: bool = False
    ) -> None:
        super().__init__()
        out_channels = 2 * in_channels * kernel**2
        weight = torch.empty(out_channels, in_channels, kernel, kernel)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Conv2d's default
        _identity_start(weight)
        self.register_buffer("weight", weight)
        bias = torch.zeros(out_channels)
        if random_bias:  # nn.Conv2d's default: uniform within 1 / sqrt(fan_in)
            bound = 1 / math.sqrt(in_channels * kernel**2)
            nn.init.uniform_(bias, -bound, bound)
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias)


class BiasBatchNorm(nn.BatchNorm2d):
    """BatchNorm with its scale fixed at 1: only the shift (bias) is a parameter.

    A BatchNorm2d (so data_parallel's SyncBatchNorm and swa's statistics recomputation treat it
    as one) without a weight: ``affine=False`` and a bias of its own, which forward applies.
    """

    def __init__(self, channels: int, momentum: float, eps: float = 1e-12) -> None:
        super().__init__(channels, eps=eps, momentum=momentum, affine=False)
        self.bias = nn.Parameter(torch.zeros(channels))


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 3, padding="same", bias=False)
    _identity_start(conv.weight)
    return conv


def _group(c_in: int, c_out: int, bn_momentum: float) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv1=_conv(c_in, c_out),
            pool=nn.MaxPool2d(2),
            norm1=BiasBatchNorm(c_out, bn_momentum),
            activ1=nn.GELU(),
            conv2=_conv(c_out, c_out),
            norm2=BiasBatchNorm(c_out, bn_momentum),
            activ2=nn.GELU(),
        )
    )


def airbench_net(
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 64,
    bn_momentum: float = 0.4,
    logit_scale: float = 1 / 9,
    head_std: float | None = None,
    random_whiten_bias: bool = False,
) -> nn.Sequential:
    """airbench94's network; the groups are ``width``, ``4 * width`` and ``4 * width`` wide
    (64, 256, 256 as airbench). ``bn_momentum`` is torch's: the weight of the batch in the
    running statistics (airbench's 0.6 is the weight of the old ones). ``head_std`` rescales
    the linear layer's initial weights to that standard deviation (airbench94_muon: 1, with
    ``logit_scale`` 1/256), None keeps nn.Linear's; ``random_whiten_bias`` starts the whitening
    bias as nn.Conv2d does instead of at zero (airbench94_muon)."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise HooktrainError(f"model.width must be a whole number of 1 or more, not {width!r}.")
    if not 0 < bn_momentum <= 1:
        raise HooktrainError(
            f"model.bn_momentum must be above 0 and at most 1, not {bn_momentum!r}."
        )
    if not (math.isfinite(logit_scale) and logit_scale > 0):
        raise HooktrainError(f"model.logit_scale must be above 0 and finite, not {logit_scale!r}.")
    if head_std is not None and not (math.isfinite(head_std) and head_std > 0):
        raise HooktrainError(f"model.head_std must be none or above 0, not {head_std!r}.")
    whiten = Whitening(in_channels, random_bias=random_whiten_bias)
    widths = (width, 4 * width, 4 * width)
    head = nn.Linear(widths[2], num_classes, bias=False)
    if head_std is not None:
        with torch.no_grad():
            head.weight.mul_(head_std / head.weight.std())
    return nn.Sequential(
        OrderedDict(
            whiten=whiten,
            activ=nn.GELU(),
            block1=_group(whiten.bias.shape[0], widths[0], bn_momentum),
            block2=_group(widths[0], widths[1], bn_momentum),
            block3=_group(widths[1], widths[2], bn_momentum),
            pool=nn.MaxPool2d(3),
            flatten=nn.Flatten(),
            head=head,
            scale=Scale(logit_scale),
        )
    )
