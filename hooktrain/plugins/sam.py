"""Sharpness-Aware Minimization (Foret et al., 2021): descend with the gradient taken at the
worst nearby weights, which seeks flat minima that generalise better."""

from __future__ import annotations

import math

import attrs
import torch

from hooktrain.core.context import BuildContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.pieces import GradientFn, NamedTensors
from hooktrain.core.plugin import Plugin, setting
from hooktrain.core.step import GradientWrapper

_EPSILON = 1e-12  # keeps a zero gradient from dividing by zero, as the reference code does


def sharpness_aware(rho: float) -> GradientWrapper:
    """SAM's two passes over the same batch, as a gradient wrapper.

    ``g`` is the gradient at the weights ``w``; ``e = rho * g / ||g||`` (the L2 norm of all
    gradients together) is the steepest ascent step of length ``rho``; the gradients returned
    are those at ``w + e``. The loss reported is the one at ``w``. The buffers returned are the
    first pass's, so BatchNorm's running statistics move once per step and only from the
    unperturbed weights, as common SAM implementations do (they disable the statistics'
    update in the second pass); the second pass starts from the same buffers as the first, so
    hooktrain's dropout draws the same masks in both.
    """

    def wrap(gradients: GradientFn) -> GradientFn:
        def sam_gradients(
            params: NamedTensors, buffers: NamedTensors, x: torch.Tensor, y: torch.Tensor
        ) -> tuple[NamedTensors, torch.Tensor, NamedTensors]:
            grads, loss, new_buffers = gradients(params, buffers, x, y)
            # Per-tensor norms stacked, not torch._foreach_norm: the step may run under vmap.
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])
            )
            scale = rho / (norm + _EPSILON)
            neighbour = {name: p + scale * grads[name] for name, p in params.items()}
            sharp_grads, _, _ = gradients(neighbour, buffers, x, y)
            return sharp_grads, loss, new_buffers

        return sam_gradients

    return wrap


@attrs.define
class SAM(Plugin):
    """Sharpness-Aware Minimization (Foret et al., 2021, "Sharpness-Aware Minimization for
    Efficiently Improving Generalization"): every step takes the gradient at the weights moved
    ``rho`` up the loss along the gradient, so the optimizer (any of them: SAM wraps the
    gradients, not the update) minimises the worst loss in a neighbourhood of radius ``rho``.

    Each step costs two forward and backward passes of the batch; the reported training loss
    is the one at the unperturbed weights, and BatchNorm statistics are updated once per step.
    """

    default_name = "sam"
    rho: float = setting(0.05, lambda v: 0 < v < math.inf, "a positive number")

    @hookimpl
    def hooktrain_wrap_gradients(self, build: BuildContext) -> GradientWrapper:
        return sharpness_aware(self.rho)
