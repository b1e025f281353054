"""Functional optimizers: each an (init, update) pair of pure functions over lists of tensors.

``update`` returns new tensors and never writes to its inputs, so the step that calls it is a
pure function. All arithmetic goes through ``torch._foreach_*`` ops, one kernel per op for all
parameters on a device, as ``torch.optim``'s foreach path does. The learning rate arrives as a
0-d tensor so a schedule that changes it every step never recompiles a compiled step.

``update`` returns the parameters' *updates* (new params = params + updates), so members of the
chain after the optimizer (decoupled weight decay, parameter groups' learning rates, Lookahead)
rewrite them as optax's transformations do (:mod:`hooktrain.core.transforms`). Weight decay
lives in that chain rather than in the optimizers, so a plugin decides which parameters decay by
name and the same update serves Adam (coupled L2) and AdamW (decoupled).
"""

from __future__ import annotations

import math
from collections.abc import Callable
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

    ``init(params) -> opt_state``; ``update(grads, opt_state, params, lr) -> (updates,
    opt_state)``, where the updates are what the parameters change by (already scaled by the
    learning rate, and negative for a descent). ``decoupled_decay`` says which weight-decay form
    the optimizer's name promises (AdamW).
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
        updates = torch._foreach_mul(direction, -lr / bias_correction1)
        return updates, {"count": count, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    return Optimizer("adamw" if decoupled_decay else "adam", init, update, decoupled_decay)


def momentum_direction(
    buffers: Tensors, grads: Tensors, momentum: float, nesterov: bool
) -> tuple[Tensors, Tensors]:
    """The step's direction and the new momentum buffers, as torch.optim.SGD without dampening
    computes them (Nesterov's look-ahead with ``nesterov``); SGD and Muon share it."""
    # torch.optim.SGD starts the buffer as a copy of the first gradient: the same as
    # momentum * 0 + grad, so a zero start needs no first-step branch.
    buffers = torch._foreach_add(torch._foreach_mul(buffers, momentum), grads)
    direction = torch._foreach_add(grads, buffers, alpha=momentum) if nesterov else buffers
    return direction, buffers


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
        direction, buffer = momentum_direction(state["momentum_buffer"], grads, momentum, nesterov)
        return torch._foreach_mul(direction, -lr), {
            "count": state["count"] + 1,
            "momentum_buffer": buffer,
        }

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


def recipe_optimizer(recipe: Recipe) -> Optimizer:
    """The optimizer a recipe names, with its settings."""
    return make_optimizer(
        recipe.optimizer,
        betas=recipe.betas,
        eps=recipe.eps,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
    )
