"""The event loop: a recipe built into lanes (one per seed), trained, evaluated, observed.

Synopsis (every event once per lane; the hookspecs say what each receives)::

    data, task, facts = device_data(recipe), build_task(recipe), model_facts(data, task)
    lanes = [make_lane(seed) for seed in seeds]     # state, plugins, run folder, config.json
    step = compose_pieces(plugins' build hooks)     # one pure step for all lanes
    fit_start
    for epoch in remaining epochs:
        epoch_start; plan = data.epoch_plan(generator)   # order and augmentation draws
        for index in remaining batches:
            states, metrics = step(states, data.train_batch(plan, index)); step_end
        evaluate val (with val_split) and test; epoch_end(report)
    fit_end, the run marked finished (or fit_stop when a signal or stop_after_epoch ends it)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from hooktrain.config.recipe import Recipe
from hooktrain.core.context import BuildContext, EpochReport, Trained
from hooktrain.core.evaluate import LaneEvaluateFn, build_evaluate, build_lane_evaluate
from hooktrain.core.optim import recipe_optimizer
from hooktrain.core.plugin import call_order, make_plugin_manager
from hooktrain.core.state import TrainState, capture_global_rng
from hooktrain.core.step import LaneStepFn, build_lane_step, build_step
from hooktrain.data.device import DeviceData
from hooktrain.errors import HooktrainError
from hooktrain.models import shard_randomness
from hooktrain.run import distributed
from hooktrain.run.build import (
    autocast_dtype_of,
    build_models,
    build_task,
    compose_pieces,
    device_data,
    load_splits,
    model_facts,
    resolve_device,
)
from hooktrain.run.checks import (
    check_data_parallel,
    check_resumable,
    check_vmappable,
    failures_in_words,
    lockstep_recipe,
)
from hooktrain.run.distributed import Topology
from hooktrain.run.environment import environment_info
from hooktrain.run.folder import hold_run_folders, mark_finished
from hooktrain.run.lanes import (
    Lane,
    LaneBuild,
    as_lane_evaluate,
    as_lane_step,
    honour_stop,
    make_lane,
    stop_lanes,
)
from hooktrain.run.signals import stop_on_signals


def train(
    recipe: Recipe,
    *,
    out_dir: Path | str,
    data_dir: Path | str | None = None,
    device: str = "auto",
    resume: dict[str, Any] | None = None,
    stop_after_epoch: int | None = None,
    echo: Callable[[str], None] = print,
    tags: dict[str, str] | None = None,
) -> Trained:
    """Train ``recipe``, writing into ``out_dir``; return the last epoch's report, the final
    state and the model holding the trained weights.

    ``resume`` is a loaded checkpoint of this run to continue from. ``stop_after_epoch`` ends
    this process after that many finished epochs (the run can be resumed later); fit_end is
    then not emitted. ``tags`` label the run for plugins (an ablation's cell, for instance).
    """
    (trained,) = train_seeds(
        recipe,
        [recipe.seed],
        out_dirs=[out_dir],
        data_dir=data_dir,
        device=device,
        resume=None if resume is None else [resume],
        stop_after_epoch=stop_after_epoch,
        echo=echo,
        tags=tags,
    )
    return trained


def train_seeds(
    recipe: Recipe,
    seeds: Sequence[int],
    *,
    out_dirs: Sequence[Path | str],
    data_dir: Path | str | None = None,
    device: str = "auto",
    resume: Sequence[dict[str, Any]] | None = None,
    stop_after_epoch: int | None = None,
    echo: Callable[[str], None] = print,
    tags: dict[str, str] | None = None,
) -> list[Trained]:
    """Train ``recipe`` once per seed, each into its own folder; return what each trained.

    Two or more seeds train in lockstep: one vmapped forward and backward for all of them per
    step (``torch.func``), while each seed keeps its own initialisation, data order,
    augmentation, dropout masks, plugins, run folder and checkpoints, so every folder is an
    ordinary run that ``hooktrain resume`` and ``hooktrain eval`` accept. ``resume`` holds one
    loaded checkpoint per seed, all at the same step.
    """
    if len(out_dirs) != len(seeds) or not seeds:
        raise ValueError("train_seeds needs one out_dir per seed, and at least one seed")
    out_dirs = [Path(out_dir) for out_dir in out_dirs]
    data_dir = None if data_dir is None else Path(data_dir)
    topology = Topology.from_environment()
    if topology.distributed:
        check_data_parallel(recipe, seeds)
    echo = topology.echo(echo)
    if resume is not None:
        check_resumable(recipe, out_dirs, resume, echo)
    torch_device = resolve_device(device, topology)
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    # The main process alone writes the run folders; holding them keeps other processes out.
    held = hold_run_folders(out_dirs if topology.is_main else [])
    failures = failures_in_words(torch_device, topology, out_dirs[0])
    with held, distributed.process_group(topology, backend), failures:
        return _train_lanes(
            recipe,
            seeds,
            out_dirs=out_dirs,
            data_dir=data_dir,
            device=device,
            torch_device=torch_device,
            topology=topology,
            resume=resume,
            stop_after_epoch=stop_after_epoch,
            echo=echo,
            tags=tags,
        )


def _train_lanes(
    recipe: Recipe,
    seeds: Sequence[int],
    *,
    out_dirs: Sequence[Path],
    data_dir: Path | None,
    device: str,
    torch_device: torch.device,
    topology: Topology,
    resume: Sequence[dict[str, Any]] | None,
    stop_after_epoch: int | None,
    echo: Callable[[str], None],
    tags: dict[str, str] | None,
) -> list[Trained]:
    """:func:`train_seeds` once this process knows its device and its place among processes."""
    together = len(seeds) > 1
    if together:
        recipe = lockstep_recipe(recipe, torch_device)
    task = build_task(recipe)
    # Seeds differ in initialisation and data order only: one data object serves them all.
    data = device_data(recipe, load_splits(recipe, data_dir, echo), torch_device, topology)
    if data.n_test == 0:
        raise HooktrainError(
            f"The test split of {data_dir or 'the data'} holds no examples, so the run could "
            "never be evaluated; add test examples."
        )
    facts = model_facts(data, task)
    optimizer = recipe_optimizer(recipe)
    run_info = {
        "data_dir": str(data_dir.resolve()) if data_dir else None,
        "device": device,
        "processes": topology.world_size,
        "recipe_file": recipe.source,
        # What resume checks a checkpoint against before loading data (see run.checkpoint_checks).
        "model_facts": facts,
        "steps_per_epoch": data.steps_per_epoch,
        "environment": environment_info(torch_device),
    }
    built = LaneBuild(
        recipe, data, task, facts, optimizer, run_info, topology, echo, tags, len(seeds)
    )
    lanes = [
        make_lane(built, index, seed, out_dir, None if resume is None else resume[index])
        for index, (seed, out_dir) in enumerate(zip(seeds, out_dirs, strict=True))
    ]
    # The first seed's modules serve as shapes for all: the states hold the numbers.
    model, eval_model = build_models(lanes[0].recipe, facts, torch_device)
    shard_randomness(model, topology.rank, topology.world_size)
    step_all, evaluate_all = _step_and_evaluate(built, lanes, model, eval_model)
    first = lanes[0].state
    torch.set_rng_state(first.rng["torch"])
    if "cuda" in first.rng and torch_device.type == "cuda":
        torch.cuda.set_rng_state(first.rng["cuda"], torch_device)
    _announce(recipe, data, topology, lanes, out_dirs, echo)
    reports = _fit(lanes, step_all, evaluate_all, data, recipe.epochs, stop_after_epoch)
    return [
        Trained(report, lane.state, _with_weights(eval_model, lane.state))
        for lane, report in zip(lanes, reports or [None] * len(lanes), strict=True)
    ]


def _with_weights(eval_model: nn.Module, state: TrainState) -> nn.Module:
    """A copy of the eval-mode model holding the state's parameters and buffers."""
    model = copy.deepcopy(eval_model)
    model.load_state_dict({**state.params, **state.buffers})
    return model


def _step_and_evaluate(
    built: LaneBuild, lanes: list[Lane], model: nn.Module, eval_model: nn.Module
) -> tuple[LaneStepFn, LaneEvaluateFn]:
    """The lanes' step and evaluation, composed from the first lane's plugins' pieces.

    Build hooks contribute pure pieces that do not depend on the seed, so they serve all lanes.
    """
    recipe, topology, device = built.recipe, built.topology, built.data.device
    autocast_dtype = autocast_dtype_of(recipe, device)
    context = BuildContext(
        recipe,
        {name: p.shape for name, p in model.named_parameters()},
        built.data.steps_per_epoch,
        built.optimizer,
    )
    manager = make_plugin_manager(lanes[0].recipe.plugins)
    pieces = compose_pieces(manager, context, model, autocast_dtype, built.task)
    first = lanes[0].state
    if topology.distributed:
        optimizer_tensors = [t for t in tree_leaves(first.opt_state) if isinstance(t, torch.Tensor)]
        distributed.agree_on_start(
            first.step, [*first.params.values(), *first.buffers.values(), *optimizer_tensors]
        )
    compiled = (recipe.compile, recipe.compile_mode)
    if len(lanes) > 1:
        check_vmappable(model)
        evaluate = build_lane_evaluate(
            eval_model, built.task, autocast_dtype, recipe.compile, recipe.tta_flip
        )
        return build_lane_step(pieces, *compiled), evaluate
    single = build_evaluate(
        eval_model,
        built.task,
        autocast_dtype,
        recipe.compile,
        recipe.tta_flip,
        distributed.sum_over_processes if topology.distributed else None,
    )
    return as_lane_step(build_step(pieces, *compiled)), as_lane_evaluate(single)


def _announce(
    recipe: Recipe,
    data: DeviceData,
    topology: Topology,
    lanes: list[Lane],
    out_dirs: Sequence[Path],
    echo: Callable[[str], None],
) -> None:
    """Say what will train where, and the order plugins run in."""
    together = len(lanes) > 1
    seeds_text = f" x {len(lanes)} seeds together" if together else ""
    if topology.distributed:
        seeds_text = (
            f" ({topology.world_size} processes x {recipe.batch_size // topology.world_size})"
        )
    held_out = f", {data.n_val} held out for validation" if data.n_val else ""
    echo(
        f"{recipe.name}: {recipe.epochs} epochs x {data.steps_per_epoch} steps of "
        f"{recipe.batch_size}{seeds_text} on {data.device} ({data.n_train} training examples"
        f"{held_out}), run folder{'s' if together else ''} {', '.join(str(d) for d in out_dirs)}"
    )
    echo("plugins: " + (" -> ".join(p.name for p in recipe.plugins) or "none"))
    epoch_end_order = call_order(lanes[0].manager, "hooktrain_epoch_end")
    echo("at epoch end: " + (" -> ".join(epoch_end_order) or "none"))


def _fit(
    lanes: list[Lane],
    step_all: LaneStepFn,
    evaluate_all: LaneEvaluateFn,
    data: DeviceData,
    epochs: int,
    stop_after_epoch: int | None,
) -> list[EpochReport]:
    """The loop over epochs and steps, emitting every event once per lane."""
    with stop_on_signals() as stop:
        for lane in lanes:
            lane.manager.hook.hooktrain_fit_start(run=lane.run, state=lane.state)
        reports: list[EpochReport] = []
        for epoch in range(lanes[0].state.epoch, epochs):
            # A run resumed from a checkpoint taken inside an epoch continues where it was.
            first_batch = _batches_done(lanes[0].state, data.steps_per_epoch)
            for lane in lanes:
                lane.progress.started = time.perf_counter()
                lane.manager.hook.hooktrain_epoch_start(run=lane.run, state=lane.state)
            generators = [torch.Generator() for _ in lanes]
            for generator, lane in zip(generators, lanes, strict=True):
                generator.set_state(lane.state.rng["data"])
            plans = [data.epoch_plan(generator) for generator in generators]
            states = [lane.state for lane in lanes]
            for index in range(first_batch, data.steps_per_epoch):
                states, metrics = step_all(states, [data.train_batch(p, index) for p in plans])
                for lane, state, lane_metrics in zip(lanes, states, metrics, strict=True):
                    lane.state = state
                    lane.progress.loss_sum += lane_metrics["loss"]
                    lane.manager.hook.hooktrain_step_end(
                        run=lane.run, state=state, metrics=lane_metrics
                    )
                # After an epoch's last step, the stop waits for the epoch's end.
                if index + 1 < data.steps_per_epoch:
                    honour_stop(lanes, stop, data.device, at_boundary=False)
            reports = _end_epoch(lanes, generators, evaluate_all, data, epoch)
            if epoch + 1 < epochs:
                honour_stop(lanes, stop, data.device, at_boundary=True)
            stop_here = stop_after_epoch is not None and epoch + 1 >= stop_after_epoch
            if stop_here and epoch + 1 < epochs:
                stop_lanes(lanes, "stop_after_epoch")
                for lane in lanes:
                    lane.run.echo(
                        f"stopped after epoch {epoch + 1}; continue with: {lane.run.resume_command}"
                    )
                return reports
        for lane, report in zip(lanes, reports, strict=True):
            lane.manager.hook.hooktrain_fit_end(run=lane.run, state=lane.state, report=report)
            if lane.run.is_main:
                mark_finished(lane.run.out_dir, lane.run.config)
        return reports


def _batches_done(state: TrainState, steps_per_epoch: int) -> int:
    """How many of the current epoch's batches ``state`` has trained on (checked on resume)."""
    return state.step - state.epoch * steps_per_epoch


def _end_epoch(
    lanes: list[Lane],
    generators: list[torch.Generator],
    evaluate_all: LaneEvaluateFn,
    data: DeviceData,
    epoch: int,
) -> list[EpochReport]:
    """Evaluate each lane, emit epoch_end and return the reports; the state counts the epoch.

    Validation (with a ``val_split``) comes before test: the report names every metric by its
    split (``val_accuracy``, ``test_accuracy``, ``test_loss``).
    """
    global_rng = capture_global_rng(data.device)
    for lane, generator in zip(lanes, generators, strict=True):
        # The data generator has drawn this epoch's plan: its state now starts the next one.
        lane.state = lane.state.replace(
            epoch=epoch + 1, rng={"data": generator.get_state(), **global_rng}
        )
    evaluated = [
        lane.state.replace(
            params=lane.manager.hook.hooktrain_eval_params(run=lane.run, state=lane.state)
            or lane.state.params
        )
        for lane in lanes
    ]
    metrics: list[dict[str, float]] = [{} for _ in lanes]
    for split in ("val", "test") if data.n_val else ("test",):
        for lane_metrics, figures in zip(
            metrics, evaluate_all(evaluated, data.eval_batches(split)), strict=True
        ):
            lane_metrics.update({f"{split}_{name}": value for name, value in figures.items()})
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
