"""Stochastic weight averaging (Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima
and Better Generalization")."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import attrs
import torch
from torch import nn
from torch.func import functional_call

from hooktrain.core.context import RunContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.pieces import NamedTensors
from hooktrain.core.plugin import Plugin, check_saved_tensors, setting
from hooktrain.core.state import TrainState
from hooktrain.errors import HooktrainError
from hooktrain.run.distributed import sum_over_processes

COUNT = "num_batches_tracked"


def _batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics, by module name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
    }


@torch.no_grad()
def recompute_batchnorm(
    model: nn.Module,
    params: NamedTensors,
    buffers: NamedTensors,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> NamedTensors:
    """The BatchNorm statistics of ``model`` with ``params``, measured afresh on ``batches``.

    What ``torch.optim.swa_utils.update_bn`` does, as a function: every BatchNorm layer's
    running statistics start over and, with momentum None, become the plain average over one
    pass of the batches in train mode. Averaged weights need this: the statistics the
    training state holds belong to the weights they were measured with, not to their
    average. ``model`` serves as a shape only (a copy of it runs, its own tensors unused);
    ``buffers`` gives its other buffers and stays unchanged. Returns every BatchNorm layer's
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` by name (empty without
    BatchNorm).
    """
    model = copy.deepcopy(model)
    layers = _batchnorm_layers(model)
    if not layers:
        return {}
    fresh = {}
    for name, layer in layers.items():
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over the pass
        for buffer in ("running_mean", "running_var", COUNT):
            fresh[f"{name}.{buffer}"] = getattr(layer, buffer)
    # The pass updates the buffers it is given in place: copies, so ``buffers`` stay as they are.
    others = {name: b.clone() for name, b in buffers.items() if name not in fresh}
    model.train()
    for x, _ in batches:
        functional_call(model, (params, {**others, **fresh}), (x,))
    return fresh


def _pooled(statistics: NamedTensors) -> NamedTensors:
    """Each process's BatchNorm statistics of its share of the batches, pooled over the
    processes: a layer's statistics are means over the batches it saw, so weighing each
    process's by its count of batches gives what one process seeing every batch measures."""
    pooled = {}
    for name, value in statistics.items():
        layer, _, buffer = name.rpartition(".")
        if buffer == COUNT:
            pooled[name] = sum_over_processes(value.clone())
        else:
            count = statistics[f"{layer}.{COUNT}"]
            pooled[name] = sum_over_processes(value * count) / sum_over_processes(count.clone())
    return pooled


def _tensors(value: Any, what: str) -> dict[str, torch.Tensor]:
    if not (isinstance(value, dict) and all(isinstance(t, torch.Tensor) for t in value.values())):
        raise TypeError(f"its {what} must map names to tensors")
    return value


@attrs.define
class SWA(Plugin):
    """Evaluate the equal-weight average of the weights at the end of the last epochs.

    From epoch ``floor(start * epochs) + 1`` on (the last quarter by default), the weights at
    each epoch's end join a running average with equal weights (``AveragedModel``'s default),
    and evaluation scores the average with BatchNorm statistics recomputed for it by one pass
    over the training images, unaugmented (``update_bn``). Averaging points along the end of
    the trajectory finds a flatter, better-generalising solution than its last point (the
    paper: SGD's later iterates, at a high constant or cyclical learning rate; here the
    recipe's schedule). Training itself continues from the weights, not the average. The
    average, the epochs averaged and the recomputed statistics are kept in checkpoints, so a
    resumed run averages exactly as the uninterrupted one and ``hooktrain eval`` scores what
    the run scored. Before its first epoch the weights themselves are evaluated.
    """

    default_name = "swa"
    start: float = setting(0.75, lambda v: 0 <= v < 1, "at least 0 and below 1")
    _average: dict[str, torch.Tensor] | None = attrs.field(default=None, init=False)
    _count: int = attrs.field(default=0, init=False)
    # The BatchNorm statistics of the current average; None until measured for it.
    _statistics: dict[str, torch.Tensor] | None = attrs.field(default=None, init=False)

    def state_dict(self) -> dict[str, Any]:
        if self._average is None:
            return {}
        saved = {"average": self._average, "count": self._count}
        return saved if self._statistics is None else {**saved, "statistics": self._statistics}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        count = state.get("count", 0)
        if not (isinstance(count, int) and not isinstance(count, bool) and count >= 0):
            raise TypeError("its count of averaged epochs must be a whole number >= 0")
        average = state.get("average")
        if (average is None) != (count == 0):
            raise TypeError("its average and its count of averaged epochs disagree")
        statistics = state.get("statistics")
        self._average = None if average is None else _tensors(average, "average")
        self._statistics = None if statistics is None else _tensors(statistics, "statistics")
        self._count = count

    @hookimpl
    def hooktrain_fit_start(self, state: TrainState) -> None:
        if self._average is None:
            return
        # Resumed: the checkpoint's tensors come back on the CPU.
        self._check_fits(state)
        device = next(iter(state.params.values())).device
        self._average = {name: t.to(device) for name, t in self._average.items()}
        if self._statistics is not None:
            self._statistics = {name: t.to(device) for name, t in self._statistics.items()}

    # The weights at an epoch's end are those after its last step; evaluation comes before
    # epoch_end, so the average takes them here to be scored at this very epoch's end.
    @hookimpl
    def hooktrain_step_end(self, run: RunContext, state: TrainState) -> None:
        epochs_done, within = divmod(state.step, run.steps_per_epoch)
        if within or epochs_done <= int(self.start * run.recipe.epochs):
            return
        if self._average is None:
            self._average = {name: p.detach().clone() for name, p in state.params.items()}
        else:
            # average + (params - average) / (count + 1): AveragedModel's default on the CPU
            # (on CUDA it lerps by a float32 weight, which rounds float64 weights more).
            # New tensors, not in place: the average handed to evaluation (and the tensors a
            # checkpoint loaded it from) stay as they were.
            names = list(self._average)
            average = [self._average[n] for n in names]
            steps = torch._foreach_sub([state.params[n] for n in names], average)
            torch._foreach_div_(steps, self._count + 1)
            self._average = dict(zip(names, torch._foreach_add(average, steps), strict=True))
        self._count += 1
        self._statistics = None

    @hookimpl
    def hooktrain_eval_params(
        self, run: RunContext | None, state: TrainState
    ) -> dict[str, torch.Tensor] | None:
        if self._average is None:
            return None
        if run is not None and self._statistics is None:
            self._statistics = self._measure(run, state)
        return {**self._average, **(self._statistics or {})}

    def _measure(self, run: RunContext, state: TrainState) -> NamedTensors:
        """The average's BatchNorm statistics on this run's unaugmented training images."""
        if run.model is None:
            raise HooktrainError(
                f"The plugin {self.name!r} recomputes BatchNorm statistics with the run's "
                "model, but this run's context holds none; pass RunContext(model=...)."
            )
        devices = [run.device] if run.device.type == "cuda" else []
        # The pass in train mode may draw dropout masks from torch's generator: forked, the
        # training's draws stay those of a run without the pass (and of a resumed one).
        with torch.random.fork_rng(devices=devices):
            statistics = recompute_batchnorm(
                run.model, self._average, state.buffers, run.data.eval_batches("train")
            )
        # Under torchrun each process passed its share of the batches.
        return _pooled(statistics) if run.world_size > 1 else statistics

    def _check_fits(self, state: TrainState) -> None:
        """Refuse a saved average (or its statistics) that is not this model's."""
        check_saved_tensors(self, self._average or {}, state.params)
        check_saved_tensors(self, self._statistics or {}, state.buffers, every_name=False)
