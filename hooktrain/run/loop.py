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

import attrs
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from hooktrain.config.recipe import Recipe
from hooktrain.core.context import EpochReport, Trained
from hooktrain.core.evaluate import LaneEvaluateFn, build_evaluate, build_lane_evaluate
from hooktrain.core.pieces import EvalViews
from hooktrain.core.plugin import call_order, make_plugin_manager
from hooktrain.core.state import TrainState
from hooktrain.core.step import LaneStepFn, StepPieces, build_lane_step, build_step
from hooktrain.core.transforms import Chain
from hooktrain.data.device import DeviceData
from hooktrain.errors import HooktrainError
from hooktrain.models import shard_randomness
from hooktrain.run import distributed
from hooktrain.run.build import (
    autocast_dtype_of,
    build_context,
    build_models,
    build_task,
    compose_pieces,
    device_data,
    eval_views,
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
from hooktrain.run.epochs import end_epoch, finish, stop_reason
from hooktrain.run.folder import hold_run_folders
from hooktrain.run.lanes import (
    Lane,
    LaneBuild,
    as_lane_evaluate,
    as_lane_step,
    honour_stop,
    make_lane,
    stop_lanes,
)
from hooktrain.run.signals import StopRequest, stop_on_signals


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
    # Build hooks run once, on plugins of the first seed's: their pieces serve every seed.
    first = attrs.evolve(
        recipe, seed=seeds[0], plugins=tuple(copy.deepcopy(p) for p in recipe.plugins)
    )
    manager = make_plugin_manager(first.plugins)
    # The first seed's modules serve as shapes for all: the states hold the numbers.
    model, eval_model = build_models(first, facts, torch_device, manager)
    shard_randomness(model, topology.rank, topology.world_size)
    context = build_context(recipe, model, data.steps_per_epoch, task, facts, manager)
    pieces = compose_pieces(manager, context, model, autocast_dtype_of(recipe, torch_device))
    built = LaneBuild(
        recipe, data, task, facts, context, pieces.chain, run_info, topology, echo, tags, len(seeds)
    )
    lanes = [
        make_lane(built, index, seed, out_dir, None if resume is None else resume[index])
        for index, (seed, out_dir) in enumerate(zip(seeds, out_dirs, strict=True))
    ]
    views = eval_views(manager, context)
    step_all, evaluate_all = _step_and_evaluate(built, lanes, pieces, eval_model, views)
    start = lanes[0].state
    torch.set_rng_state(start.rng["torch"])
    if "cuda" in start.rng and torch_device.type == "cuda":
        torch.cuda.set_rng_state(start.rng["cuda"], torch_device)
    _announce(recipe, data, topology, lanes, out_dirs, pieces.chain, echo)
    reports = _fit(lanes, step_all, evaluate_all, data, recipe.epochs, stop_after_epoch)
    return [
        Trained(report, lane.state, _with_weights(eval_model, lane.state))
        for lane, report in zip(lanes, reports, strict=True)
    ]


def _with_weights(eval_model: nn.Module, state: TrainState) -> nn.Module:
    """A copy of the eval-mode model holding the state's parameters and buffers."""
    model = copy.deepcopy(eval_model)
    model.load_state_dict({**state.params, **state.buffers})
    return model


def _step_and_evaluate(
    built: LaneBuild,
    lanes: list[Lane],
    pieces: StepPieces,
    eval_model: nn.Module,
    views: EvalViews | None,
) -> tuple[LaneStepFn, LaneEvaluateFn]:
    """The lanes' step and evaluation, from the pieces the first lane's plugins contributed."""
    recipe, topology, device = built.recipe, built.topology, built.data.device
    autocast_dtype = autocast_dtype_of(recipe, device)
    first = lanes[0].state
    if topology.distributed:
        chain_tensors = [
            t
            for t in tree_leaves([first.opt_state, first.transforms])
            if isinstance(t, torch.Tensor)
        ]
        distributed.agree_on_start(
            first.step, [*first.params.values(), *first.buffers.values(), *chain_tensors]
        )
    compiled = (recipe.compile, recipe.compile_mode)
    if len(lanes) > 1:
        check_vmappable(pieces.model)
        evaluate = build_lane_evaluate(
            eval_model, built.task, autocast_dtype, recipe.compile, views
        )
        return build_lane_step(pieces, *compiled), evaluate
    single = build_evaluate(
        eval_model,
        built.task,
        autocast_dtype,
        recipe.compile,
        views,
        distributed.sum_over_processes if topology.distributed else None,
    )
    return as_lane_step(build_step(pieces, *compiled)), as_lane_evaluate(single)


def _announce(
    recipe: Recipe,
    data: DeviceData,
    topology: Topology,
    lanes: list[Lane],
    out_dirs: Sequence[Path],
    chain: Chain,
    echo: Callable[[str], None],
) -> None:
    """Say what will train where, the order plugins run in and the gradient chain."""
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
    echo("chain: " + chain.describe())


def _fit(
    lanes: list[Lane],
    step_all: LaneStepFn,
    evaluate_all: LaneEvaluateFn,
    data: DeviceData,
    epochs: int,
    stop_after_epoch: int | None,
) -> list[EpochReport | None]:
    """The loop over epochs and steps, emitting every event once per lane; a lane whose
    plugins ask to stop finishes at that epoch's end and leaves the group."""
    reports: list[EpochReport | None] = [None] * len(lanes)
    with stop_on_signals() as stop:
        for lane in lanes:
            lane.manager.hook.hooktrain_fit_start(run=lane.run, state=lane.state)
        active = list(range(len(lanes)))
        for epoch in range(lanes[0].state.epoch, epochs):
            group = [lanes[i] for i in active]
            generators = _train_epoch(group, step_all, data, stop)
            epoch_reports = end_epoch(group, generators, evaluate_all, data, epoch)
            for index, report in zip(active, epoch_reports, strict=True):
                reports[index] = report
            stopping = {i: stop_reason(lanes[i], reports[i]) for i in active}
            for index, reason in stopping.items():
                if reason is not None:
                    finish(lanes[index], reports[index], reason)
            active = [i for i in active if stopping[i] is None]
            if not active:
                return reports
            group = [lanes[i] for i in active]
            if epoch + 1 < epochs:
                honour_stop(group, stop, data.device, at_boundary=True)
            stop_here = stop_after_epoch is not None and epoch + 1 >= stop_after_epoch
            if stop_here and epoch + 1 < epochs:
                stop_lanes(group, "stop_after_epoch")
                for lane in group:
                    lane.run.echo(
                        f"stopped after epoch {epoch + 1}; continue with: {lane.run.resume_command}"
                    )
                return reports
        for index in active:
            finish(lanes[index], reports[index], None)
        return reports


def _train_epoch(
    lanes: list[Lane], step_all: LaneStepFn, data: DeviceData, stop: StopRequest
) -> list[torch.Generator]:
    """One epoch's steps (those left of it, for a run resumed inside it) for every lane; the
    lanes' data generators, which have drawn the epoch's plan."""
    # A run resumed from a checkpoint taken inside an epoch continues where it was.
    first_batch = _batches_done(lanes[0].state, data.steps_per_epoch)
    generators = [torch.Generator() for _ in lanes]
    for lane, generator in zip(lanes, generators, strict=True):
        lane.progress.started = time.perf_counter()
        lane.manager.hook.hooktrain_epoch_start(run=lane.run, state=lane.state)
        generator.set_state(lane.state.rng["data"])
    plans = [
        data.epoch_plan(generator, lane.state.epoch, lane.run.recipe.seed)
        for lane, generator in zip(lanes, generators, strict=True)
    ]
    states = [lane.state for lane in lanes]
    for index in range(first_batch, data.steps_per_epoch):
        states, metrics = step_all(states, [data.train_batch(p, index) for p in plans])
        for lane, state, lane_metrics in zip(lanes, states, metrics, strict=True):
            lane.state = state
            lane.progress.loss_sum += lane_metrics["loss"]
            lane.manager.hook.hooktrain_step_end(run=lane.run, state=state, metrics=lane_metrics)
        # After an epoch's last step, the stop waits for the epoch's end.
        if index + 1 < data.steps_per_epoch:
            honour_stop(lanes, stop, data.device, at_boundary=False)
    return generators


def _batches_done(state: TrainState, steps_per_epoch: int) -> int:
    """How many of the current epoch's batches ``state`` has trained on (checked on resume)."""
    return state.step - state.epoch * steps_per_epoch
