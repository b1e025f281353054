"""Gradient clipping by value (the seed's ``clip_grad_value_``) or by global norm."""

from __future__ import annotations

import math
from typing import Literal

import attrs
import torch

from hooktrain.core.context import BuildContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.pieces import GradientTransform
from hooktrain.core.plugin import Plugin, setting

Tensors = list[torch.Tensor]
FLOAT32_MAX = torch.finfo(torch.float32).max


def global_norm(grads: Tensors) -> torch.Tensor:
    """The L2 norm of all gradients together, as ``clip_grad_norm_`` measures it."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def clip_by_value(limit: float) -> GradientTransform:
    """Clamp every gradient element to ``[-limit, limit]``; report the pre-clip global norm."""

    def clip(grads: Tensors, params: Tensors) -> tuple[Tensors, dict[str, torch.Tensor]]:
        clipped = torch._foreach_clamp_max(torch._foreach_clamp_min(grads, -limit), limit)
        return clipped, {"grad_norm": global_norm(grads)}

    return GradientTransform.stateless("grad_clip", clip)


def clip_by_norm(max_norm: float) -> GradientTransform:
    """Scale all gradients down together so their global norm is at most ``max_norm``."""

    def clip(grads: Tensors, params: Tensors) -> tuple[Tensors, dict[str, torch.Tensor]]:
        norm = global_norm(grads)
        # The same epsilon and clamp as torch.nn.utils.clip_grad_norm_.
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return torch._foreach_mul(grads, scale), {"grad_norm": norm}

    return GradientTransform.stateless("grad_clip", clip)


@attrs.define
class GradClip(Plugin):
    """Clip gradients by value (default, 0.1 as the seed) or by global norm."""

    default_name = "grad_clip"
    # A float32 bound (clamping gradients converts it); inf turns clipping off.
    max: float = setting(
        0.1, lambda v: 0 < v <= FLOAT32_MAX or v == math.inf, "a positive float32 number or inf"
    )
    mode: Literal["value", "norm"] = "value"

    @hookimpl
    def hooktrain_gradient_transform(self, build: BuildContext) -> GradientTransform:
        member = clip_by_value(self.max) if self.mode == "value" else clip_by_norm(self.max)
        return attrs.evolve(member, name=self.name)
