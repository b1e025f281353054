"""Checkpoints: the last state every N epochs and at the end, and the best by test accuracy."""

from __future__ import annotations

from typing import Any

import attrs

from hooktrain.engine.checkpoints import copy_checkpoint, save_checkpoint
from hooktrain.engine.context import EpochReport, RunContext
from hooktrain.engine.hookspecs import hookimpl
from hooktrain.engine.plugin import Plugin
from hooktrain.engine.state import TrainState

CHECKPOINT_FOLDER = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"


@attrs.define
class Checkpoint(Plugin):
    """Save checkpoints/last.pt every N epochs and at the end, checkpoints/best.pt when best."""

    default_name = "checkpoint"
    every: int = 1
    best_accuracy: float = attrs.field(default=-1.0, init=False)

    def state_dict(self) -> dict[str, Any]:
        return {"best_accuracy": self.best_accuracy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_accuracy = state.get("best_accuracy", -1.0)

    # Last at epoch end: every other plugin has updated its state before it is saved.
    @hookimpl(trylast=True)
    def hooktrain_epoch_end(self, run: RunContext, state: TrainState, report: EpochReport) -> None:
        improved = report.test_accuracy > self.best_accuracy
        if improved:
            self.best_accuracy = report.test_accuracy
        due = state.epoch % self.every == 0 or state.epoch == run.recipe.epochs
        if not (due or improved):
            return
        payload = run.checkpoint_payload(state)
        folder = run.out_dir / CHECKPOINT_FOLDER
        if due:
            save_checkpoint(payload, folder / LAST)
        if improved and due:
            copy_checkpoint(folder / LAST, folder / BEST)
        elif improved:
            save_checkpoint(payload, folder / BEST)

    @hookimpl
    def hooktrain_fit_end(self, run: RunContext) -> None:
        run.echo(f"checkpoints: {run.out_dir / CHECKPOINT_FOLDER}")
