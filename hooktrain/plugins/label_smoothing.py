"""Label smoothing: cross-entropy against targets mixed with the uniform distribution."""

from __future__ import annotations

from functools import partial

import attrs
import torch.nn.functional as F

from hooktrain.engine.context import BuildContext
from hooktrain.engine.hookspecs import hookimpl
from hooktrain.engine.pieces import LossFn
from hooktrain.engine.plugin import Plugin
from hooktrain.errors import HooktrainError


@attrs.define
class LabelSmoothing(Plugin):
    """Train with label-smoothed cross-entropy (Szegedy et al., 2016); 0.2 as fast ResNet-9s."""

    default_name = "label_smoothing"
    smoothing: float = attrs.field(default=0.2)

    @smoothing.validator
    def _in_range(self, attribute: attrs.Attribute, value: float) -> None:
        if not 0 <= value < 1:
            raise HooktrainError(
                f"label_smoothing.smoothing must be at least 0 and below 1, not {value!r}."
            )

    @hookimpl
    def hooktrain_loss(self, build: BuildContext) -> LossFn:
        return partial(F.cross_entropy, label_smoothing=self.smoothing)
