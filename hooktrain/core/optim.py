"""Functional optimizers: each an (init, update) pair of pure functions over lists of tensors.

``update`` returns new tensors and never writes to its inputs, so the step that calls it is a
pure function. All arithmetic goes through ``torch._foreach_*`` ops, one kernel per op for all
parameters on a device, as ``torch.optim``'s foreach path does. The learning rate arrives as a
0-d tensor so a schedule that changes it every step never recompiles a compiled step.

Weight decay lives beside the optimizers rather than inside them (:func:`add_coupled_decay`,
:func:`apply_decoupled_decay`), so a plugin decides which parameters decay by name and the same
update serves Adam (coupled L2, as ``torch.optim.Adam(weight_decay=...)``) and AdamW (decoupled).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch

from hooktrain.errors import HooktrainError

if TYPE_CHECKING:
    from hooktrain.config.recipe import Recipe

OptState = dict[str, Any]
Tensors = list[torch.Tensor]


@attrs.frozen
class Optimizer:
    """A functional optimizer.

    ``init(params) -> opt_state``; ``update(grads, opt_state, params, lr) -> (params, opt_state)``.
    ``decoupled_decay`` says which weight-decay form the optimizer's name promises (AdamW).
    """

    name: str
    init: Callable[[Tensors], OptState]
    update: Callable[[Tensors, OptState, Tensors, torch.Tensor], tuple[Tensors, OptState]]
    decoupled_decay: bool = False


def _step_counter(params: Tensors) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=params[0].device)


def _one_minus_power(beta: float, steps: torch.Tensor) -> torch.Tensor:
    """``1 - beta**steps`` to float32 precision (as written, 1 - 0.999**t loses 2e-5 of it)."""
    return -torch.expm1(steps * (math.log(beta) if beta > 0 else -math.inf))


def adam(
    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, *, decoupled_decay: bool = False
) -> Optimizer:
    """Adam (Kingma & Ba), numerically as ``torch.optim.Adam``; AdamW with decoupled decay."""
    beta1, beta2 = betas

    def init(params: Tensors) -> OptState:
        return {
            "count": _step_counter(params),
            "exp_avg": [torch.zeros_like(p) for p in params],
            "exp_avg_sq": [torch.zeros_like(p) for p in params],
        }

    def update(
        grads: Tensors, state: OptState, params: Tensors, lr: torch.Tensor
    ) -> tuple[Tensors, OptState]:
        count = state["count"] + 1
        exp_avg = torch._foreach_lerp(state["exp_avg"], grads, 1 - beta1)
        exp_avg_sq = torch._foreach_mul(state["exp_avg_sq"], beta2)
        exp_avg_sq = torch._foreach_addcmul(exp_avg_sq, grads, grads, value=1 - beta2)
        steps = count.to(torch.float32)
        bias_correction1 = _one_minus_power(beta1, steps)
        bias_correction2_sqrt = torch.sqrt(_one_minus_power(beta2, steps))
        denom = torch._foreach_div(torch._foreach_sqrt(exp_avg_sq), bias_correction2_sqrt)
        denom = torch._foreach_add(denom, eps)
        direction = torch._foreach_div(exp_avg, denom)
        direction = torch._foreach_mul(direction, lr / bias_correction1)
        new_params = torch._foreach_sub(params, direction)
        return new_params, {"count": count, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    return Optimizer("adamw" if decoupled_decay else "adam", init, update, decoupled_decay)


def sgd(momentum: float = 0.9, nesterov: bool = True) -> Optimizer:
    """SGD with (Nesterov) momentum, numerically as ``torch.optim.SGD`` without dampening."""

    def init(params: Tensors) -> OptState:
        return {
            "count": _step_counter(params),
            "momentum_buffer": [torch.zeros_like(p) for p in params],
        }

    def update(
        grads: Tensors, state: OptState, params: Tensors, lr: torch.Tensor
    ) -> tuple[Tensors, OptState]:
        # torch.optim.SGD starts the buffer as a copy of the first gradient: the same as
        # momentum * 0 + grad, so a zero start needs no first-step branch.
        buffer = torch._foreach_add(torch._foreach_mul(state["momentum_buffer"], momentum), grads)
        direction = torch._foreach_add(grads, buffer, alpha=momentum) if nesterov else buffer
        new_params = torch._foreach_sub(params, torch._foreach_mul(direction, lr))
        return new_params, {"count": state["count"] + 1, "momentum_buffer": buffer}

    return Optimizer("sgd", init, update)


OPTIMIZER_NAMES = ("adam", "adamw", "sgd")


def make_optimizer(
    name: str, *, betas: tuple[float, float], eps: float, momentum: float, nesterov: bool
) -> Optimizer:
    """The optimizer a recipe names, with the recipe's hyperparameters."""
    if name == "adam":
        return adam(betas, eps)
    if name == "adamw":
        return adam(betas, eps, decoupled_decay=True)
    if name == "sgd":
        return sgd(momentum, nesterov)
    raise HooktrainError(
        f"Unknown optimizer {name!r}: set optimizer to one of {', '.join(OPTIMIZER_NAMES)}."
    )


# --------------------------------------------------------------------------------------------
# Weight decay, grouped by rate so each group is one foreach call
# --------------------------------------------------------------------------------------------

DecayGroups = tuple[tuple[float, tuple[int, ...]], ...]
"""``((rate, parameter indices), ...)`` for every non-zero rate."""


def group_by_rate(rates: Sequence[float]) -> DecayGroups:
    """Group parameter indices by decay rate, leaving out the parameters that do not decay."""
    groups: dict[float, list[int]] = {}
    for index, rate in enumerate(rates):
        if rate:
            groups.setdefault(rate, []).append(index)
    return tuple((rate, tuple(indices)) for rate, indices in groups.items())


def add_coupled_decay(grads: Tensors, params: Tensors, groups: DecayGroups) -> Tensors:
    """L2 decay: ``grad + rate * param`` for every decaying parameter."""
    grads = list(grads)
    for rate, indices in groups:
        decayed = torch._foreach_add(
            [grads[i] for i in indices], [params[i] for i in indices], alpha=rate
        )
        for i, grad in zip(indices, decayed, strict=True):
            grads[i] = grad
    return grads


def apply_decoupled_decay(params: Tensors, lr: torch.Tensor, groups: DecayGroups) -> Tensors:
    """AdamW decay: ``param * (1 - lr * rate)`` for every decaying parameter."""
    params = list(params)
    for rate, indices in groups:
        shrunk = torch._foreach_mul([params[i] for i in indices], 1 - lr * rate)
        for i, param in zip(indices, shrunk, strict=True):
            params[i] = param
    return params


def recipe_optimizer(recipe: Recipe) -> Optimizer:
    """The optimizer a recipe names, with its settings."""
    return make_optimizer(
        recipe.optimizer,
        betas=recipe.betas,
        eps=recipe.eps,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
    )
