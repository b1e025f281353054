"""A third-party hooktrain plugin: cross-entropy with label smoothing."""

from functools import partial

import attrs
import torch.nn.functional as F

from hooktrain import BuildContext, LossFn, Plugin, hookimpl


@attrs.define
class LabelSmoothing(Plugin):
    """Train with label-smoothed cross-entropy (Szegedy et al., 2016)."""

    default_name = "label_smoothing"
    smoothing: float = 0.1

    @hookimpl
    def hooktrain_loss(self, build: BuildContext) -> LossFn:
        return partial(F.cross_entropy, label_smoothing=self.smoothing)
