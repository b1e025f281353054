"""What hooks receive: the build context, the run context and the per-epoch report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import nn

from hooktrain.core.task import Classification, Task
from hooktrain.errors import HooktrainError
from hooktrain.run.files import resume_command

if TYPE_CHECKING:
    from hooktrain.config.recipe import Recipe
    from hooktrain.core.optim import Optimizer
    from hooktrain.core.pieces import ParamGroups
    from hooktrain.core.state import TrainState
    from hooktrain.data.device import DeviceData


@attrs.frozen
class BuildContext:
    """What build hooks may base their pieces on.

    ``param_shapes`` maps the model's parameter names to shapes, in the order gradient
    transforms receive the parameters. ``optimizer`` is the recipe's optimizer until a plugin
    claims the optimizer, then the claimant's; ``groups`` the parameter groups a plugin made
    (None without). ``task`` is the run's loss and metrics, ``facts`` what the model factory
    was told (``num_classes``, ``num_outputs``, ``input_shape``, ``in_channels``).
    """

    recipe: Recipe
    param_shapes: dict[str, torch.Size]
    steps_per_epoch: int
    optimizer: Optimizer
    task: Task = attrs.field(factory=Classification)
    facts: dict[str, Any] = attrs.field(factory=dict)
    groups: ParamGroups | None = None

    @property
    def param_names(self) -> tuple[str, ...]:
        """Parameter names in the order gradient transforms receive them."""
        return tuple(self.param_shapes)

    @property
    def total_steps(self) -> int:
        """Steps in the whole run (all epochs, not just what remains after a resume)."""
        return self.recipe.epochs * self.steps_per_epoch


@attrs.frozen
class EpochReport:
    """One epoch's figures, read from the device once, at the epoch's end.

    ``epoch`` counts finished epochs (1 after the first); ``metrics`` are the task's metrics of
    each evaluated split, named ``SPLIT_METRIC`` (``test_accuracy``, ``test_loss``, and
    ``val_accuracy`` with a validation split), empty for an epoch the recipe's ``eval_every``
    leaves unevaluated; ``seconds`` is this epoch's wall time, training and evaluation
    together.
    """

    epoch: int
    step: int
    train_loss: float
    metrics: dict[str, float]
    seconds: float

    def __getitem__(self, name: str) -> float:
        """The metric ``name`` (``report["test_accuracy"]``)."""
        return self.metrics[name]

    def to_dict(self) -> dict[str, float | int]:
        """The figures as one flat dict (for JSON and checkpoints)."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "train_loss": self.train_loss,
            **self.metrics,
            "seconds": self.seconds,
        }


@attrs.frozen
class Trained:
    """What a finished (or stopped) run gives back: its last epoch's report, its final state,
    and the model in eval mode holding the trained parameters and buffers."""

    report: EpochReport | None
    state: TrainState
    model: nn.Module


@attrs.frozen
class RunContext:
    """The run as events see it.

    ``out_dir`` is the run folder (plugins write there); ``config`` is the resolved, JSON-ready
    configuration; ``checkpoint_payload(state)`` returns everything a checkpoint must hold,
    every plugin's state included; ``echo`` prints a line for the user. ``tags`` are labels the
    caller gave the run (an ablation names its cell and varied settings there). Seeds trained
    together in lockstep are ``lanes`` runs, this one is number ``lane`` (from 0); each has
    its own folder and plugin instances. ``task`` is the run's loss and metrics. Under
    torchrun this process is ``rank`` of ``world_size``, each training a replica of the one
    model. ``model`` is that model as a shape (its tensors are not the state's: call it with
    ``torch.func.functional_call(run.model, (params, buffers), x)``; ``swa`` recomputes
    BatchNorm statistics so). ``log(scalars, step)`` sends a plugin's own figures to the run's
    loggers (the ``metrics`` plugin's TensorBoard), through the ``hooktrain_log_scalars`` hook.
    """

    recipe: Recipe
    out_dir: Path
    device: torch.device
    data: DeviceData
    task: Task
    steps_per_epoch: int
    config: dict[str, Any]
    checkpoint_payload: Callable[[TrainState], dict[str, Any]]
    echo: Callable[[str], None]
    tags: dict[str, str] = attrs.field(factory=dict)
    lane: int = 0
    lanes: int = 1
    rank: int = 0
    world_size: int = 1
    log: Callable[[dict[str, float], int], None] = lambda scalars, step: None
    model: nn.Module | None = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (rank 0 under torchrun, else always)."""
        return self.rank == 0

    @property
    def total_steps(self) -> int:
        """Steps in the whole run."""
        return self.recipe.epochs * self.steps_per_epoch

    @property
    def chosen_by(self) -> str:
        """The metric choices during the run go by (``best.pt``, early stopping): the task's
        target metric on validation with a ``val_split``, else on test."""
        split = "val" if self.recipe.val_split else "test"
        return f"{split}_{self.task.target_metric}"

    @property
    def reported_metrics(self) -> tuple[str, ...]:
        """The task's metrics every epoch reports, by split: ``val_*`` with a ``val_split``,
        then ``test_*`` (``val_accuracy``, ``test_accuracy``, ``test_loss``)."""
        splits = ("val", "test") if self.recipe.val_split else ("test",)
        return tuple(f"{split}_{name}" for split in splits for name in self.task.metric_names)

    def chosen_metric(self, plugin: str, setting: str, value: str) -> str:
        """The metric a plugin's ``setting`` names (``checkpoint.best_by``,
        ``early_stopping.metric``): ``auto`` is :attr:`chosen_by`; a name this run does not
        report is refused in a sentence listing those it does."""
        name = self.chosen_by if value == "auto" else value
        if name not in self.reported_metrics:
            raise HooktrainError(
                f"{plugin}.{setting} is {value!r}, which this run does not report; choose auto "
                f"or one of {', '.join(self.reported_metrics)} with --set {plugin}.{setting}=NAME."
            )
        return name

    def higher_is_better(self, metric: str) -> bool:
        """Whether a larger value of the reported ``metric`` is better: for the task's target
        metric as the task says; the built-in tasks' others are losses and errors (``loss``,
        ``mse``, ``mae``), which fall as a model improves, or scores (``top5``), which rise."""
        name = metric.partition("_")[2]
        if name == self.task.target_metric:
            return self.task.higher_is_better
        return name not in ("loss", "mse", "mae")

    @property
    def resume_command(self) -> str:
        """The command that continues this run from its last checkpoint."""
        return resume_command(self.out_dir, self.config, self.world_size > 1)


def metric_text(name: str, value: float) -> str:
    """A metric for people: ``test_accuracy`` 0.912 as "test accuracy 91.20%", others with four
    decimals ("test loss 0.3012")."""
    shown = f"{value:.2%}" if name.endswith(("accuracy", "_top5")) else f"{value:.4f}"
    return f"{name.replace('_', ' ')} {shown}"
