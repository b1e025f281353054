"""Lion, the sign-of-momentum optimizer (Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms")."""

from __future__ import annotations

import attrs
import torch

from hooktrain.core.context import BuildContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.optim import Optimizer, OptState, Tensors
from hooktrain.core.plugin import Plugin, setting


def lion(betas: tuple[float, float] = (0.9, 0.99)) -> Optimizer:
    """Lion as a functional optimizer: ``update = -lr * sign(beta1 * m + (1 - beta1) * g)``,
    then ``m = beta2 * m + (1 - beta2) * g``.

    Every parameter moves by exactly ``lr`` per element and step (or not at all where the
    interpolation is zero), whatever the gradient's scale; the only state is the momentum ``m``,
    half of Adam's. Lion's decay is decoupled (``decoupled_decay``), as in the paper.
    """
    beta1, beta2 = betas

    def init(params: Tensors) -> OptState:
        return {"exp_avg": [torch.zeros_like(p) for p in params]}

    def update(
        grads: Tensors, state: OptState, params: Tensors, lr: torch.Tensor
    ) -> tuple[Tensors, OptState]:
        # lerp(m, g, 1 - beta) = beta * m + (1 - beta) * g: the direction interpolates with
        # beta1, the momentum kept for the next step with beta2 (the paper's two betas).
        direction = torch._foreach_sign(torch._foreach_lerp(state["exp_avg"], grads, 1 - beta1))
        exp_avg = torch._foreach_lerp(state["exp_avg"], grads, 1 - beta2)
        return torch._foreach_mul(direction, -lr), {"exp_avg": exp_avg}

    return Optimizer("lion", init, update, decoupled_decay=True)


def _betas_allowed(value: object) -> bool:
    return (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(isinstance(b, int | float) and 0 <= b < 1 for b in value)
    )


@attrs.define
class Lion(Plugin):
    """Train with Lion instead of the recipe's optimizer (whose ``optimizer`` field it ignores).

    Lion's update is the sign of an interpolation of the momentum and the gradient, so every
    weight moves by the full learning rate each step: its typical learning rate is 3 to 10
    times smaller than Adam's (``--set max_lr=...``), and, since decay is multiplied by the
    learning rate, its weight decay 3 to 10 times larger for the same strength. The
    ``weight_decay`` plugin's ``mode=auto`` decays decoupled under Lion (``p -= lr * rate * p``
    after the update), as the paper does. The chain printed at the start shows ``lion``.
    """

    default_name = "lion"
    betas: tuple[float, float] = setting(
        (0.9, 0.99), _betas_allowed, "two numbers, each at least 0 and below 1 (e.g. 0.9,0.99)"
    )

    @hookimpl
    def hooktrain_optimizer(self, build: BuildContext) -> Optimizer:
        return lion((float(self.betas[0]), float(self.betas[1])))
