"""A chain of augmentation pieces: checked once, drawn per epoch, applied per batch.

Consecutive geometric pieces form one stage: their index maps compose, and the stage reads its
pixels in one gather, straight from the stored images when it comes first. RandomCrop followed
by RandomFlip thus costs one indexing call per batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from hooktrain.data.augment import (
    Augmentation,
    Draws,
    IndexMap,
    Normalize,
    remap,
)
from hooktrain.data.epochwise import Epoch, EpochAware
from hooktrain.errors import HooktrainError

__all__ = ["Chain"]


class Chain:
    """Augmentation pieces checked against one input's shape, drawn and applied in order."""

    pieces: tuple[Augmentation, ...]
    shapes: tuple[tuple[int, ...], ...]
    """The input shape of each piece, then the chain's output shape."""

    def __init__(self, pieces: Sequence[Augmentation], shape: tuple[int, ...]) -> None:
        self.pieces = tuple(pieces)
        shapes = [tuple(shape)]
        for position, piece in enumerate(self.pieces):
            _check_piece(self.pieces, position)
            shapes.append(tuple(piece.output_shape(shapes[-1])))  # type: ignore[arg-type]
        self.shapes = tuple(shapes)
        # A stage is a run of geometric pieces (their index maps, fused) or one other piece.
        self._stages: list[list[int]] = []
        self._maps: dict[int, Callable[[Draws, tuple[int, ...]], IndexMap]] = {}
        for position, piece in enumerate(self.pieces):
            geometric = callable(getattr(piece, "index_map", None))
            if geometric and self._stages and self._stages[-1][0] in self._maps:
                self._stages[-1].append(position)
            else:
                self._stages.append([position])
            if geometric:
                self._maps[position] = piece.index_map  # type: ignore[attr-defined]

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.shapes[-1]

    def for_evaluation(self) -> Chain:
        """The deterministic pieces alone; refused where they give another shape than training."""
        chain = Chain([p for p in self.pieces if not p.train_only], self.shapes[0])
        if chain.output_shape != self.output_shape:
            raise HooktrainError(
                f"Training images come out {self.output_shape} (height, width, channels) but "
                f"evaluation, which skips the random pieces, gives {chain.output_shape}; add a "
                "Resize to the training size, or keep the random pieces' output size."
            )
        return chain

    def draw(
        self, generator: torch.Generator, n: int, epoch: Epoch | None = None
    ) -> tuple[Draws, ...]:
        """Every piece's draws for `n` samples, in chain order, on the CPU `generator`;
        epoch-aware pieces also see `epoch` (by default the first epoch of seed 0, in order)."""
        epoch = epoch or Epoch(0, 0, torch.arange(n))
        draws = []
        for piece, shape in zip(self.pieces, self.shapes, strict=False):
            if isinstance(piece, EpochAware):
                drawn = piece.draw_epoch(generator, n, shape, epoch)  # type: ignore[arg-type]
            else:
                drawn = piece.draw(generator, n, shape)  # type: ignore[arg-type]
            _check_draws(piece, drawn, n)
            draws.append(drawn)
        return tuple(draws)

    def apply(self, source: Tensor, index: Tensor | None, draws: Sequence[Draws]) -> Tensor:
        """The batch ``source[index]`` (all of `source` for None) through every piece, given the
        batch's rows of each piece's draws."""
        images, pending = source, index
        for stage in self._stages:
            if stage[0] in self._maps:
                maps = [self._maps[i](draws[i], self.shapes[i]) for i in stage]
                images = remap(images, pending, functools.reduce(IndexMap.then, maps))
            else:
                images = images if pending is None else images[pending]
                images = self.pieces[stage[0]].apply(images, draws[stage[0]])
            pending = None
        return images if pending is None else images[pending]


def _check_piece(pieces: tuple[Augmentation, ...], position: int) -> None:
    piece = pieces[position]
    if not isinstance(piece, Augmentation | EpochAware) or isinstance(piece, type):
        raise HooktrainError(
            f"Augmentation piece {position + 1}, {piece!r}, is not an augmentation: it needs "
            "draw (or draw_epoch), apply and output_shape methods and a train_only flag."
        )
    if isinstance(piece, Normalize) and position < len(pieces) - 1:
        raise HooktrainError(
            f"Normalize must be the last augmentation piece, but "
            f"{type(pieces[position + 1]).__name__} follows it; move Normalize to the end."
        )


def _check_draws(piece: Augmentation, drawn: Draws, n: int) -> None:
    name = type(piece).__name__
    for key, value in drawn.items():
        if not (isinstance(value, Tensor) and value.device.type == "cpu" and value.ndim >= 1):
            raise HooktrainError(
                f"{name} drew {key!r} as {value!r:.60}, but draws must be CPU tensors with one "
                f"row per sample; fix its draw method."
            )
        if value.shape[0] != n:
            raise HooktrainError(
                f"{name} drew {value.shape[0]} rows of {key!r} for {n} samples; a draw needs one "
                "row per sample, fix its draw method."
            )
    if drawn and not piece.train_only:
        raise HooktrainError(
            f"{name} is deterministic (train_only is False) but draws {', '.join(drawn)}; mark "
            "it train_only or make it draw nothing."
        )
