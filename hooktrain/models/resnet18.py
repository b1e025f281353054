"""ResNet-18 for small images: torchvision's network with a CIFAR-sized stem."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from hooktrain.errors import HooktrainError


class SmallImageResNet18(ResNet):
    """torchvision's ``ResNet`` (its blocks, ``_make_layer`` and forward) with a 3x3 stride-1
    stem and no max-pool, at ``width`` channels in the first stage (torchvision's is 64)."""

    def __init__(
        self, num_classes: int, in_channels: int, width: int, zero_init_residual: bool
    ) -> None:
        nn.Module.__init__(self)
        # What torchvision's ResNet.__init__ sets for _make_layer, with the stem changed.
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = width, 1, 1, 64
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(BasicBlock, width, 2)
        self.layer2 = self._make_layer(BasicBlock, 2 * width, 2, stride=2)
        self.layer3 = self._make_layer(BasicBlock, 4 * width, 2, stride=2)
        self.layer4 = self._make_layer(BasicBlock, 8 * width, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, num_classes)
        # torchvision's initialisation.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:  # after the loop above, which sets every BatchNorm's scale to 1
            for module in self.modules():
                if isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_impl(x)


def resnet18(
    num_classes: int = 10, in_channels: int = 3, width: int = 64, zero_init_residual: bool = False
) -> SmallImageResNet18:
    """``torchvision.models.resnet18`` (randomly initialised) adapted to 32x32 inputs.

    torchvision's stem (7x7 stride-2 convolution, then 3x3 stride-2 max-pooling) shrinks an
    ImageNet image by 4 before the first stage; at 32x32 that leaves 8x8 maps and loses about
    ten points of CIFAR-10 accuracy. Here the first convolution is 3x3 with stride 1 and the
    max-pool is gone, so the four stages see 32, 16, 8 and 4 pixels: the adaptation of the
    PyTorch Lightning CIFAR-10 baseline and of kuangliu/pytorch-cifar. ``width`` 64 is
    torchvision's network (same modules, same parameter names); a smaller one scales every
    stage, for quick runs. ``zero_init_residual`` starts each block's last BatchNorm at zero
    (torchvision's option). BatchNorm and no dropout, so seeds can train together.
    """
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HooktrainError(f"resnet18 needs {name} of 1 or more, not {value!r}.")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise HooktrainError(f"model.width must be a whole number of 1 or more, not {width!r}.")
    return SmallImageResNet18(num_classes, in_channels, width, bool(zero_init_residual))
