"""One-cycle learning rate, stepped every batch (Smith & Topin, super-convergence)."""

from __future__ import annotations

import math
from typing import Literal

import attrs
import torch

from hooktrain.core.context import BuildContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.pieces import LRSchedule
from hooktrain.core.plugin import Plugin, setting
from hooktrain.errors import HooktrainError


def _anneal(kind: str, start: float, end: float, fraction: torch.Tensor) -> torch.Tensor:
    if kind == "cos":
        return end + (start - end) / 2 * (torch.cos(math.pi * fraction) + 1)
    return start + (end - start) * fraction


def onecycle_schedule(
    max_lr: float,
    total_steps: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal: str = "cos",
    three_phase: bool = False,
) -> LRSchedule:
    """The learning rate of ``torch.optim.lr_scheduler.OneCycleLR`` as a function of the step.

    Warm up from ``max_lr / div_factor`` to ``max_lr`` over ``pct_start`` of the steps, then
    anneal to ``max_lr / div_factor / final_div_factor`` (with ``three_phase``, first back
    down to the starting rate, symmetrically, then to the final one).
    """
    initial = max_lr / div_factor
    final = initial / final_div_factor
    warmup_end = pct_start * total_steps - 1
    if three_phase:
        # (last step of the phase, rate at its start, rate at its end)
        phases = [
            (warmup_end, initial, max_lr),
            (2 * pct_start * total_steps - 2, max_lr, initial),
            (total_steps - 1, initial, final),
        ]
    else:
        phases = [(warmup_end, initial, max_lr), (total_steps - 1, max_lr, final)]
    starts = [0.0] + [end for end, _, _ in phases[:-1]]
    if any(end <= start for start, (end, _, _) in zip(starts, phases, strict=True)):
        raise HooktrainError(
            f"onecycle needs more steps: {total_steps} steps with pct_start={pct_start} leave a "
            "phase of the cycle empty; train longer or change onecycle.pct_start."
        )

    def schedule(step: torch.Tensor) -> torch.Tensor:
        position = step.to(torch.float32)
        lr = None
        # Walk the phases backwards so the earliest phase whose end is not passed wins.
        for start, (end, begin_lr, end_lr) in reversed(list(zip(starts, phases, strict=True))):
            fraction = ((position - start) / (end - start)).clamp(0.0, 1.0)
            phase_lr = _anneal(anneal, begin_lr, end_lr, fraction)
            lr = phase_lr if lr is None else torch.where(position <= end, phase_lr, lr)
        return lr

    return schedule


@attrs.define
class OneCycle(Plugin):
    """One-cycle learning rate up to the recipe's max_lr, stepped every batch."""

    default_name = "onecycle"
    pct_start: float = setting(0.3, lambda v: 0 < v < 1, "above 0 and below 1")
    div_factor: float = setting(25.0, lambda v: 0 < v < math.inf, "a positive number")
    final_div_factor: float = setting(1e4, lambda v: 0 < v < math.inf, "a positive number")
    anneal: Literal["cos", "linear"] = "cos"
    three_phase: bool = False

    @hookimpl
    def hooktrain_lr_schedule(self, build: BuildContext) -> LRSchedule:
        return onecycle_schedule(
            build.recipe.max_lr,
            build.total_steps,
            self.pct_start,
            self.div_factor,
            self.final_div_factor,
            self.anneal,
            self.three_phase,
        )
