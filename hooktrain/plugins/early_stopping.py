"""Early stopping: end the run once its chosen metric has stopped improving for some epochs."""

from __future__ import annotations

import math
from typing import Any

import attrs

from hooktrain.core.context import EpochReport, RunContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.plugin import Plugin, setting


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@attrs.define
class EarlyStopping(Plugin):
    """Stop the run when ``metric`` has not improved for ``patience`` epochs in a row.

    Training longer than the point where the held-out figures stop improving only costs time
    (and, without a ``val_split``, chooses by the test set: a ``val_split`` keeps the test
    figures honest). An epoch improves when its ``metric`` beats the best so far by more than
    ``min_delta``, in the metric's direction (as ``checkpoint`` judges ``best_by``: the task's
    target metric as the task says, losses and errors lower). ``auto`` is the task's target
    metric on validation with a ``val_split``, else on test (``run.chosen_by``). The run then
    ends finished after that epoch, with the reason in config.json and metrics.json. The best
    score and the count of epochs without improvement are kept in checkpoints, so a resumed
    run stops where the uninterrupted one would. Every process under torchrun evaluates the
    same figures, so all decide alike. With the recipe's ``eval_every``, only evaluated epochs
    count: ``patience`` is in evaluations.
    """

    default_name = "early_stopping"
    metric: str = setting("auto", lambda v: isinstance(v, str) and bool(v), "auto or a metric name")
    patience: int = setting(
        3, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "at least 1"
    )
    min_delta: float = setting(
        0.0, lambda v: _is_number(v) and 0 <= v < math.inf, "at least 0 (and finite)"
    )
    best: float | None = attrs.field(default=None, init=False)
    epochs_without_improvement: int = attrs.field(default=0, init=False)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "epochs_without_improvement": self.epochs_without_improvement}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        best = state.get("best")
        waited = state.get("epochs_without_improvement", 0)
        if best is not None and not _is_number(best):
            raise TypeError("its best score must be a number or None")
        if not (isinstance(waited, int) and not isinstance(waited, bool) and waited >= 0):
            raise TypeError("its count of epochs without improvement must be a whole number >= 0")
        self.best = None if best is None else float(best)
        self.epochs_without_improvement = waited

    @hookimpl
    def hooktrain_fit_start(self, run: RunContext) -> None:
        run.chosen_metric(self.name, "metric", self.metric)  # refuses one the run does not report

    # At epoch end, not in should_stop: checkpoint saves at epoch end (last), so the state it
    # keeps includes this epoch's figure and a resumed run counts on from it.
    @hookimpl
    def hooktrain_epoch_end(self, run: RunContext, report: EpochReport) -> None:
        name = run.chosen_metric(self.name, "metric", self.metric)
        if name not in report.metrics:  # an epoch the recipe's eval_every leaves unevaluated
            return
        score = report.metrics[name]
        if self._improves(score, run.higher_is_better(name)):
            self.best, self.epochs_without_improvement = score, 0
        else:
            self.epochs_without_improvement += 1

    @hookimpl
    def hooktrain_should_stop(self, run: RunContext) -> str | None:
        waited = self.epochs_without_improvement
        if waited < self.patience:
            return None
        name = run.chosen_metric(self.name, "metric", self.metric)
        unit = "evaluated epoch" if run.recipe.eval_every > 1 else "epoch"
        epochs = f"{waited} {unit}{'s' if waited != 1 else ''}"
        if self.best is None:
            return f"{name} was not a number for {epochs}"
        by = f" by more than {self.min_delta:g}" if self.min_delta else ""
        return f"{name} did not improve on {self.best:.4f}{by} for {epochs}"

    def _improves(self, score: float, higher_is_better: bool) -> bool:
        if math.isnan(score):  # never the best, as checkpoint judges best_by
            return False
        if self.best is None:
            return True
        if higher_is_better:
            return score > self.best + self.min_delta
        return score < self.best - self.min_delta
