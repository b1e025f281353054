"""Lookahead around any optimizer (Zhang et al. 2019, "Lookahead Optimizer: k steps forward,
1 step back")."""

from __future__ import annotations

from typing import Any

import attrs
import torch

from hooktrain.core.context import BuildContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.pieces import GradientTransform, Tensors
from hooktrain.core.plugin import Plugin, setting


def lookahead(k: int = 5, alpha: float = 0.5, name: str = "lookahead") -> GradientTransform:
    """A chain member after the optimizer: the optimizer moves the fast weights; every ``k``-th
    step the slow weights move ``alpha`` of the way to them and the fast weights restart there.

    Its state is the slow weights (the parameters at the start) and the count of steps taken.
    """

    def init(params: Tensors) -> dict[str, Any]:
        return {
            "slow": [p.detach().clone() for p in params],
            "count": torch.zeros((), dtype=torch.int64, device=params[0].device),
        }

    def update(
        updates: Tensors, state: dict[str, Any], params: Tensors, lr: torch.Tensor
    ) -> tuple[Tensors, dict[str, Any], dict[str, torch.Tensor]]:
        count = state["count"] + 1
        # A 0-d boolean picks the branch inside the tensors, so the step has no Python branch
        # on device values: it compiles to one graph and stays pure.
        sync = count % k == 0
        fast = torch._foreach_add(params, updates)
        pulled = torch._foreach_lerp(state["slow"], fast, alpha)
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
    ``k=5, alpha=0.5`` are its defaults. The slow weights and the step count are training
    state (``TrainState.transforms["lookahead"]``): checkpointed, resumed and kept per seed.
    """

    default_name = "lookahead"
    k: int = setting(5, lambda v: isinstance(v, int) and v >= 1, "a whole number, at least 1")
    alpha: float = setting(0.5, lambda v: 0 < v <= 1, "above 0 and at most 1")

    @hookimpl
    def hooktrain_gradient_transform(self, build: BuildContext) -> GradientTransform:
        return lookahead(self.k, self.alpha, self.name)
