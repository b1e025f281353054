"""A third-party hooktrain package: the README's "Write a plugin" focal loss and per-class
accuracy, written from the README alone."""

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


@attrs.define
class PerClassAccuracy(Plugin):
    """Each class's test accuracy, from the outputs evaluation computes anyway."""

    default_name = "per_class_accuracy"
    _hits: dict = attrs.field(factory=dict, init=False)

    @hookimpl
    def hooktrain_eval_outputs(self, split, outputs, targets) -> None:
        classes = outputs.shape[1]
        hits = (outputs.argmax(1) == targets).float()
        counts = torch.stack(
            [
                torch.bincount(targets, hits, classes),
                torch.bincount(targets, torch.ones_like(hits), classes),
            ]
        )
        self._hits[split] = self._hits.get(split, 0) + counts

    @hookimpl
    def hooktrain_eval_metrics(self, run, state, split) -> dict[str, float]:
        hits, counts = self._hits.pop(split).tolist()
        accuracy = {
            f"class_{c}_accuracy": h / n
            for c, (h, n) in enumerate(zip(hits, counts, strict=True))
            if n
        }
        run.log({f"per_class/{split}_{k}": v for k, v in accuracy.items()}, state.step)
        return accuracy
