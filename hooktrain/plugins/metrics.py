"""TensorBoard curves, a console progress bar and ``metrics.json`` in the run folder."""

from __future__ import annotations

import json
from typing import Any

import attrs
import click
import torch
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from hooktrain.engine.checkpoints import atomic_write
from hooktrain.engine.context import EpochReport, RunContext
from hooktrain.engine.hookspecs import hookimpl
from hooktrain.engine.plugin import Plugin, setting
from hooktrain.engine.state import TrainState

METRICS_FILE = "metrics.json"
TENSORBOARD_FOLDER = "tensorboard"


def _hparams(config: dict[str, Any], tags: dict[str, str]) -> dict[str, Any]:
    """The configuration and the run's tags, flattened to the scalars hparams accept.

    A plugin's presence reads ``"on"``, so a tag that says ``"off"`` compares with it.
    """
    flat: dict[str, Any] = dict(config["recipe"])
    for plugin in config["plugins"]:
        flat[plugin["name"]] = "on"
        for key, value in plugin["settings"].items():
            flat[f"{plugin['name']}.{key}"] = value
    flat.update(tags)
    return {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in flat.items()}


@attrs.define
class Metrics(Plugin):
    """TensorBoard (losses, accuracy, lr, grad norm, a batch, hparams), progress bar, metrics.json.

    Step metrics stay on the device and are summed there; they are read (one host sync) every
    ``log_every`` steps and at each epoch's end.
    """

    default_name = "metrics"
    main_process_only = True
    log_every: int = setting(25, lambda v: v >= 1, "at least 1")
    tensorboard: bool = True
    progress: bool = True
    history: list[dict[str, Any]] = attrs.field(factory=list, init=False)
    _writer: SummaryWriter | None = attrs.field(default=None, init=False)
    _sums: dict[str, torch.Tensor] = attrs.field(factory=dict, init=False)
    _window: int = attrs.field(default=0, init=False)
    _shown: str = attrs.field(default="", init=False)
    _bar: Any = attrs.field(default=None, init=False)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))

    @hookimpl
    def hooktrain_fit_start(self, run: RunContext, state: TrainState) -> None:
        if not self.tensorboard:
            return
        # purge_step drops events a killed process logged after the state we continue from.
        self._writer = SummaryWriter(run.out_dir / TENSORBOARD_FOLDER, purge_step=state.step)
        if state.step == 0:
            plan = run.data.epoch_plan(torch.Generator().manual_seed(run.recipe.seed))
            images, _ = run.data.train_batch(plan, 0)
            grid = make_grid(run.data.denormalize(images[:64]).float().cpu(), nrow=8)
            self._writer.add_image("train/augmented_batch", grid, 0)
            self._writer.add_text("config", f"```\n{json.dumps(run.config, indent=2)}\n```", 0)

    @hookimpl
    def hooktrain_epoch_start(self, run: RunContext, state: TrainState) -> None:
        # Seeds in lockstep share one bar: the first seed's.
        if self.progress and run.lane == 0:
            together = f" ({run.lanes} seeds)" if run.lanes > 1 else ""
            self._bar = click.progressbar(
                length=run.steps_per_epoch,
                label=f"epoch {state.epoch + 1}/{run.recipe.epochs}{together}",
                show_eta=True,
                item_show_func=lambda _: self._shown,
            )
            self._bar.__enter__()
            # A run resumed inside an epoch has done part of it.
            self._bar.update(state.step - state.epoch * run.steps_per_epoch)

    @hookimpl
    def hooktrain_step_end(self, state: TrainState, metrics: dict[str, torch.Tensor]) -> None:
        for key, value in metrics.items():
            value = value.detach().float()
            self._sums[key] = self._sums[key] + value if key in self._sums else value
        self._window += 1
        if state.step % self.log_every == 0:
            self._flush(state.step)
        if self._bar is not None:
            self._bar.update(1)

    def _flush(self, step: int) -> None:
        """Read the summed step metrics (one host sync) and log their window means."""
        if not self._window:
            return
        means = torch.stack(list(self._sums.values())).div(self._window).tolist()
        figures = dict(zip(self._sums, means, strict=True))
        self._sums, self._window = {}, 0
        if self._writer is not None:
            for key, value in figures.items():
                self._writer.add_scalar(f"train/{key}", value, step)
        self._shown = "  ".join(
            f"{key} {figures[key]:.4g}" for key in ("loss", "lr", "grad_norm") if key in figures
        )

    # First at epoch end: the checkpoint saved after it holds this epoch's record.
    @hookimpl(tryfirst=True)
    def hooktrain_epoch_end(self, run: RunContext, state: TrainState, report: EpochReport) -> None:
        self._flush(state.step)
        self._close_bar()
        self.history.append(report.to_dict())
        if self._writer is not None:
            self._writer.add_scalar("epoch/train_loss", report.train_loss, state.step)
            self._writer.add_scalar("test/loss", report.test_loss, state.step)
            self._writer.add_scalar("test/accuracy", report.test_accuracy, state.step)
            self._writer.add_scalar("epoch/seconds", report.seconds, state.step)
            self._writer.flush()
        run.echo(
            f"epoch {report.epoch}/{run.recipe.epochs}  train loss {report.train_loss:.4f}  "
            f"test loss {report.test_loss:.4f}  test accuracy {report.test_accuracy:.2%}  "
            f"{report.seconds:.1f} s"
        )
        self._write_json(run, finished=False)

    @hookimpl
    def hooktrain_fit_end(self, run: RunContext, report: EpochReport) -> None:
        self._write_json(run, finished=True)
        if self._writer is not None:
            metrics = {
                "hparam/test_accuracy": report.test_accuracy,
                "hparam/test_loss": report.test_loss,
            }
            self._writer.add_hparams(_hparams(run.config, run.tags), metrics, run_name=".")
            self._writer.close()
        run.echo(
            f"final test accuracy {report.test_accuracy:.2%} "
            f"({self.wall_seconds():.1f} s of training and evaluation)"
        )

    @hookimpl
    def hooktrain_fit_stop(self, run: RunContext, state: TrainState) -> None:
        self._flush(state.step)
        self._close_bar()
        if self._writer is not None:
            self._writer.close()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.render_progress()  # show the epoch's last window, not the one before
            self._bar.__exit__(None, None, None)
            self._bar = None

    def wall_seconds(self) -> float:
        """Seconds spent in all epochs of the run so far, across resumes."""
        return sum(epoch["seconds"] for epoch in self.history)

    def _write_json(self, run: RunContext, finished: bool) -> None:
        last = self.history[-1] if self.history else {}
        summary = {
            "recipe": run.recipe.name,
            "finished": finished,
            "final_test_accuracy": last.get("test_accuracy") if finished else None,
            "wall_seconds": self.wall_seconds(),
            "epochs": self.history,
            "config": run.config,
        }
        text = json.dumps(summary, indent=2) + "\n"
        atomic_write(run.out_dir / METRICS_FILE, lambda file: file.write(text.encode()))
