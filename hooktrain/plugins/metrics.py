"""TensorBoard curves, a console progress bar and ``metrics.json`` in the run folder."""

from __future__ import annotations

import json
import sys
import weakref
from collections.abc import Callable
from typing import Any, TextIO

import attrs
import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from torchvision.utils import make_grid
from tqdm import autonotebook, std
from tqdm.auto import tqdm

from hooktrain.config.registry import FIELDS
from hooktrain.core.context import EpochReport, RunContext, metric_text
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.plugin import Plugin, setting
from hooktrain.core.state import TrainState
from hooktrain.run.files import METRICS_FILE, TENSORBOARD_FOLDER, atomic_write

# Step metrics logged as their value at the logged step; the others as means over the window.
AT_STEP = frozenset({"lr"})
# The HPARAMS tab shows each run's latest value of these curves, so a stopped run has them too.
# Where output is a log file rather than a terminal, the bar prints a line this often at most.
LOG_INTERVAL = 30.0
# Bars of runs that failed stay open (no hook tells a plugin of a failure): the next run closes
# them, or its bar would be drawn below theirs.
_open_bars: weakref.WeakSet[tqdm] = weakref.WeakSet()


def _hparams(config: dict[str, Any], tags: dict[str, str]) -> dict[str, Any]:
    """The configuration and the run's tags, flattened to the scalars hparams accept.

    A plugin's presence reads ``"on"``, so a tag that says ``"off"`` compares with it.
    """
    flat: dict[str, Any] = {}
    for key, value in config["recipe"].items():
        references = value if key == "augment" else [value] if key in FIELDS else None
        if references is None:
            flat[key] = value
            continue
        flat[key] = ",".join(ref["label" if key == "augment" else "factory"] for ref in references)
        for ref in references:
            prefix = f"{key}.{ref['label']}" if key == "augment" else key
            flat.update({f"{prefix}.{name}": arg for name, arg in ref["args"].items()})
    for plugin in config["plugins"]:
        flat[plugin["name"]] = "on"
        for key, value in plugin["settings"].items():
            flat[f"{plugin['name']}.{key}"] = value
    flat.update(tags)
    return {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in flat.items()}


class _LogLines:
    """A log file's side of a progress bar: each redraw on a line of its own.

    tqdm redraws its line after a carriage return, which a log file (SLURM, CI) keeps as one
    ever longer line.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self._stream.write(line + "\n")

    def flush(self) -> None:
        self._stream.flush()


def _progress_bar(total: int, initial: int, description: str) -> tqdm:
    """A bar over the whole run, so its ETA is the run's: a widget in a notebook, a line
    redrawn in a terminal, a line every LOG_INTERVAL seconds in a log file.

    On stdout, with the run's other lines: stderr holds only the sentence of an error.
    """
    for stale in list(_open_bars):
        stale.close()
    options: dict[str, Any] = {"total": total, "initial": initial, "desc": description}
    if autonotebook.tqdm is not std.tqdm or sys.stdout.isatty():
        bar = tqdm(**options, unit="step", file=sys.stdout, dynamic_ncols=True)
    else:
        bar = tqdm(**options, unit="step", file=_LogLines(sys.stdout), mininterval=LOG_INTERVAL)
    _open_bars.add(bar)
    return bar


def _echo(run: RunContext, line: str) -> None:
    """``run.echo`` with any progress bar on the terminal cleared first and drawn again after."""
    with tqdm.external_write_mode():
        run.echo(line)


def _is_epoch_record(record: Any) -> bool:
    """Whether ``record`` is what :meth:`EpochReport.to_dict` writes: its fields, as numbers."""
    return (
        isinstance(record, dict)
        and list(record)[:3] == ["epoch", "step", "train_loss"]
        and list(record)[-1] == "seconds"
        and all(isinstance(k, str) for k in record)
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in record.values())
    )


def _log_start(writer: SummaryWriter, run: RunContext) -> None:
    """What a run's TensorBoard shows from its start: a batch, the config, its hparams."""
    if run.data.train.is_image:
        plan = run.data.epoch_plan(
            torch.Generator().manual_seed(run.recipe.seed), 0, run.recipe.seed
        )
        images, _ = run.data.train_batch(plan, 0)
        grid = make_grid(run.data.denormalize(images[:64]).float().cpu(), nrow=8)
        writer.add_image("train/augmented_batch", grid, 0)
    writer.add_text("config", f"```\n{json.dumps(run.config, indent=2)}\n```", 0)
    # At the start, so a run stopped or killed before its end is in the HPARAMS tab.
    experiment, session_start, _ = hparams(
        _hparams(run.config, run.tags), dict.fromkeys(f"test/{m}" for m in run.task.metric_names)
    )
    writer.file_writer.add_summary(experiment)
    writer.file_writer.add_summary(session_start)
    writer.flush()  # a checkpoint saved before the first flush skips this on resume


def _log_train(writer: SummaryWriter, figures: dict[str, float], step: int) -> None:
    for key, value in figures.items():
        writer.add_scalar(f"train/{key}", value, step)


def _log_epoch(writer: SummaryWriter, report: EpochReport, step: int) -> None:
    writer.add_scalar("epoch/train_loss", report.train_loss, step)
    for name, value in report.metrics.items():  # test_accuracy -> test/accuracy
        split, _, metric = name.partition("_")
        writer.add_scalar(f"{split}/{metric}", value, step)
    writer.add_scalar("epoch/seconds", report.seconds, step)
    writer.flush()


def _log_end(writer: SummaryWriter, run: RunContext) -> None:
    _, _, session_end = hparams(_hparams(run.config, run.tags), {})
    writer.file_writer.add_summary(session_end)
    writer.close()


@attrs.define
class Metrics(Plugin):
    """TensorBoard (losses, accuracy, lr, grad norm, a batch, hparams), progress bar, metrics.json.

    Step metrics stay on the device and are summed there; they are read (one host sync) every
    ``log_every`` steps and at each epoch's end. The progress bar counts the steps of the whole
    run; seeds trained together share the first seed's.
    """

    default_name = "metrics"
    main_process_only = True
    log_every: int = setting(25, lambda v: v >= 1, "at least 1")
    tensorboard: bool = True
    progress: bool = True
    history: list[dict[str, Any]] = attrs.field(factory=list, init=False)
    _writer: SummaryWriter | None = attrs.field(default=None, init=False)
    _pending: dict[str, torch.Tensor] = attrs.field(factory=dict, init=False)
    _window: int = attrs.field(default=0, init=False)
    _bar: tqdm | None = attrs.field(default=None, init=False)
    _run: RunContext | None = attrs.field(default=None, init=False)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        history = state.get("history", [])
        if not isinstance(history, list) or not all(map(_is_epoch_record, history)):
            raise TypeError("its history must be a list of epoch records")
        self.history = list(history)

    @hookimpl
    def hooktrain_fit_start(self, run: RunContext, state: TrainState) -> None:
        self._run = run
        if self.progress and run.lane == 0:
            # A resumed run starts the bar at the steps it has done.
            self._bar = _progress_bar(run.total_steps, state.step, self._epoch_label(run, state))
        if not self.tensorboard:
            return
        try:
            # purge_step drops events a killed process logged after the state we continue from.
            self._writer = SummaryWriter(run.out_dir / TENSORBOARD_FOLDER, purge_step=state.step)
        except OSError as error:
            self._tensorboard_failed(error)
            return
        if state.step == 0:
            self._log(lambda writer: _log_start(writer, run))

    def _log(self, write: Callable[[SummaryWriter], object]) -> None:
        """``write(writer)`` while TensorBoard is on; a write that fails (a full disk) turns it
        off for the rest of the run with one warning, and training goes on."""
        if self._writer is None:
            return
        try:
            write(self._writer)
        except OSError as error:
            self._tensorboard_failed(error)

    def _tensorboard_failed(self, error: OSError) -> None:
        self._writer = None
        if self._run is not None:
            _echo(
                self._run,
                f"warning: TensorBoard logging stopped ({error.strerror or error}); training "
                "goes on, and metrics.json and the checkpoints keep every epoch's figures.",
            )

    def _epoch_label(self, run: RunContext, state: TrainState) -> str:
        together = f" ({run.lanes} seeds)" if run.lanes > 1 else ""
        return f"epoch {state.epoch + 1}/{run.recipe.epochs}{together}"

    @hookimpl
    def hooktrain_epoch_start(self, run: RunContext, state: TrainState) -> None:
        if self._bar is not None:
            self._bar.set_description_str(self._epoch_label(run, state), refresh=False)

    @hookimpl
    def hooktrain_step_end(self, state: TrainState, metrics: dict[str, torch.Tensor]) -> None:
        for key, value in metrics.items():
            value = value.detach().float()
            if key in self._pending and key not in AT_STEP:
                value = self._pending[key] + value
            self._pending[key] = value
        self._window += 1
        if state.step % self.log_every == 0:
            self._flush(state.step)
        if self._bar is not None:
            self._bar.update(1)

    def _flush(self, step: int) -> None:
        """Read the pending step metrics (one host sync) and log them: the window means, and
        the values at ``step`` of the AT_STEP metrics."""
        if not self._window:
            return
        values = torch.stack(list(self._pending.values())).tolist()
        figures = {
            key: value if key in AT_STEP else value / self._window
            for key, value in zip(self._pending, values, strict=True)
        }
        self._pending, self._window = {}, 0
        self._log(lambda writer: _log_train(writer, figures, step))
        if self._bar is not None:
            shown = [f"{k} {figures[k]:.4g}" for k in ("loss", "lr", "grad_norm") if k in figures]
            # Drawn with the next update: a log file gets no line of its own for it.
            self._bar.set_postfix_str("  ".join(shown), refresh=False)

    # First at epoch end: the checkpoint saved after it holds this epoch's record.
    @hookimpl(tryfirst=True)
    def hooktrain_epoch_end(self, run: RunContext, state: TrainState, report: EpochReport) -> None:
        self._flush(state.step)
        self.history.append(report.to_dict())
        self._log(lambda writer: _log_epoch(writer, report, state.step))
        parts = [
            f"epoch {report.epoch}/{run.recipe.epochs}",
            f"train loss {report.train_loss:.4f}",
            *(metric_text(name, value) for name, value in report.metrics.items()),
            f"{report.seconds:.1f} s",
        ]
        _echo(run, "  ".join(parts))
        self._write_json(run, finished=False)

    @hookimpl
    def hooktrain_log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self._log(lambda writer: [writer.add_scalar(k, v, step) for k, v in scalars.items()])

    @hookimpl
    def hooktrain_fit_end(
        self, run: RunContext, report: EpochReport, stop_reason: str | None
    ) -> None:
        self._close_bar()
        self._write_json(run, finished=True, stop_reason=stop_reason)
        self._log(lambda writer: _log_end(writer, run))
        final = f"test_{run.task.target_metric}"
        figure = (
            metric_text(final, report.metrics[final])
            if final in report.metrics
            else "epoch not evaluated (eval_every)"
        )
        _echo(run, f"final {figure} ({self.wall_seconds():.1f} s of training and evaluation)")

    @hookimpl
    def hooktrain_fit_stop(self, state: TrainState) -> None:
        self._flush(state.step)
        self._close_bar()
        self._log(SummaryWriter.close)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def wall_seconds(self) -> float:
        """Seconds spent in all epochs of the run so far, across resumes."""
        return sum(epoch["seconds"] for epoch in self.history)

    def _write_json(self, run: RunContext, finished: bool, stop_reason: str | None = None) -> None:
        last = self.history[-1] if self.history else {}
        summary = {
            "recipe": run.recipe.name,
            "finished": finished,
            "stop_reason": stop_reason,
            "final_test_accuracy": last.get("test_accuracy") if finished else None,
            "final_test": (
                {k: v for k, v in last.items() if k.startswith("test_")} if finished else None
            ),
            "wall_seconds": self.wall_seconds(),
            "epochs": self.history,
            "config": run.config,
        }
        text = json.dumps(summary, indent=2) + "\n"
        path = run.out_dir / METRICS_FILE
        try:
            atomic_write(path, lambda file: file.write(text.encode()))
        except OSError as error:
            _echo(
                run,
                f"warning: could not write {path} ({error.strerror or error}); the one before "
                "is intact, the checkpoints keep every epoch's figures, and the next epoch "
                "tries again.",
            )
