"""The event loop: build the run from a recipe, then train, evaluate and emit events."""

from __future__ import annotations

import contextlib
import copy
import json
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pluggy
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from hooktrain.engine import checkpoints, distributed
from hooktrain.engine.context import BuildContext, EpochReport, RunContext
from hooktrain.engine.data import DeviceData, ImageDataset, load_cifar10
from hooktrain.engine.distributed import Topology
from hooktrain.engine.files import CONFIG_FILE
from hooktrain.engine.optim import make_optimizer
from hooktrain.engine.plugin import (
    call_order,
    contributions,
    make_plugin_manager,
    sole_contribution,
)
from hooktrain.engine.recipe import Recipe, recipe_from_config, recipe_to_config
from hooktrain.engine.state import TrainState, capture_global_rng
from hooktrain.engine.step import (
    Batch,
    Evaluation,
    LaneStepFn,
    StepFn,
    StepPieces,
    build_evaluate,
    build_lane_evaluate,
    build_lane_step,
    build_step,
    constant_schedule,
)
from hooktrain.errors import HooktrainError, TrainingStopped
from hooktrain.models import build_model, shard_randomness


def resolve_device(name: str, topology: Topology | None = None) -> torch.device:
    """``auto`` is CUDA when there is a GPU, else the CPU; under torchrun, each process on a
    machine takes the GPU of its local rank and makes it the current device (NCCL wants it)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise HooktrainError("--device cuda was asked for but no CUDA GPU is visible; use cpu.")
    if name != "cuda" or topology is None or not topology.distributed:
        return torch.device(name)
    if topology.local_rank >= torch.cuda.device_count():
        raise HooktrainError(
            f"This machine has {torch.cuda.device_count()} GPU(s) but torchrun started process "
            f"{topology.local_rank + 1} on it; pass --nproc-per-node {torch.cuda.device_count()} "
            "(one process per GPU), or --device cpu."
        )
    torch.cuda.set_device(topology.local_rank)
    return torch.device("cuda", topology.local_rank)


def _autocast_dtype(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    if recipe.precision == "bf16" or (recipe.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _channels_last(recipe: Recipe, device: torch.device) -> bool:
    return recipe.memory_format == "channels_last" or (
        recipe.memory_format == "auto" and device.type == "cuda"
    )


def _device_data(
    recipe: Recipe, dataset: ImageDataset, device: torch.device, topology: Topology | None = None
) -> DeviceData:
    topology = topology or Topology()
    return DeviceData(
        dataset,
        device,
        batch_size=recipe.batch_size,
        mean=recipe.mean,
        std=recipe.std,
        pad=recipe.pad,
        pad_mode=recipe.pad_mode,
        flip=recipe.flip,
        channels_last=_channels_last(recipe, device),
        train_limit=recipe.train_limit,
        eval_batch_size=recipe.eval_batch_size,
        shard=topology.rank,
        shards=topology.world_size,
    )


def _models(recipe: Recipe, num_classes: int, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The model in train mode, initialised from the recipe's seed, and a copy in eval mode."""
    torch.manual_seed(recipe.seed)
    model = build_model(
        recipe.model,
        num_classes,
        width=recipe.width,
        dropout=recipe.dropout,
        conv_bias=recipe.conv_bias,
        logit_scale=recipe.logit_scale,
    )
    memory_format = torch.channels_last if _channels_last(recipe, device) else None
    model = model.to(device, memory_format=memory_format).train()
    return model, copy.deepcopy(model).eval()


def evaluate_checkpoint(
    payload: dict[str, Any], data_dir: Path | None, device: str = "auto"
) -> Evaluation:
    """Test loss and accuracy of a loaded checkpoint, on the test split of its data.

    The weights evaluated are those the run evaluated: a plugin answering
    ``hooktrain_eval_params`` (``ema``) gets its saved state back and chooses them, with
    ``run=None``.
    """
    recipe = recipe_from_config(payload["config"])
    torch_device = resolve_device(device)
    dataset = load_cifar10(data_dir)
    _, eval_model = _models(recipe, len(dataset.classes), torch_device)
    _check_compatible(payload["state"], eval_model)
    state = TrainState.from_dict(payload["state"], torch_device)
    for plugin in recipe.plugins:
        plugin.load_state_dict(payload["plugins"].get(plugin.name, {}))
    hook = make_plugin_manager(recipe.plugins).hook
    chosen = hook.hooktrain_eval_params(run=None, state=state)
    if chosen is not None:
        state = state.replace(params={name: t.to(torch_device) for name, t in chosen.items()})
    evaluate = build_evaluate(
        eval_model, _autocast_dtype(recipe, torch_device), tta_flip=recipe.tta_flip
    )
    return evaluate(state, _device_data(recipe, dataset, torch_device).test_batches())


def write_config(out_dir: Path, config: dict[str, Any]) -> None:
    """Save the resolved configuration in the run folder."""
    text = json.dumps(config, indent=2) + "\n"
    checkpoints.atomic_write(out_dir / CONFIG_FILE, lambda file: file.write(text.encode()))


def _check_compatible(saved: dict[str, Any], model: nn.Module) -> None:
    """The checkpoint's parameters and buffers have the names and shapes of this model's."""
    for kind, tensors in (
        ("params", dict(model.named_parameters())),
        ("buffers", dict(model.named_buffers())),
    ):
        if saved[kind].keys() != tensors.keys() or any(
            saved[kind][name].shape != t.shape for name, t in tensors.items()
        ):
            raise HooktrainError(
                f"The checkpoint's {'parameters' if kind == 'params' else kind} do not fit this "
                "recipe's model (different names or shapes); use it with the recipe, settings "
                "and hooktrain version that wrote it."
            )


def compose_pieces(
    manager: pluggy.PluginManager,
    build: BuildContext,
    model: nn.Module,
    autocast_dtype: torch.dtype | None,
) -> StepPieces:
    """The step's pieces: what the plugins contribute, defaults for what none does."""
    transforms = contributions(manager, "hooktrain_gradient_transform", build=build)
    replicas = sole_contribution(manager, "hooktrain_replicas", build=build)
    return StepPieces(
        model=replicas.train_model(model) if replicas else model,
        optimizer=build.optimizer,
        param_names=build.param_names,
        schedule=sole_contribution(manager, "hooktrain_lr_schedule", build=build)
        or constant_schedule(build.recipe.max_lr),
        transforms=[transform for _, transform in transforms],
        decay=sole_contribution(manager, "hooktrain_weight_decay", build=build),
        loss=sole_contribution(manager, "hooktrain_loss", build=build) or F.cross_entropy,
        autocast_dtype=autocast_dtype,
        replicas=replicas,
    )


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


@attrs.define
class _EpochProgress:
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
class _Lane:
    """One seed's run inside a group trained in lockstep: its own plugins, folder and state."""

    recipe: Recipe
    manager: pluggy.PluginManager
    run: RunContext
    state: TrainState
    progress: _EpochProgress


def _lockstep_recipe(recipe: Recipe, device: torch.device) -> Recipe:
    """``recipe`` as seeds trained together run it: in a contiguous memory layout.

    Under torch.func.vmap, channels_last BatchNorm inputs fail on CUDA and bf16 autocast casts
    some convolutions and BatchNorms and not others; ``auto`` layout becomes contiguous (the
    same numbers), while autocast, which changes the numbers, is refused in words.
    """
    autocast_dtype = _autocast_dtype(recipe, device)
    if autocast_dtype is not None:
        raise HooktrainError(
            f"Seeds cannot be trained together in {str(autocast_dtype).removeprefix('torch.')} "
            "autocast (the default precision on CUDA), because under torch.func.vmap autocast "
            "casts some convolutions and BatchNorms and not others; add --set precision=fp32 "
            "to train them together, or train the seeds one at a time."
        )
    if recipe.memory_format == "channels_last":
        raise HooktrainError(
            "Seeds cannot be trained together in channels_last, which torch.func.vmap does not "
            "support for BatchNorm; set memory_format=auto or contiguous, or train the seeds "
            "one at a time."
        )
    return attrs.evolve(recipe, memory_format="contiguous")


def _check_vmappable(model: nn.Module) -> None:
    random_layers = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0
    ]
    if random_layers:
        raise HooktrainError(
            f"Seeds cannot be trained together through torch's own dropout ({random_layers[0]}): "
            "under vmap its masks would depend on how many seeds run at once. Use "
            "hooktrain.models.Dropout in the model, or train the seeds one at a time."
        )


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
        _check_data_parallel(recipe, seeds)
    echo = topology.echo(echo)
    if resume is not None:
        _check_resumable(recipe, out_dirs, resume, echo)
    torch_device = resolve_device(device, topology)
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    with distributed.process_group(topology, backend):
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
        except RuntimeError as error:
            if not distributed.is_collective_failure(error):
                raise
            raise HooktrainError(
                f"Process {topology.rank} of this run lost contact with the others "
                f"({type(error).__name__}: {_first_line(error)}): one of them failed or was "
                "stopped, so the run ends here; torchrun names the process that failed first. "
                f"Continue from the last checkpoint with `torchrun ... -m hooktrain resume "
                f"{out_dirs[0]}`."
            ) from error


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def _check_data_parallel(recipe: Recipe, seeds: Sequence[int]) -> None:
    """A run of several processes can keep its replicas in agreement."""
    if len(seeds) > 1:
        raise HooktrainError(
            "Seeds cannot be trained together under torchrun; train them one after another "
            "(without --parallel-seeds), or run one torchrun job per seed."
        )
    if not call_order(make_plugin_manager(recipe.plugins), "hooktrain_replicas"):
        raise HooktrainError(
            f"torchrun started several processes, but the recipe {recipe.name!r} has no plugin "
            "that keeps their replicas in agreement, so each would train its own model; add "
            "--with data_parallel."
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
) -> list[EpochReport]:
    """:func:`train_seeds` once this process knows its device and its place among processes."""
    together = len(seeds) > 1
    if together:
        recipe = _lockstep_recipe(recipe, torch_device)
    dataset = load_cifar10(data_dir)
    # Seeds differ in initialisation and data order only: one data object serves them all.
    data = _device_data(recipe, dataset, torch_device, topology)
    optimizer = make_optimizer(
        recipe.optimizer,
        betas=recipe.betas,
        eps=recipe.eps,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
    )
    autocast_dtype = _autocast_dtype(recipe, torch_device)
    run_info = {
        "data_dir": str(data_dir.resolve()) if data_dir else None,
        "device": device,
        "processes": topology.world_size,
    }

    lanes: list[_Lane] = []
    for index, (seed, out_dir) in enumerate(zip(seeds, out_dirs, strict=True)):
        # Fresh plugin instances: a recipe object can be trained many times in one process.
        lane_recipe = attrs.evolve(
            recipe, seed=seed, plugins=tuple(copy.deepcopy(p) for p in recipe.plugins)
        )
        model, eval_model = _models(lane_recipe, len(dataset.classes), torch_device)
        shard_randomness(model, topology.rank, topology.world_size)
        state = TrainState.create(model, optimizer, seed)
        progress = _EpochProgress(torch.zeros((), device=torch_device))
        if resume is not None:
            _check_compatible(resume[index]["state"], model)
            state = TrainState.from_dict(resume[index]["state"], torch_device)
            for plugin in lane_recipe.plugins:
                plugin.load_state_dict(resume[index]["plugins"].get(plugin.name, {}))
            saved = resume[index].get("progress", {"loss_sum": 0.0, "seconds": 0.0})
            progress = _EpochProgress(
                torch.tensor(saved["loss_sum"], device=torch_device), saved["seconds"]
            )
        if index == 0:
            # The first seed's modules serve as shapes for all: the states hold the numbers.
            shape_model, shape_eval_model = model, eval_model
        config = {**recipe_to_config(lane_recipe), "run": run_info}
        if topology.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            checkpoints.remove_stale_temp_files(out_dir)
            write_config(out_dir, config)
        run = RunContext(
            recipe=lane_recipe,
            out_dir=out_dir,
            device=torch_device,
            data=data,
            steps_per_epoch=data.steps_per_epoch,
            config=config,
            checkpoint_payload=_payload_writer(lane_recipe, config, progress),
            echo=_prefixed(echo, f"seed {seed}: ") if together else echo,
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
        lanes.append(_Lane(lane_recipe, manager, run, state, progress))

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
        _check_vmappable(shape_model)
        step_all = build_lane_step(pieces, recipe.compile, recipe.compile_mode)
        evaluate_all = build_lane_evaluate(
            shape_eval_model, autocast_dtype, recipe.compile, recipe.tta_flip
        )
    else:
        step_all = _as_lane_step(build_step(pieces, recipe.compile, recipe.compile_mode))
        evaluate_all = _as_lane_evaluate(
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


def _check_resumable(
    recipe: Recipe,
    out_dirs: Sequence[Path],
    resume: Sequence[dict[str, Any]],
    echo: Callable[[str], None],
) -> None:
    steps_done = {payload["state"]["step"] for payload in resume}
    if len(steps_done) > 1:
        raise HooktrainError(
            "Seeds resumed together must have stopped at the same step; these stopped at "
            f"steps {sorted(steps_done)}. Resume each run on its own with hooktrain resume."
        )
    if resume[0]["state"]["epoch"] >= recipe.epochs:
        raise HooktrainError(
            f"The run in {out_dirs[0]} has finished (epoch {recipe.epochs} of "
            f"{recipe.epochs}); there is nothing to resume: start a new one with "
            "`hooktrain run`."
        )
    for out_dir, payload in zip(out_dirs, resume, strict=True):
        state = payload["state"]
        echo(f"resuming {out_dir} at step {state['step']} (epoch {state['epoch']} done)")


class _StopRequest:
    """The first SIGINT or SIGTERM received while training, if any."""

    signal_number: int | None = None


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_StopRequest]:
    """Turn Ctrl-C and SIGTERM into a request the loop honours after the current step.

    A second signal interrupts at once (KeyboardInterrupt): checkpoint writes are atomic, so
    even that leaves the files already saved intact. Signal handlers can only be set from the
    main thread; elsewhere signals keep their default behaviour.
    """
    request = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(number: int, frame: object) -> None:
        if request.signal_number is not None:
            raise KeyboardInterrupt
        request.signal_number = number

    previous = {number: signal.signal(number, handle) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _fit(
    lanes: list[_Lane],
    step_all: LaneStepFn,
    evaluate_all: Callable[[Sequence[TrainState], Iterable[Batch]], list[Evaluation]],
    data: DeviceData,
    epochs: int,
    stop_after_epoch: int | None,
) -> list[EpochReport]:
    """The loop over epochs and steps, emitting every event once per lane."""
    with _stop_on_signals() as stop:
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
                if stop.signal_number is not None and index + 1 < data.steps_per_epoch:
                    _stop_by_signal(lanes, stop.signal_number)
            reports = _end_epoch(lanes, generators, evaluate_all, data, epoch)
            if stop.signal_number is not None and epoch + 1 < epochs:
                _stop_by_signal(lanes, stop.signal_number)
            stop_here = stop_after_epoch is not None and epoch + 1 >= stop_after_epoch
            if stop_here and epoch + 1 < epochs:
                _stop(lanes, "stop_after_epoch")
                for lane in lanes:
                    lane.run.echo(
                        f"stopped after epoch {epoch + 1}; continue with: "
                        f"hooktrain resume {lane.run.out_dir}"
                    )
                return reports
        for lane, report in zip(lanes, reports, strict=True):
            lane.manager.hook.hooktrain_fit_end(run=lane.run, state=lane.state, report=report)
        return reports


def _batches_done(state: TrainState, steps_per_epoch: int) -> int:
    """How many of the current epoch's batches ``state`` has trained on."""
    done = state.step - state.epoch * steps_per_epoch
    if not 0 <= done < steps_per_epoch:
        raise HooktrainError(
            f"The checkpoint is at step {state.step} after {state.epoch} epochs, which does not "
            f"fit {steps_per_epoch} steps per epoch: resume it with the data it was trained on."
        )
    return done


def _end_epoch(
    lanes: list[_Lane],
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


def _stop(lanes: list[_Lane], reason: str) -> None:
    for lane in lanes:
        lane.manager.hook.hooktrain_fit_stop(run=lane.run, state=lane.state, reason=reason)


def _stop_by_signal(lanes: list[_Lane], number: int) -> None:
    name = signal.Signals(number).name
    _stop(lanes, name)
    state = lanes[0].state
    total = lanes[0].run.total_steps
    raise TrainingStopped(f"Stopped by {name} at step {state.step} of {total}", number)


def _payload_writer(
    recipe: Recipe, config: dict[str, Any], progress: _EpochProgress
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


def _prefixed(echo: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    return lambda line: echo(prefix + line)


def _as_lane_step(step: StepFn) -> LaneStepFn:
    """A single run's step in the lane calling convention (lists of one)."""

    def lane_step(
        states: Sequence[TrainState], batches: Sequence[Batch]
    ) -> tuple[list[TrainState], list[dict[str, torch.Tensor]]]:
        state, metrics = step(states[0], batches[0])
        return [state], [metrics]

    return lane_step


def _as_lane_evaluate(
    evaluate: Callable[[TrainState, Iterable[Batch]], Evaluation],
) -> Callable[[Sequence[TrainState], Iterable[Batch]], list[Evaluation]]:
    return lambda states, batches: [evaluate(states[0], batches)]
