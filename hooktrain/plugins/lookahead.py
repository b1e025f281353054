"""Lookahead around any optimizer (Zhang et al. 2019, "Lookahead Optimizer: k steps forward,
1 step back")."""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch

from hooktrain.core.context import BuildContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.pieces import GradientTransform, Tensors
from hooktrain.core.plugin import Plugin, setting


def lookahead(
    k: int = 5,
    alpha: float = 0.5,
    name: str = "lookahead",
    *,
    total_steps: int | None = None,
    ramp_power: float | None = None,
    end_on_slow: bool = False,
) -> GradientTransform:
    """A chain member after the optimizer: the optimizer moves the fast weights; every ``k``-th
    step the slow weights move ``alpha`` of the way to them and the fast weights restart there.

    With ``ramp_power`` the fraction falls over the run from 1 to ``alpha``, as
    ``1 - (1 - alpha) * (step / total_steps) ** ramp_power`` (airbench: the slow weights follow
    the fast ones at first and average more and more); with ``end_on_slow`` the last step of
    the run (``total_steps``) ends on the slow weights. Its state is the slow weights (the
    parameters at the start) and the count of steps taken.
    """
    if (ramp_power is not None or end_on_slow) and total_steps is None:
        raise ValueError("lookahead's ramp_power and end_on_slow need total_steps")

    def init(params: Tensors) -> dict[str, Any]:
        return {
            "slow": [p.detach().clone() for p in params],
            "count": torch.zeros((), dtype=torch.int64, device=params[0].device),
        }

    def fraction(count: torch.Tensor) -> torch.Tensor | float:
        if ramp_power is None:
            return alpha
        progress = count.to(torch.float32) / total_steps
        return 1 - (1 - alpha) * progress**ramp_power

    def update(
        updates: Tensors, state: dict[str, Any], params: Tensors, lr: torch.Tensor
    ) -> tuple[Tensors, dict[str, Any], dict[str, torch.Tensor]]:
        count = state["count"] + 1
        # 0-d booleans pick the branch inside the tensors, so the step has no Python branch
        # on device values: it compiles to one graph and stays pure.
        pull = count % k == 0
        sync = pull | (count == total_steps) if end_on_slow else pull
        fast = torch._foreach_add(params, updates)
        # At the last step without a pull the slow weights stay; the fast ones go to them.
        weight = torch.where(pull, fraction(count), 0.0) if end_on_slow else fraction(count)
        pulled = [torch.lerp(s, f, weight) for s, f in zip(state["slow"], fast, strict=True)]
        slow = [torch.where(sync, p, s) for p, s in zip(pulled, state["slow"], strict=True)]
        # Between syncs the updates pass untouched, so the fast weights are exactly the
        # optimizer's; at a sync they are what takes the parameters to the slow weights
        # (params + (slow - params), equal to slow up to one rounding).
        to_slow = torch._foreach_sub(slow, params)
        new_updates = [torch.where(sync, s, u) for s, u in zip(to_slow, updates, strict=True)]
        return new_updates, {"slow": slow, "count": count}, {}

    return GradientTransform(name, init, update, after_optimizer=True)


@attrs.define
class Lookahead(Plugin):
    """Lookahead: the optimizer takes ``k`` fast steps, then the weights step back to the slow
    weights moved ``alpha`` of the way towards the fast ones.

    Works with any optimizer (the recipe's, or ``lion``'s); it runs after the optimizer and
    after decoupled weight decay and parameter groups' rates, on the parameters' final updates.
    The paper reports faster, steadier convergence and less sensitivity to the learning rate;
    ``k=5, alpha=0.5`` are its defaults. airbench94 ramps the pull from 1 down to
    ``alpha=1-0.95**5`` with ``ramp_power=3`` and ends on the slow weights (``end_on_slow``).
    The slow weights and the step count are training state
    (``TrainState.transforms["lookahead"]``): checkpointed, resumed and kept per seed.
    """

    default_name = "lookahead"
    k: int = setting(5, lambda v: isinstance(v, int) and v >= 1, "a whole number, at least 1")
    alpha: float = setting(0.5, lambda v: 0 < v <= 1, "above 0 and at most 1")
    ramp_power: float | None = setting(
        None, lambda v: v is None or 0 < v < math.inf, "none or a positive number"
    )
    end_on_slow: bool = False

    @hookimpl
    def hooktrain_gradient_transform(self, build: BuildContext) -> GradientTransform:
        return lookahead(
            self.k,
            self.alpha,
            self.name,
            total_steps=build.total_steps,
            ramp_power=self.ramp_power,
            end_on_slow=self.end_on_slow,
        )
