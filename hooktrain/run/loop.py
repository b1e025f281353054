"""The event loop: build the run from a recipe, then train, evaluate and emit events."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch.utils._pytree import tree_leaves

from hooktrain.config.recipe import Recipe
from hooktrain.config.stored import recipe_to_config
from hooktrain.core.context import BuildContext, EpochReport, RunContext
from hooktrain.core.optim import recipe_optimizer
from hooktrain.core.plugin import (
    call_order,
    make_plugin_manager,
)
from hooktrain.core.state import TrainState, capture_global_rng
from hooktrain.core.step import (
    Batch,
    Evaluation,
    LaneStepFn,
    build_evaluate,
    build_lane_evaluate,
    build_lane_step,
    build_step,
)
from hooktrain.data.device import DeviceData
from hooktrain.data.sources import load_cifar10
from hooktrain.errors import HooktrainError, short_reason
from hooktrain.models import shard_randomness
from hooktrain.run import checkpoints, distributed
from hooktrain.run.build import (
    autocast_dtype_of,
    build_models,
    check_data_parallel,
    check_resumable,
    check_usable,
    check_vmappable,
    compose_pieces,
    device_data,
    load_plugin_states,
    lockstep_recipe,
    out_of_memory,
    resolve_device,
)
from hooktrain.run.distributed import Topology
from hooktrain.run.environment import environment_info
from hooktrain.run.folder import hold_run_folders, mark_finished, write_config
from hooktrain.run.lanes import (
    EpochProgress,
    Lane,
    as_lane_evaluate,
    as_lane_step,
    honour_stop,
    payload_writer,
    prefixed,
    stop_lanes,
)
from hooktrain.run.signals import stop_on_signals


def train(
    recipe: Recipe,
    *,
    out_dir: Path,
    data_dir: Path | None = None,
    device: str = "auto",
    resume: dict[str, Any] | None = None,
    stop_after_epoch: int | None = None,
    echo: Callable[[str], None] = print,
    tags: dict[str, str] | None = None,
) -> EpochReport:
    """Train ``recipe``, writing into ``out_dir``; return the last epoch's report.

    ``resume`` is a loaded checkpoint of this run to continue from. ``stop_after_epoch`` ends
    this process after that many finished epochs (the run can be resumed later); fit_end is
    then not emitted. ``tags`` label the run for plugins (an ablation's cell, for instance).
    """
    (report,) = train_seeds(
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
    return report


def train_seeds(
    recipe: Recipe,
    seeds: Sequence[int],
    *,
    out_dirs: Sequence[Path],
    data_dir: Path | None = None,
    device: str = "auto",
    resume: Sequence[dict[str, Any]] | None = None,
    stop_after_epoch: int | None = None,
    echo: Callable[[str], None] = print,
    tags: dict[str, str] | None = None,
) -> list[EpochReport]:
    """Train ``recipe`` once per seed, each into its own folder; return each last report.

    Two or more seeds train in lockstep: one vmapped forward and backward for all of them per
    step (``torch.func``), while each seed keeps its own initialisation, data order,
    augmentation, dropout masks, plugins, run folder and checkpoints, so every folder is an
    ordinary run that ``hooktrain resume`` and ``hooktrain eval`` accept. ``resume`` holds one
    loaded checkpoint per seed, all at the same step.
    """
    if len(out_dirs) != len(seeds) or not seeds:
        raise ValueError("train_seeds needs one out_dir per seed, and at least one seed")
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
    with held, distributed.process_group(topology, backend):
        try:
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
        except torch.OutOfMemoryError as error:
            raise out_of_memory(error, torch_device) from error
        except RuntimeError as error:
            if "can't allocate memory" in str(error):  # the CPU allocator's words
                raise out_of_memory(error, torch_device) from error
            if not distributed.is_collective_failure(error):
                raise
            raise HooktrainError(
                f"Process {topology.rank} of this run lost contact with the others "
                f"({type(error).__name__}: {short_reason(error)}): one of them failed or was "
                "stopped, so the run ends here; torchrun names the process that failed first. "
                f"Continue from the last checkpoint with `torchrun ... -m hooktrain resume "
                f"{out_dirs[0]}`."
            ) from error


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
) -> list[EpochReport]:
    """:func:`train_seeds` once this process knows its device and its place among processes."""
    together = len(seeds) > 1
    if together:
        recipe = lockstep_recipe(recipe, torch_device)
    dataset = load_cifar10(data_dir, echo=echo)
    # Seeds differ in initialisation and data order only: one data object serves them all.
    data = device_data(recipe, dataset, torch_device, topology)
    if data.n_test == 0:
        raise HooktrainError(
            f"The test split of {data_dir or 'the data'} holds no images, so the run could "
            "never be evaluated; add test images."
        )
    optimizer = recipe_optimizer(recipe)
    autocast_dtype = autocast_dtype_of(recipe, torch_device)
    run_info = {
        "data_dir": str(data_dir.resolve()) if data_dir else None,
        "device": device,
        "processes": topology.world_size,
        "recipe_file": recipe.source,
        # What resume checks a checkpoint against before loading data (see engine.saved).
        "num_classes": len(dataset.classes),
        "steps_per_epoch": data.steps_per_epoch,
        "environment": environment_info(torch_device),
    }

    lanes: list[Lane] = []
    for index, (seed, out_dir) in enumerate(zip(seeds, out_dirs, strict=True)):
        # Fresh plugin instances: a recipe object can be trained many times in one process.
        lane_recipe = attrs.evolve(
            recipe, seed=seed, plugins=tuple(copy.deepcopy(p) for p in recipe.plugins)
        )
        model, eval_model = build_models(lane_recipe, len(dataset.classes), torch_device)
        shard_randomness(model, topology.rank, topology.world_size)
        state = TrainState.create(model, optimizer, seed)
        progress = EpochProgress(torch.zeros((), device=torch_device))
        if resume is not None:
            check_usable(resume[index], lane_recipe, run_info)
            state = TrainState.from_dict(resume[index]["state"], torch_device)
            load_plugin_states(lane_recipe.plugins, resume[index])
            saved = resume[index].get("progress", {"loss_sum": 0.0, "seconds": 0.0})
            progress = EpochProgress(
                torch.tensor(saved["loss_sum"], device=torch_device), saved["seconds"]
            )
        if index == 0:
            # The first seed's modules serve as shapes for all: the states hold the numbers.
            shape_model, shape_eval_model = model, eval_model
        config = {**recipe_to_config(lane_recipe), "run": run_info}
        if topology.is_main:  # the folder is made and held (train_seeds)
            checkpoints.remove_stale_temp_files(out_dir)
            write_config(out_dir, config)
        run = RunContext(
            recipe=lane_recipe,
            out_dir=out_dir,
            device=torch_device,
            data=data,
            steps_per_epoch=data.steps_per_epoch,
            config=config,
            checkpoint_payload=payload_writer(lane_recipe, config, progress),
            echo=prefixed(echo, f"seed {seed}: ") if together else echo,
            tags=dict(tags or {}),
            lane=index,
            lanes=len(seeds),
            rank=topology.rank,
            world_size=topology.world_size,
        )
        # Every process runs the same events; only the main one runs those that write files.
        manager = make_plugin_manager(
            [p for p in lane_recipe.plugins if topology.is_main or not p.main_process_only]
        )
        lanes.append(Lane(lane_recipe, manager, run, state, progress))

    build = BuildContext(
        recipe,
        {name: p.shape for name, p in shape_model.named_parameters()},
        data.steps_per_epoch,
        optimizer,
    )
    # Build hooks contribute pure pieces that do not depend on the seed: the first seed's
    # plugins build the step for all.
    pieces = compose_pieces(
        make_plugin_manager(lanes[0].recipe.plugins), build, shape_model, autocast_dtype
    )
    first = lanes[0].state
    if topology.distributed:
        optimizer_tensors = [t for t in tree_leaves(first.opt_state) if isinstance(t, torch.Tensor)]
        distributed.agree_on_start(
            first.step, [*first.params.values(), *first.buffers.values(), *optimizer_tensors]
        )
    if together:
        check_vmappable(shape_model)
        step_all = build_lane_step(pieces, recipe.compile, recipe.compile_mode)
        evaluate_all = build_lane_evaluate(
            shape_eval_model, autocast_dtype, recipe.compile, recipe.tta_flip
        )
    else:
        step_all = as_lane_step(build_step(pieces, recipe.compile, recipe.compile_mode))
        evaluate_all = as_lane_evaluate(
            build_evaluate(
                shape_eval_model,
                autocast_dtype,
                recipe.compile,
                recipe.tta_flip,
                distributed.sum_over_processes if topology.distributed else None,
            )
        )
    torch.set_rng_state(first.rng["torch"])
    if "cuda" in first.rng and torch_device.type == "cuda":
        torch.cuda.set_rng_state(first.rng["cuda"], torch_device)

    seeds_text = f" x {len(seeds)} seeds together" if together else ""
    if topology.distributed:
        seeds_text = (
            f" ({topology.world_size} processes x {recipe.batch_size // topology.world_size})"
        )
    echo(
        f"{recipe.name}: {recipe.epochs} epochs x {data.steps_per_epoch} steps of "
        f"{recipe.batch_size}{seeds_text} on {torch_device} ({data.n_train} training images), "
        f"run folder{'s' if together else ''} {', '.join(str(d) for d in out_dirs)}"
    )
    echo("plugins: " + (" -> ".join(p.name for p in recipe.plugins) or "none"))
    epoch_end_order = call_order(lanes[0].manager, "hooktrain_epoch_end")
    echo("at epoch end: " + (" -> ".join(epoch_end_order) or "none"))
    return _fit(lanes, step_all, evaluate_all, data, recipe.epochs, stop_after_epoch)


def _fit(
    lanes: list[Lane],
    step_all: LaneStepFn,
    evaluate_all: Callable[[Sequence[TrainState], Iterable[Batch]], list[Evaluation]],
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
    evaluate_all: Callable[[Sequence[TrainState], Iterable[Batch]], list[Evaluation]],
    data: DeviceData,
    epoch: int,
) -> list[EpochReport]:
    """Evaluate each lane, emit epoch_end and return the reports; the state counts the epoch."""
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
    evaluations = evaluate_all(evaluated, data.test_batches())
    reports = []
    for lane, evaluation in zip(lanes, evaluations, strict=True):
        report = EpochReport(
            epoch=epoch + 1,
            step=lane.state.step,
            train_loss=float(lane.progress.loss_sum) / data.steps_per_epoch,
            test_loss=evaluation.loss,
            test_accuracy=evaluation.accuracy,
            seconds=lane.progress.seconds(),
        )
        # Checkpoints taken from here on are at an epoch boundary: nothing of an epoch is due.
        lane.progress.restart()
        lane.manager.hook.hooktrain_epoch_end(run=lane.run, state=lane.state, report=report)
        reports.append(report)
    return reports
