"""The event loop: build the run from a recipe, then train, evaluate and emit events."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pluggy
import torch
import torch.nn.functional as F
from torch import nn

from hooktrain.engine import checkpoints
from hooktrain.engine.context import BuildContext, EpochReport, RunContext
from hooktrain.engine.data import DeviceData, ImageDataset, load_cifar10
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
    Evaluation,
    StepPieces,
    build_evaluate,
    build_step,
    constant_schedule,
)
from hooktrain.errors import HooktrainError
from hooktrain.models import build_model

CONFIG_FILE = "config.json"


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when there is a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HooktrainError("--device cuda was asked for but no CUDA GPU is visible; use cpu.")
    return torch.device(name)


def _autocast_dtype(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    if recipe.precision == "bf16" or (recipe.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _channels_last(recipe: Recipe, device: torch.device) -> bool:
    return recipe.memory_format == "channels_last" or (
        recipe.memory_format == "auto" and device.type == "cuda"
    )


def _device_data(recipe: Recipe, dataset: ImageDataset, device: torch.device) -> DeviceData:
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
    )


def _models(recipe: Recipe, num_classes: int, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The model in train mode, initialised from the recipe's seed, and a copy in eval mode."""
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model, num_classes, recipe.width, recipe.dropout)
    memory_format = torch.channels_last if _channels_last(recipe, device) else None
    model = model.to(device, memory_format=memory_format).train()
    return model, copy.deepcopy(model).eval()


def evaluate_checkpoint(
    payload: dict[str, Any], data_dir: Path | None, device: str = "auto"
) -> Evaluation:
    """Test loss and accuracy of a loaded checkpoint, on the test split of its data."""
    recipe = recipe_from_config(payload["config"])
    torch_device = resolve_device(device)
    dataset = load_cifar10(data_dir)
    _, eval_model = _models(recipe, len(dataset.classes), torch_device)
    _check_compatible(payload["state"], dict(eval_model.named_parameters()))
    state = TrainState.from_dict(payload["state"], torch_device)
    evaluate = build_evaluate(eval_model, _autocast_dtype(recipe, torch_device))
    return evaluate(state, _device_data(recipe, dataset, torch_device).test_batches())


def write_config(out_dir: Path, recipe: Recipe, run: dict[str, Any]) -> dict[str, Any]:
    """Save the resolved configuration in the run folder and return it."""
    config = {**recipe_to_config(recipe), "run": run}
    text = json.dumps(config, indent=2) + "\n"
    checkpoints.atomic_write(out_dir / CONFIG_FILE, lambda file: file.write(text.encode()))
    return config


def _check_compatible(state: dict[str, Any], model_params: dict[str, torch.Tensor]) -> None:
    saved = state["params"]
    if saved.keys() != model_params.keys() or any(
        saved[name].shape != p.shape for name, p in model_params.items()
    ):
        raise HooktrainError(
            "The checkpoint's parameters do not fit this recipe's model (different names or "
            "shapes); resume it with the recipe and settings that wrote it."
        )


def _compose(
    manager: pluggy.PluginManager,
    build: BuildContext,
    model: nn.Module,
    autocast_dtype: torch.dtype | None,
) -> StepPieces:
    """The step's pieces: what the plugins contribute, defaults for what none does."""
    transforms = contributions(manager, "hooktrain_gradient_transform", build=build)
    return StepPieces(
        model=model,
        optimizer=build.optimizer,
        param_names=build.param_names,
        schedule=sole_contribution(manager, "hooktrain_lr_schedule", build=build)
        or constant_schedule(build.recipe.max_lr),
        transforms=[transform for _, transform in transforms],
        decay=sole_contribution(manager, "hooktrain_weight_decay", build=build),
        loss=sole_contribution(manager, "hooktrain_loss", build=build) or F.cross_entropy,
        autocast_dtype=autocast_dtype,
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
) -> EpochReport:
    """Train ``recipe``, writing into ``out_dir``; return the last epoch's report.

    ``resume`` is a loaded checkpoint of this run to continue from. ``stop_after_epoch`` ends
    this process after that many finished epochs (the run can be resumed later); fit_end is
    then not emitted.
    """
    if resume is not None and resume["state"]["epoch"] >= recipe.epochs:
        raise HooktrainError(
            f"The run in {out_dir} has finished (epoch {recipe.epochs} of {recipe.epochs}); "
            "there is nothing to resume: start a new one with `hooktrain run`."
        )
    if resume is not None:
        echo(f"resuming {out_dir} at epoch {resume['state']['epoch']} of {recipe.epochs}")
    torch_device = resolve_device(device)
    # Fresh plugin instances: a recipe object can be trained many times in one process.
    plugins = tuple(copy.deepcopy(p) for p in recipe.plugins)
    recipe = attrs.evolve(recipe, plugins=plugins)
    manager = make_plugin_manager(plugins)

    dataset = load_cifar10(data_dir)
    data = _device_data(recipe, dataset, torch_device)
    model, eval_model = _models(recipe, len(dataset.classes), torch_device)
    optimizer = make_optimizer(
        recipe.optimizer,
        betas=recipe.betas,
        eps=recipe.eps,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
    )
    autocast_dtype = _autocast_dtype(recipe, torch_device)
    build = BuildContext(
        recipe,
        {name: p.shape for name, p in model.named_parameters()},
        data.steps_per_epoch,
        optimizer,
    )
    pieces = _compose(manager, build, model, autocast_dtype)
    step = build_step(pieces, compile=recipe.compile)
    evaluate = build_evaluate(eval_model, autocast_dtype, compile=recipe.compile)

    state = TrainState.create(model, optimizer, recipe.seed)
    if resume is not None:
        _check_compatible(resume["state"], state.params)
        state = TrainState.from_dict(resume["state"], torch_device)
        for plugin in plugins:
            plugin.load_state_dict(resume["plugins"].get(plugin.name, {}))
    torch.set_rng_state(state.rng["torch"])
    if "cuda" in state.rng and torch_device.type == "cuda":
        torch.cuda.set_rng_state(state.rng["cuda"], torch_device)

    out_dir.mkdir(parents=True, exist_ok=True)
    config = write_config(
        out_dir,
        recipe,
        {"data_dir": str(data_dir.resolve()) if data_dir else None, "device": device},
    )

    def checkpoint_payload(current: TrainState) -> dict[str, Any]:
        return {
            "format": checkpoints.FORMAT,
            "version": checkpoints.VERSION,
            "recipe": recipe.name,
            "config": config,
            "state": current.to_dict(),
            "plugins": {p.name: p.state_dict() for p in plugins},
        }

    run = RunContext(
        recipe=recipe,
        out_dir=out_dir,
        device=torch_device,
        data=data,
        steps_per_epoch=data.steps_per_epoch,
        config=config,
        checkpoint_payload=checkpoint_payload,
        echo=echo,
    )
    echo(
        f"{recipe.name}: {recipe.epochs} epochs x {data.steps_per_epoch} steps of "
        f"{recipe.batch_size} on {torch_device} ({data.n_train} training images), "
        f"run folder {out_dir}"
    )
    echo("plugins: " + (" -> ".join(p.name for p in plugins) or "none"))
    echo("at epoch end: " + (" -> ".join(call_order(manager, "hooktrain_epoch_end")) or "none"))

    hook = manager.hook
    hook.hooktrain_fit_start(run=run, state=state)
    report: EpochReport | None = None
    for epoch in range(state.epoch, recipe.epochs):
        started = time.perf_counter()
        hook.hooktrain_epoch_start(run=run, state=state)
        generator = torch.Generator()
        generator.set_state(state.rng["data"])
        plan = data.epoch_plan(generator)
        loss_sum = torch.zeros((), device=torch_device)
        for index in range(data.steps_per_epoch):
            state, metrics = step(state, data.train_batch(plan, index))
            loss_sum += metrics["loss"]
            hook.hooktrain_step_end(run=run, state=state, metrics=metrics)
        state = state.replace(
            epoch=epoch + 1,
            rng={"data": generator.get_state(), **capture_global_rng(torch_device)},
        )
        evaluation = evaluate(state, data.test_batches())
        report = EpochReport(
            epoch=epoch + 1,
            step=state.step,
            train_loss=float(loss_sum) / data.steps_per_epoch,
            test_loss=evaluation.loss,
            test_accuracy=evaluation.accuracy,
            seconds=time.perf_counter() - started,
        )
        hook.hooktrain_epoch_end(run=run, state=state, report=report)
        stop_here = stop_after_epoch is not None and state.epoch >= stop_after_epoch
        if stop_here and state.epoch < recipe.epochs:
            echo(f"stopped after epoch {state.epoch}; continue with: hooktrain resume {out_dir}")
            return report
    assert report is not None, "a run that trains no epoch was refused before it started"
    hook.hooktrain_fit_end(run=run, state=state, report=report)
    return report
