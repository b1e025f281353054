"""Checkpoints: the last state every N epochs (and N steps), at the end and on Ctrl-C; the best."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

from hooktrain.core.context import EpochReport, RunContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.plugin import Plugin, setting
from hooktrain.core.state import TrainState
from hooktrain.errors import HooktrainError
from hooktrain.run.checkpoints import (
    copy_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
)
from hooktrain.run.files import CHECKPOINT_FOLDER

LAST = "last.pt"
PREVIOUS = "previous.pt"
BEST = "best.pt"


def _all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors.values()]).all())


@attrs.define
class Checkpoint(Plugin):
    """Save checkpoints/last.pt every ``every`` epochs, at the end and when the run is stopped.

    ``every_steps`` also saves it every that many steps inside epochs (0: never), so a killed
    run loses at most that many steps; resume continues mid-epoch exactly. Before last.pt is
    replaced, the one it held becomes previous.pt, the fallback if last.pt is ever damaged.
    best.pt is the state with the best ``best_by`` metric: ``auto`` is the task's target metric
    on validation with a ``val_split``, else on test (``run.chosen_by``: ``val_accuracy``,
    ``test_accuracy``, ``test_mse``), better as the task says. A state whose parameters are
    not finite is never saved. A save that fails (a full disk) is reported and retried at the
    next save; the files already there stay intact.
    """

    default_name = "checkpoint"
    main_process_only = True
    every: int = setting(1, lambda v: v >= 1, "at least 1")
    every_steps: int = setting(0, lambda v: v >= 0, "0 (off) or more")
    best_by: str = "auto"
    best_score: float | None = attrs.field(default=None, init=False)
    _failure: str | None = attrs.field(default=None, init=False)
    _saved_step: int = attrs.field(default=-1, init=False)

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        score = state.get("best_score")
        self.best_score = None if score is None else float(score)

    def _metric(self, run: RunContext) -> str:
        return run.chosen_metric(self.name, "best_by", self.best_by)

    def _improved(self, run: RunContext, report: EpochReport) -> bool:
        name = self._metric(run)
        score = report.metrics.get(name, math.nan)  # missing on an epoch not evaluated
        if score != score:  # NaN is never the best
            return False
        higher = run.higher_is_better(name)
        return self.best_score is None or (
            score > self.best_score if higher else score < self.best_score
        )

    @hookimpl
    def hooktrain_fit_start(self, run: RunContext, state: TrainState) -> None:
        self._metric(run)  # refuses a metric the run does not report
        self._saved_step = state.step
        remove_stale_temp_files(self._folder(run))

    # Last at every event: every other plugin has updated its state before it is saved.
    @hookimpl(trylast=True)
    def hooktrain_step_end(self, run: RunContext, state: TrainState) -> None:
        if (
            self.every_steps
            and state.step % self.every_steps == 0
            and state.step % run.steps_per_epoch != 0  # epoch ends are epoch_end's
            and self._savable(run, state)
        ):
            self._save_last(run, state)

    @hookimpl(trylast=True)
    def hooktrain_epoch_end(self, run: RunContext, state: TrainState, report: EpochReport) -> None:
        improved = self._improved(run, report)
        due = state.epoch % self.every == 0 or state.epoch == run.recipe.epochs
        if not (improved or due) or not self._savable(run, state):
            return
        best_saved = False
        if improved:
            self.best_score = report.metrics[self._metric(run)]
            # best.pt first: a process killed between the two files leaves the best state on
            # disk and last.pt one save behind (resume redoes those steps), never a stale best.
            best_saved = self._save(run, state, BEST)
        if due:
            self._save_last(run, state, self._folder(run) / BEST if best_saved else None)

    @hookimpl(trylast=True)
    def hooktrain_fit_stop(self, run: RunContext, state: TrainState) -> None:
        if state.step != self._saved_step and self._savable(run, state):
            self._save_last(run, state)

    @hookimpl(trylast=True)
    def hooktrain_fit_end(self, run: RunContext, state: TrainState) -> None:
        # A run a plugin stopped may end at an epoch that was not due for saving.
        if state.step != self._saved_step and self._savable(run, state):
            self._save_last(run, state)
        if self._failure is not None:
            redo = "the steps after it" if self._earlier(run) else "the run from its start"
            raise HooktrainError(
                f"The run finished but its last checkpoint could not be written "
                f"({self._failure}); {self._intact(run)}: make room and `hooktrain resume "
                f"{run.out_dir}` to redo {redo}."
            )
        run.echo(f"checkpoints: {self._folder(run)}")

    def _folder(self, run: RunContext) -> Path:
        return run.out_dir / CHECKPOINT_FOLDER

    def _savable(self, run: RunContext, state: TrainState) -> bool:
        """Whether ``state``'s parameters are finite (one host sync); says so when not."""
        if _all_finite(state.params):
            return True
        run.echo(
            f"warning: step {state.step}'s parameters are not finite numbers, so they were not "
            f"saved; {self._intact(run)}."
        )
        return False

    def _save_last(self, run: RunContext, state: TrainState, same_as: Path | None = None) -> None:
        """Rotate last.pt to previous.pt and save ``state`` as last.pt.

        ``same_as`` is a file already holding ``state``: last.pt then shares its bytes.
        """
        last = self._last(run)

        def rotate_and_save(path: Path) -> None:
            if last.is_file():
                copy_checkpoint(last, self._folder(run) / PREVIOUS)
            if same_as is not None:
                copy_checkpoint(same_as, path)
            else:
                save_checkpoint(run.checkpoint_payload(state), path)

        if self._write(run, state, LAST, rotate_and_save):
            self._saved_step = state.step

    def _save(self, run: RunContext, state: TrainState, name: str) -> bool:
        return self._write(
            run, state, name, lambda path: save_checkpoint(run.checkpoint_payload(state), path)
        )

    def _write(
        self, run: RunContext, state: TrainState, name: str, write: Callable[[Path], None]
    ) -> bool:
        """``write(path)`` for the file ``name``; a failure is told, remembered and survived."""
        path = self._folder(run) / name
        try:
            write(path)
        except OSError as error:
            self._failure = error.strerror or str(error)
            run.echo(
                f"warning: could not save step {state.step} to {path} ({self._failure}); "
                f"{self._intact(run)}, and the next save tries again."
            )
            return False
        self._failure = None
        return True

    def _last(self, run: RunContext) -> Path:
        return self._folder(run) / LAST

    def _earlier(self, run: RunContext) -> Path | None:
        """The checkpoint a resume would start from after a failed save, if any."""
        files = (self._folder(run) / name for name in (LAST, PREVIOUS, BEST))
        return next((path for path in files if path.is_file()), None)

    def _intact(self, run: RunContext) -> str:
        earlier = self._earlier(run)
        if earlier is not None:
            return f"the checkpoint saved before it is intact in {earlier}"
        return "no earlier checkpoint exists"
