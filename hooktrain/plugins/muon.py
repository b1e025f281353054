"""Muon, momentum orthogonalised by Newton-Schulz (Jordan et al. 2024), for convolution filters."""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import attrs
import torch

from hooktrain.core.context import BuildContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.optim import Optimizer, OptState, Tensors, momentum_direction
from hooktrain.core.plugin import Plugin, patterns, setting
from hooktrain.errors import HooktrainError

# The quintic's coefficients, chosen (by Muon's author) for the steepest slope at zero.
QUINTIC = (3.4445, -4.7750, 2.0315)


def newton_schulz(matrix: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """An approximate orthogonalisation of ``matrix`` (U S' V^T with S' near 1 for its SVD
    U S V^T), by ``steps`` quintic Newton-Schulz iterations in bfloat16, as Muon does."""
    a, b, c = QUINTIC
    x = matrix.bfloat16()
    x = x / (x.norm() + eps)  # the top singular value at most 1
    tall = matrix.shape[0] > matrix.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def muon(
    chosen: list[bool],
    fallback: Optimizer,
    momentum: float = 0.6,
    nesterov: bool = True,
    steps: int = 3,
    lr_scale: float = 1.0,
) -> Optimizer:
    """Muon on the parameters ``chosen`` marks, ``fallback`` on the others.

    Each chosen parameter keeps a momentum buffer; its direction (Nesterov's, with
    ``nesterov``) is reshaped to a matrix of one row per output and orthogonalised by
    :func:`newton_schulz`; the parameter is first rescaled to a norm of ``sqrt(rows)``
    (airbench94_muon's weight normalisation), then moves by ``lr * lr_scale`` times that
    direction. The fallback optimizer's updates are its own.
    """
    mine = [i for i, flag in enumerate(chosen) if flag]
    others = [i for i, flag in enumerate(chosen) if not flag]

    def pick(tensors: Tensors, indices: list[int]) -> Tensors:
        return [tensors[i] for i in indices]

    def init(params: Tensors) -> OptState:
        return {
            "momentum_buffer": [torch.zeros_like(p) for p in pick(params, mine)],
            "fallback": fallback.init(pick(params, others)),
        }

    def update(
        grads: Tensors, state: OptState, params: Tensors, lr: torch.Tensor
    ) -> tuple[Tensors, OptState]:
        directions, buffers = momentum_direction(
            state["momentum_buffer"], pick(grads, mine), momentum, nesterov
        )
        updates: dict[int, torch.Tensor] = {}
        for index, param, direction in zip(mine, pick(params, mine), directions, strict=True):
            shape = direction.shape
            orthogonal = newton_schulz(direction.reshape(shape[0], -1), steps).view(shape)
            normalised = param * (math.sqrt(shape[0]) / param.norm())
            moved = normalised - (lr * lr_scale) * orthogonal.to(param.dtype)
            updates[index] = moved - param
        fallback_updates, fallback_state = fallback.update(
            pick(grads, others), state["fallback"], pick(params, others), lr
        )
        updates.update(zip(others, fallback_updates, strict=True))
        return [updates[i] for i in range(len(params))], {
            "momentum_buffer": buffers,
            "fallback": fallback_state,
        }

    return Optimizer(f"muon+{fallback.name}", init, update)


@attrs.define
class Muon(Plugin):
    """Train the convolution filters with Muon and the other parameters with the recipe's
    optimizer (airbench94_muon: 94% on CIFAR-10 in 2.59 s on an A100, against 3.83 s for
    airbench94's SGD).

    ``include`` patterns (shell-style, over parameter names) choose Muon's parameters; without
    them every parameter of four dimensions (the convolution filters). Muon's learning rate is
    ``lr_scale`` times the schedule's, so ``max_lr`` can stay the other parameters'. Keep
    weight decay off Muon's parameters (airbench94_muon decays only the others).
    """

    default_name = "muon"
    momentum: float = setting(0.6, lambda v: 0 <= v < 1, "at least 0 and below 1")
    nesterov: bool = True
    steps: int = setting(3, lambda v: isinstance(v, int) and v >= 1, "a whole number, 1 or more")
    lr_scale: float = setting(1.0, lambda v: 0 < v < math.inf, "a positive number")
    include: tuple[str, ...] = patterns(())

    def chooses(self, name: str, ndim: int) -> bool:
        """Whether Muon trains the parameter ``name`` of ``ndim`` dimensions."""
        if self.include:
            return any(fnmatchcase(name, pattern) for pattern in self.include)
        return ndim == 4

    @hookimpl
    def hooktrain_optimizer(self, build: BuildContext) -> Optimizer:
        chosen = [self.chooses(n, len(shape)) for n, shape in build.param_shapes.items()]
        if not any(chosen) or all(chosen):
            raise HooktrainError(
                f"{self.name} chose {sum(chosen)} of the model's {len(chosen)} parameters; it "
                "needs some (the matrices or filters it orthogonalises) and leaves the rest to "
                f"the recipe's optimizer, so set {self.name}.include to match some of them."
            )
        return muon(
            chosen, build.optimizer, self.momentum, self.nesterov, self.steps, self.lr_scale
        )
