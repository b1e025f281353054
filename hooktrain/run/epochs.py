"""An epoch's end for a group of lanes: evaluation (the plugins' views, outputs and metrics),
the report, epoch_end, and the plugins' requests to stop."""

from __future__ import annotations

import torch

from hooktrain.core.context import EpochReport
from hooktrain.core.evaluate import LaneEvaluateFn, Observer
from hooktrain.core.plugin import implemented
from hooktrain.core.state import capture_global_rng
from hooktrain.data.device import DeviceData
from hooktrain.errors import HooktrainError
from hooktrain.run.folder import mark_finished
from hooktrain.run.lanes import Lane


def end_epoch(
    lanes: list[Lane],
    generators: list[torch.Generator],
    evaluate_all: LaneEvaluateFn,
    data: DeviceData,
    epoch: int,
) -> list[EpochReport]:
    """Evaluate each lane (on the epochs the recipe's ``eval_every`` asks for), emit epoch_end
    and return the reports; the state counts the epoch.

    Validation (with a ``val_split``) comes before test: the report names every metric by its
    split (``val_accuracy``, ``test_accuracy``, ``test_loss``), the plugins' own included.
    """
    global_rng = capture_global_rng(data.device)
    for lane, generator in zip(lanes, generators, strict=True):
        # The data generator has drawn this epoch's plan: its state now starts the next one.
        lane.state = lane.state.replace(
            epoch=epoch + 1, rng={"data": generator.get_state(), **global_rng}
        )
    evaluated = [
        lane.state.with_tensors(
            lane.manager.hook.hooktrain_eval_params(run=lane.run, state=lane.state) or {}
        )
        for lane in lanes
    ]
    metrics: list[dict[str, float]] = [{} for _ in lanes]
    recipe = lanes[0].run.recipe
    due = (epoch + 1) % recipe.eval_every == 0 or epoch + 1 == recipe.epochs
    for split in (("val", "test") if data.n_val else ("test",)) if due else ():
        figures = evaluate_all(evaluated, data.eval_batches(split), _observer(lanes, split))
        for lane, lane_metrics, lane_figures in zip(lanes, metrics, figures, strict=True):
            lane_figures = {**lane_figures, **_plugin_metrics(lane, split, lane_figures)}
            lane_metrics.update({f"{split}_{name}": value for name, value in lane_figures.items()})
    reports = []
    for lane, lane_metrics in zip(lanes, metrics, strict=True):
        report = EpochReport(
            epoch=epoch + 1,
            step=lane.state.step,
            train_loss=float(lane.progress.loss_sum) / data.steps_per_epoch,
            metrics=lane_metrics,
            seconds=lane.progress.seconds(),
        )
        # Checkpoints taken from here on are at an epoch boundary: nothing of an epoch is due.
        lane.progress.restart()
        lane.manager.hook.hooktrain_epoch_end(run=lane.run, state=lane.state, report=report)
        reports.append(report)
    return reports


def _observer(lanes: list[Lane], split: str) -> Observer | None:
    """Each evaluated batch's outputs to the lane's ``hooktrain_eval_outputs``, if any
    plugin listens (else evaluation hands no outputs out)."""
    if not any(implemented(lane.manager, "hooktrain_eval_outputs") for lane in lanes):
        return None

    def observe(index: int, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        lane = lanes[index]
        lane.manager.hook.hooktrain_eval_outputs(
            run=lane.run, state=lane.state, split=split, outputs=outputs, targets=targets
        )

    return observe


def _plugin_metrics(lane: Lane, split: str, task_figures: dict[str, float]) -> dict[str, float]:
    """The plugins' metrics of ``split``; a name the task (or another plugin) reports is
    refused."""
    found: dict[str, float] = {}
    answers = lane.manager.hook.hooktrain_eval_metrics(run=lane.run, state=lane.state, split=split)
    for answer in answers:
        for name, value in answer.items():
            if name in task_figures or name in found:
                raise HooktrainError(
                    f"Two sources report the {split} metric {name!r} (the task or another "
                    "plugin, and a plugin's hooktrain_eval_metrics); give the plugin's metric "
                    "a name of its own."
                )
            found[name] = float(value)
    return found


def stop_reason(lane: Lane, report: EpochReport) -> str | None:
    """What the lane's plugins say to stop the run for after this epoch, or None."""
    reasons = lane.manager.hook.hooktrain_should_stop(run=lane.run, state=lane.state, report=report)
    return "; ".join(reasons) if reasons else None


def finish(lane: Lane, report: EpochReport, reason: str | None) -> None:
    """Emit fit_end and mark the run finished (a plugin's stop ends it finished too)."""
    lane.manager.hook.hooktrain_fit_end(
        run=lane.run, state=lane.state, report=report, stop_reason=reason
    )
    if lane.run.is_main:
        mark_finished(lane.run.out_dir, lane.run.config, reason)
    if reason is not None:
        lane.run.echo(f"stopped after epoch {report.epoch}: {reason}")
