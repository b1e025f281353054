"""Layers the built-in models share: conv-BN-ReLU blocks, residuals, scaling, seeded dropout."""

from __future__ import annotations

import torch
from torch import nn

from hooktrain.errors import HooktrainError


def conv_bn_relu(
    in_channels: int, out_channels: int, pool: bool = False, bias: bool = True
) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU, then 2x2 max-pooling if ``pool``.

    ``bias=False`` drops the convolution's bias, which the batch norm right after it cancels.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=bias),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


# splitmix64's constants as signed 64-bit integers (torch has no unsigned 64-bit arithmetic).
_GOLDEN_GAMMA = -7046029254386353131  # 0x9E3779B97F4A7C15
_MIX_1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX_2 = -7723592293110705685  # 0x94D049BB133111EB


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (``>>`` is arithmetic: it copies the sign bit)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def hashed_uniform(
    seed: torch.Tensor, counter: torch.Tensor, shape: torch.Size, shard: int = 0, shards: int = 1
) -> torch.Tensor:
    """Uniform floats in [0, 1) that are a pure function of ``(seed, counter, position)``.

    splitmix64's output function over a Weyl sequence: counter-based, so the same seed and
    counter give the same numbers on any device, alone or inside ``torch.func.vmap`` (where
    torch's generators cannot follow a seed per vmapped model). With ``shards`` > 1, ``shape``
    is the ``shard``-th of that many equal slices along the first dimension of a larger draw,
    and the numbers are that slice of it (a data-parallel replica's part of the global batch).
    """
    numel = shape.numel()
    positions = torch.arange(shard * numel, (shard + 1) * numel, device=seed.device).reshape(shape)
    z = seed + (counter * numel * shards + positions + 1) * _GOLDEN_GAMMA
    z = (z ^ _shift_right(z, 30)) * _MIX_1
    z = (z ^ _shift_right(z, 27)) * _MIX_2
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 40).to(torch.float32) * 2.0**-24


class Dropout(nn.Module):
    """Dropout whose randomness is module state, not the global generator.

    The mask is drawn from :func:`hashed_uniform` keyed by two buffers: ``seed`` (drawn from
    torch's generator when the module is built, so it follows the run's seed) and ``calls``
    (counts training forwards). Being buffers, they are part of the training state: a
    checkpoint resumes the exact masks, and seeds vmapped together draw the masks each would
    draw alone. A data-parallel replica sets ``shard``/``shards`` and draws its part of the
    global batch's mask, so N processes drop what one process would.
    """

    shard: int = 0
    shards: int = 1

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise HooktrainError(f"dropout must be at least 0 and below 1, not {p!r}.")
        self.p = p
        self.register_buffer("seed", torch.randint(0, 2**62, (), dtype=torch.int64))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = hashed_uniform(self.seed, self.calls, x.shape, self.shard, self.shards) >= self.p
        self.calls.add_(1)
        return x * keep.to(x.dtype) / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Scale(nn.Module):
    """Multiplies its input by a constant (the logit scale of fast ResNet-9s)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class Residual(nn.Module):
    """``x + block(x)``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def shard_randomness(model: nn.Module, shard: int, shards: int) -> None:
    """Make ``model``'s :class:`Dropout` layers draw the ``shard``-th of ``shards`` slices of
    the global batch's masks: what a data-parallel replica of a process among ``shards`` does."""
    for module in model.modules():
        if isinstance(module, Dropout):
            module.shard, module.shards = shard, shards
