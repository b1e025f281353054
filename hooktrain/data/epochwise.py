"""Augmentation pieces whose draws depend on the epoch and on which sample is which.

The chain calls an :class:`EpochAware` piece's ``draw_epoch`` in place of ``draw``, with the
:class:`Epoch`: its number, the run's seed and the order the epoch serves the samples in.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import attrs
import torch
from torch import Tensor

from hooktrain.data.augment import Draws, IndexMap, Shape, flip_map, remap, shape_of

__all__ = ["AlternatingFlip", "Epoch", "EpochAware"]


@attrs.frozen(eq=False)
class Epoch:
    """What a piece may draw from besides the generator: the epoch (0 for the first), the run's
    seed, and the epoch's order (``order[i]`` is the sample served i-th)."""

    number: int
    seed: int
    order: Tensor


@runtime_checkable
class EpochAware(Protocol):
    """A piece whose draws depend on the epoch and on which sample is which (airbench's
    alternating flip); the chain calls its ``draw_epoch`` in place of ``draw``."""

    train_only: ClassVar[bool]

    def draw_epoch(self, generator: torch.Generator, n: int, shape: Shape, epoch: Epoch) -> Draws:
        """The decisions for the epoch's `n` images, in the order `epoch.order` serves them."""
        ...

    def apply(self, images: Tensor, draws: Draws) -> Tensor: ...

    def output_shape(self, shape: Shape) -> Shape: ...


_FIRST_FLIP_SEED = 3_000_017  # its own offset from the run's seed


@attrs.frozen
class AlternatingFlip:
    """airbench's flip: every image is mirrored in every other epoch; which images start
    mirrored is random per image and per seed, fixed for the run.

    Over any two consecutive epochs every image is seen both ways, where independent random
    flips show a quarter of the images the same way twice. The first epoch's choice comes from
    the seed alone, so a resumed run or another process draws it again exactly; it consumes
    nothing of the epoch's generator.
    """

    train_only: ClassVar[bool] = True

    def output_shape(self, shape: Shape) -> Shape:
        return shape

    def draw_epoch(self, generator: torch.Generator, n: int, shape: Shape, epoch: Epoch) -> Draws:
        first = torch.Generator().manual_seed(epoch.seed + _FIRST_FLIP_SEED)
        starts_mirrored = torch.randint(0, 2, (n,), generator=first)
        return {"flip": starts_mirrored[epoch.order] ^ (epoch.number % 2)}

    def index_map(self, draws: Draws, shape: Shape) -> IndexMap:
        return flip_map(draws, shape)

    def apply(self, images: Tensor, draws: Draws) -> Tensor:
        return remap(images, None, flip_map(draws, shape_of(images)))
