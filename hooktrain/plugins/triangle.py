"""A triangular learning rate: linear up to a peak, linear down (airbench's schedule)."""

from __future__ import annotations

import math

import attrs
import torch

from hooktrain.core.context import BuildContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.pieces import LRSchedule
from hooktrain.core.plugin import Plugin, setting
from hooktrain.errors import HooktrainError


def triangle_schedule(
    max_lr: float, total_steps: int, start: float, peak_at: float, end: float
) -> LRSchedule:
    """``max_lr`` times a piecewise-linear factor over the steps: ``start`` at step 0, 1 at step
    ``int(peak_at * total_steps)``, ``end`` at step ``total_steps``, as airbench's
    ``triangle()`` (step ``i`` trains with the factor at ``i``). ``peak_at=0`` is a linear
    decay from ``max_lr`` (airbench94_muon's schedule, with ``end=0``)."""
    peak = int(peak_at * total_steps)
    if not (peak > 0 or peak_at == 0) or not peak < total_steps:
        raise HooktrainError(
            f"triangle needs its peak inside the run: peak_at={peak_at} of {total_steps} "
            f"steps is step {peak}; train longer or move triangle.peak_at."
        )

    def schedule(step: torch.Tensor) -> torch.Tensor:
        position = step.to(torch.float32)
        falling = 1 + (end - 1) * (position - peak) / (total_steps - peak)
        if peak == 0:
            return max_lr * falling
        rising = start + (1 - start) * position / peak
        return max_lr * torch.where(position < peak, rising, falling)

    return schedule


@attrs.define
class Triangle(Plugin):
    """The learning rate rises linearly from ``start * max_lr`` to ``max_lr`` at ``peak_at`` of
    the run, then falls linearly to ``end * max_lr``; airbench94 uses 0.2, 0.23 and 0.07, and
    airbench94_muon ``peak_at=0, end=0`` (a linear decay to zero)."""

    default_name = "triangle"
    start: float = setting(0.2, lambda v: 0 <= v < math.inf, "0 or a positive number")
    peak_at: float = setting(0.23, lambda v: 0 <= v < 1, "at least 0 and below 1")
    end: float = setting(0.07, lambda v: 0 <= v < math.inf, "0 or a positive number")

    @hookimpl
    def hooktrain_lr_schedule(self, build: BuildContext) -> LRSchedule:
        return triangle_schedule(
            build.recipe.max_lr, build.total_steps, self.start, self.peak_at, self.end
        )
