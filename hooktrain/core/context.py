"""What hooks receive: the build context, the run context and the per-epoch report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch

from hooktrain.run.files import resume_command

if TYPE_CHECKING:
    from hooktrain.config.recipe import Recipe
    from hooktrain.core.optim import Optimizer
    from hooktrain.core.state import TrainState
    from hooktrain.data.device import DeviceData


@attrs.frozen
class BuildContext:
    """What build hooks may base their pieces on.

    ``param_shapes`` maps the model's parameter names to shapes, in the order gradient
    transforms receive the parameters.
    """

    recipe: Recipe
    param_shapes: dict[str, torch.Size]
    steps_per_epoch: int
    optimizer: Optimizer

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

    ``epoch`` counts finished epochs (1 after the first); ``seconds`` is this epoch's wall time,
    training and evaluation together.
    """

    epoch: int
    step: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    seconds: float

    def to_dict(self) -> dict[str, float | int]:
        """The figures as a plain dict (for JSON and checkpoints)."""
        return attrs.asdict(self)


@attrs.frozen
class RunContext:
    """The run as events see it.

    ``out_dir`` is the run folder (plugins write there); ``config`` is the resolved, JSON-ready
    configuration; ``checkpoint_payload(state)`` returns everything a checkpoint must hold,
    every plugin's state included; ``echo`` prints a line for the user. ``tags`` are labels the
    caller gave the run (an ablation names its cell and varied settings there). Seeds trained
    together in lockstep are ``lanes`` runs, this one is number ``lane`` (from 0); each has
    its own folder and plugin instances. Under torchrun this process is ``rank`` of
    ``world_size``, each training a replica of the one model.
    """

    recipe: Recipe
    out_dir: Path
    device: torch.device
    data: DeviceData
    steps_per_epoch: int
    config: dict[str, Any]
    checkpoint_payload: Callable[[TrainState], dict[str, Any]]
    echo: Callable[[str], None]
    tags: dict[str, str] = attrs.field(factory=dict)
    lane: int = 0
    lanes: int = 1
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (rank 0 under torchrun, else always)."""
        return self.rank == 0

    @property
    def total_steps(self) -> int:
        """Steps in the whole run."""
        return self.recipe.epochs * self.steps_per_epoch

    @property
    def resume_command(self) -> str:
        """The command that continues this run from its last checkpoint."""
        return resume_command(self.out_dir, self.config, self.world_size > 1)
