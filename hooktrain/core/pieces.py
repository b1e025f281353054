"""The pure pieces that build hooks contribute and the engine composes into the step."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch
from torch import nn

LRSchedule = Callable[[torch.Tensor], torch.Tensor]
"""``schedule(step) -> lr``: 0-d int64 step index in, 0-d float learning rate out."""

GradientTransform = Callable[
    [list[torch.Tensor], list[torch.Tensor]], tuple[list[torch.Tensor], dict[str, torch.Tensor]]
]
"""``transform(grads, params) -> (grads, metrics)``, lists in parameter-name order."""

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(logits, targets) -> 0-d loss``."""


@attrs.frozen
class DecayRule:
    """Weight decay as a function of the parameter's name.

    ``rate_of(name)`` gives the decay rate of one parameter (0 for none); ``decoupled`` picks
    AdamW-style decay (shrink parameters by ``lr * rate``) over L2 added to the gradient.
    """

    rate_of: Callable[[str], float]
    decoupled: bool = False


@attrs.frozen
class Replicas:
    """How the step keeps data-parallel replicas (one per torchrun process) in agreement.

    ``average(tensors)`` returns the tensors' means over the replicas; the step calls it on the
    gradients, the loss and, when ``average_buffers``, the floating-point buffers (BatchNorm's
    running statistics), so every replica takes the same update and holds the same state.
    ``train_model(model)`` returns the module the step calls in training (same parameter and
    buffer names), e.g. one whose BatchNorm layers use the statistics of the global batch.
    """

    average: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    average_buffers: bool = True
    train_model: Callable[[nn.Module], nn.Module] = lambda model: model
