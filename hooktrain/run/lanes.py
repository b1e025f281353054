"""Lanes: the runs of a group of seeds trained in lockstep, one lane per seed, each with its
own plugins, run folder, state and epoch progress. A single run is a group of one."""

from __future__ import annotations

import copy
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import pluggy
import torch

from hooktrain.config.recipe import Recipe
from hooktrain.config.stored import recipe_to_config
from hooktrain.core.context import BuildContext, RunContext
from hooktrain.core.evaluate import EvaluateFn, LaneEvaluateFn
from hooktrain.core.plugin import make_plugin_manager
from hooktrain.core.state import TrainState
from hooktrain.core.step import Batch, LaneStepFn, StepFn
from hooktrain.core.task import Task
from hooktrain.core.transforms import Chain
from hooktrain.data.device import DeviceData
from hooktrain.errors import TrainingStopped
from hooktrain.models import shard_randomness
from hooktrain.run import checkpoints, distributed
from hooktrain.run.build import build_models, initial_params, load_plugin_states
from hooktrain.run.checks import check_usable
from hooktrain.run.distributed import Topology
from hooktrain.run.folder import write_config
from hooktrain.run.signals import StopRequest

# Under torchrun, how often the processes agree whether a signal asked them to stop.
STOP_AGREEMENT_STEPS = 5


@attrs.define
class EpochProgress:
    """The current epoch's running figures, kept in checkpoints taken inside an epoch.

    ``seconds_before`` is the epoch's wall time spent by earlier processes (a resumed run).
    """

    loss_sum: torch.Tensor
    seconds_before: float = 0.0
    started: float = attrs.field(factory=time.perf_counter)

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def restart(self) -> None:
        """Start a new epoch."""
        self.loss_sum = torch.zeros_like(self.loss_sum)
        self.seconds_before, self.started = 0.0, time.perf_counter()

    def to_dict(self) -> dict[str, float]:
        return {"loss_sum": float(self.loss_sum), "seconds": self.seconds()}


@attrs.define
class Lane:
    """One seed's run inside a group trained in lockstep: its own plugins, folder and state."""

    recipe: Recipe
    manager: pluggy.PluginManager
    run: RunContext
    state: TrainState
    progress: EpochProgress


@attrs.frozen
class LaneBuild:
    """What every lane of a run shares: the recipe, data, task, the model's facts, what build
    hooks saw, the gradient chain, config.json's run section and this process's place among
    processes."""

    recipe: Recipe
    data: DeviceData
    task: Task
    facts: dict[str, Any]
    context: BuildContext
    chain: Chain
    run_info: dict[str, Any]
    topology: Topology
    echo: Callable[[str], None]
    tags: dict[str, str] | None
    lanes: int


def make_lane(
    built: LaneBuild, index: int, seed: int, out_dir: Path, resume: dict[str, Any] | None
) -> Lane:
    """One seed's lane: fresh plugins, its initial (or resumed) state and its run folder's
    config.json, written by the main process (the folder is made and held by train_seeds)."""
    topology, device = built.topology, built.data.device
    # Fresh plugin instances: a recipe object can be trained many times in one process.
    recipe = attrs.evolve(
        built.recipe, seed=seed, plugins=tuple(copy.deepcopy(p) for p in built.recipe.plugins)
    )
    # Build hooks run in every process; events that write, in the main one only.
    builders = make_plugin_manager(recipe.plugins)
    model, _ = build_models(recipe, built.facts, device, builders)
    shard_randomness(model, topology.rank, topology.world_size)
    if resume is None:
        initial_params(builders, built.context, model, built.data)
    state = TrainState.create(model, built.chain, seed)
    progress = EpochProgress(torch.zeros((), device=device))
    if resume is not None:
        check_usable(resume, recipe, built.run_info)
        state = TrainState.from_dict(resume["state"], device)
        load_plugin_states(recipe.plugins, resume)
        saved = resume.get("progress", {"loss_sum": 0.0, "seconds": 0.0})
        progress = EpochProgress(torch.tensor(saved["loss_sum"], device=device), saved["seconds"])
    config = {**recipe_to_config(recipe), "run": built.run_info}
    if topology.is_main:
        checkpoints.remove_stale_temp_files(out_dir)
        write_config(out_dir, config)
    together = built.lanes > 1
    manager = make_plugin_manager(
        [p for p in recipe.plugins if topology.is_main or not p.main_process_only]
    )

    def log(scalars: dict[str, float], step: int) -> None:
        manager.hook.hooktrain_log_scalars(run=run, scalars=scalars, step=step)

    run = RunContext(
        recipe=recipe,
        out_dir=out_dir,
        device=device,
        data=built.data,
        task=built.task,
        steps_per_epoch=built.data.steps_per_epoch,
        config=config,
        checkpoint_payload=payload_writer(recipe, config, progress),
        echo=prefixed(built.echo, f"seed {seed}: ") if together else built.echo,
        tags=dict(built.tags or {}),
        lane=index,
        lanes=built.lanes,
        rank=topology.rank,
        world_size=topology.world_size,
        log=log,
        model=model,
    )
    return Lane(recipe, manager, run, state, progress)


def payload_writer(
    recipe: Recipe, config: dict[str, Any], progress: EpochProgress
) -> Callable[[TrainState], dict[str, Any]]:
    def checkpoint_payload(state: TrainState) -> dict[str, Any]:
        return {
            "format": checkpoints.FORMAT,
            "version": checkpoints.VERSION,
            "recipe": recipe.name,
            "config": config,
            "state": state.to_dict(),
            "plugins": {p.name: p.state_dict() for p in recipe.plugins},
            "progress": progress.to_dict(),
        }

    return checkpoint_payload


def prefixed(echo: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    return lambda line: echo(prefix + line)


def as_lane_step(step: StepFn) -> LaneStepFn:
    """A single run's step in the lane calling convention (lists of one)."""

    def lane_step(
        states: Sequence[TrainState], batches: Sequence[Batch]
    ) -> tuple[list[TrainState], list[dict[str, torch.Tensor]]]:
        state, metrics = step(states[0], batches[0])
        return [state], [metrics]

    return lane_step


def as_lane_evaluate(evaluate: EvaluateFn) -> LaneEvaluateFn:
    return lambda states, batches, observe=None: [evaluate(states[0], batches, observe)]


def stop_lanes(lanes: list[Lane], reason: str) -> None:
    """Emit fit_stop in every lane: the run stops before its end (a signal, stop_after_epoch)."""
    for lane in lanes:
        lane.manager.hook.hooktrain_fit_stop(run=lane.run, state=lane.state, reason=reason)


def stop_by_signal(lanes: list[Lane], number: int) -> None:
    """Stop the lanes for the signal ``number``; the process ends with that signal's code."""
    name = signal.Signals(number).name
    stop_lanes(lanes, name)
    state = lanes[0].state
    total = lanes[0].run.total_steps
    raise TrainingStopped(f"Stopped by {name} at step {state.step} of {total}", number)


def honour_stop(
    lanes: list[Lane], stop: StopRequest, device: torch.device, at_boundary: bool
) -> None:
    """Stop the run here if a signal asked for it.

    Under torchrun the processes agree first, at epoch ends and every
    ``STOP_AGREEMENT_STEPS`` steps (every process at the same steps, so they stop at one);
    a signal waits at most that many steps.
    """
    number = stop.signal_number
    if lanes[0].run.world_size > 1:
        if not (at_boundary or lanes[0].state.step % STOP_AGREEMENT_STEPS == 0):
            return
        number = distributed.agree_on_stop(number, device)
    if number is not None:
        stop_by_signal(lanes, number)
