"""The pure pieces that build hooks contribute and the engine composes into the step."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch

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
