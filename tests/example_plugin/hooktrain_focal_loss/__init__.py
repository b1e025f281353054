"""A third-party hooktrain plugin: the focal loss."""

import attrs
import torch
import torch.nn.functional as F

from hooktrain import BuildContext, LossFn, Plugin, hookimpl


@attrs.define
class FocalLoss(Plugin):
    """Train with the focal loss (Lin et al., 2017): cross-entropy that down-weights easy images."""

    default_name = "focal_loss"
    gamma: float = 2.0

    @hookimpl
    def hooktrain_loss(self, build: BuildContext) -> LossFn:
        def focal_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            cross_entropy = F.cross_entropy(logits, labels, reduction="none")
            p_correct = torch.exp(-cross_entropy)
            return ((1 - p_correct) ** self.gamma * cross_entropy).mean()

        return focal_loss
