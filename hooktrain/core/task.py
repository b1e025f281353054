"""Tasks: what a run learns, as its training loss and the metrics its evaluation reports.

A task turns the model's outputs and the targets into a training loss and into per-batch metric
sums. Evaluation adds the sums over batches (and processes) on the device and the task turns
the totals into the reported figures, so every task gets one host sync per split for free.
``metric_sums`` must be pure tensor work (it runs inside ``torch.func.vmap`` over seeds trained
together and inside ``torch.compile``): its only checks are on shapes and dtypes, which are
known without waiting for the device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

import attrs
import torch
import torch.nn.functional as F

from hooktrain.errors import HooktrainError


class Task(Protocol):
    """The loss and evaluation of a run. The built-ins are :class:`Classification` and
    :class:`Regression`; any object with these members is a task."""

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The metrics evaluation reports, known before training (settings that choose by a
        metric are checked against them); ``metric_sums`` returns one sum for each."""
        ...

    @property
    def target_metric(self) -> str:
        """The metric that says how good a run is (one of ``metric_names``)."""
        ...

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger ``target_metric`` is better."""
        ...

    def num_outputs(self, classes: Sequence[str], targets: torch.Tensor) -> int:
        """How many outputs per example the model needs, from the data's class names and its
        training targets."""
        ...

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch: a 0-d tensor."""
        ...

    def metric_sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """One 0-d tensor per name in ``metric_names``: the metric summed over the batch's
        examples. Pure tensor work, no host sync."""
        ...

    def metrics(self, sums: Mapping[str, float], count: int) -> dict[str, float]:
        """The reported figures from the sums over a whole split of ``count`` examples."""
        ...


def _means(names: tuple[str, ...], sums: Mapping[str, float], count: int) -> dict[str, float]:
    return {name: sums[name] / count for name in names}


def _at_least_one(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HooktrainError(
            f"task.{attribute.name} must be a whole number of at least 1, not {value!r}."
        )


@attrs.frozen
class Classification:
    """One class per example: outputs are (examples, classes) logits, targets class indices.

    Trains on mean cross-entropy. Reports ``loss`` (mean cross-entropy), ``accuracy`` and
    ``top{top_k}``: the share of examples whose class is among the ``top_k`` largest logits.
    With ``top_k`` classes or fewer every class is among them, so that figure is 1; its name
    stays the same whatever the data, so it can be chosen before the data is read.
    """

    top_k: int = attrs.field(default=5, validator=_at_least_one)
    target_metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True

    @property
    def metric_names(self) -> tuple[str, ...]:
        return ("loss", "accuracy", f"top{self.top_k}")

    def num_outputs(self, classes: Sequence[str], targets: torch.Tensor) -> int:
        if not classes:
            raise HooktrainError(
                "The classification task needs the names of the data's classes, and the data "
                "has none; give it a folder per class, or use the regression task."
            )
        if targets.is_floating_point():
            raise HooktrainError(
                f"The classification task needs one class index (a whole number) per example, "
                f"but the training targets are {targets.dtype} of shape {tuple(targets.shape)}; "
                "use the regression task for targets that are measurements."
            )
        return len(classes)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy against class indices, or against class probabilities of the
        outputs' shape (what mixup and cutmix make of the targets)."""
        if not (targets.is_floating_point() and targets.shape == outputs.shape):
            _check_classification(outputs, targets)
        return F.cross_entropy(outputs, targets)

    def metric_sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_classification(outputs, targets)
        top = outputs.topk(min(self.top_k, outputs.shape[1]), dim=1).indices
        return {
            "loss": F.cross_entropy(outputs, targets, reduction="sum"),
            "accuracy": (outputs.argmax(dim=1) == targets).sum(),
            f"top{self.top_k}": (top == targets[:, None]).any(dim=1).sum(),
        }

    def metrics(self, sums: Mapping[str, float], count: int) -> dict[str, float]:
        return _means(self.metric_names, sums, count)


def _check_classification(outputs: torch.Tensor, targets: torch.Tensor) -> None:
    if outputs.dim() != 2:
        raise HooktrainError(
            f"The classification task needs outputs of shape (examples, classes), but the "
            f"model gave shape {tuple(outputs.shape)}; give the model one output per class."
        )
    if targets.shape != outputs.shape[:1] or targets.is_floating_point():
        raise HooktrainError(
            f"The classification task needs one class index (a whole number) per example, but "
            f"the targets are {targets.dtype} of shape {tuple(targets.shape)} for outputs of "
            f"shape {tuple(outputs.shape)}; use the regression task for targets that are "
            "measurements."
        )


@attrs.frozen
class Regression:
    """One or more numbers per example: outputs (examples, K) against targets (examples,) when
    K is 1, else (examples, K).

    Trains on mean squared error. Reports ``loss`` (the mean squared error), ``mse`` and
    ``mae``, means over every target number.
    """

    target_metric: ClassVar[str] = "mse"
    higher_is_better: ClassVar[bool] = False
    metric_names: ClassVar[tuple[str, ...]] = ("loss", "mse", "mae")

    def num_outputs(self, classes: Sequence[str], targets: torch.Tensor) -> int:
        if targets.dim() not in (1, 2) or not targets.is_floating_point():
            raise HooktrainError(
                f"The regression task needs floating-point targets of shape (examples,) or "
                f"(examples, K), not {targets.dtype} of shape {tuple(targets.shape)}; use the "
                "classification task for class indices."
            )
        return 1 if targets.dim() == 1 else targets.shape[1]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(*_aligned(outputs, targets))

    def metric_sums(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs, targets = _aligned(outputs, targets)
        errors = (outputs - targets).reshape(len(outputs), -1)
        # Sums over examples of each example's mean: over a split, means over every number.
        squared = errors.square().mean(dim=1).sum()
        return {"loss": squared, "mse": squared, "mae": errors.abs().mean(dim=1).sum()}

    def metrics(self, sums: Mapping[str, float], count: int) -> dict[str, float]:
        return _means(self.metric_names, sums, count)


def _aligned(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs and targets of one shape, the targets in the outputs' dtype; else a sentence."""
    if outputs.dim() == 2 and targets.dim() == 1 and outputs.shape == (len(targets), 1):
        outputs = outputs.squeeze(1)
    if outputs.shape != targets.shape or not targets.is_floating_point():
        raise HooktrainError(
            f"The regression task needs outputs of shape (examples, K) and floating-point "
            f"targets of shape (examples, K), or (examples,) when K is 1; the model gave "
            f"{tuple(outputs.shape)} for {targets.dtype} targets of shape "
            f"{tuple(targets.shape)}. Give the model as many outputs as each example has "
            "targets."
        )
    return outputs, targets.to(outputs.dtype)


def check_metric(task: Task, name: str, setting: str) -> None:
    """Refuse in a sentence a ``setting`` that chooses by a metric ``task`` does not report."""
    if name not in task.metric_names:
        raise HooktrainError(
            f"{setting} chooses by the metric {name!r}, which the {type(task).__name__.lower()} "
            f"task does not report; choose one of {', '.join(task.metric_names)}."
        )
