"""Building a run from a recipe: its device, precision, model, data and step pieces, and the
checks a resumed or evaluated checkpoint must pass before any of it is used."""

from __future__ import annotations

import copy
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import pluggy
import torch
import torch.nn.functional as F
from torch import nn

from hooktrain.config.recipe import Recipe
from hooktrain.config.stored import recipe_from_config
from hooktrain.core.context import BuildContext
from hooktrain.core.plugin import (
    Plugin,
    call_order,
    contributions,
    make_plugin_manager,
    sole_contribution,
)
from hooktrain.core.state import TrainState
from hooktrain.core.step import Evaluation, StepPieces, build_evaluate, constant_schedule
from hooktrain.data.device import DeviceData, ImageDataset
from hooktrain.data.sources import load_cifar10
from hooktrain.errors import HooktrainError, short_reason
from hooktrain.models import recipe_model
from hooktrain.run.checkpoint_checks import checkpoint_problem
from hooktrain.run.distributed import Topology


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


def autocast_dtype_of(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    if recipe.precision == "bf16" or (recipe.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def channels_last(recipe: Recipe, device: torch.device) -> bool:
    return recipe.memory_format == "channels_last" or (
        recipe.memory_format == "auto" and device.type == "cuda"
    )


def device_data(
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
        channels_last=channels_last(recipe, device),
        train_limit=recipe.train_limit,
        eval_batch_size=recipe.eval_batch_size,
        shard=topology.rank,
        shards=topology.world_size,
    )


def build_models(
    recipe: Recipe, num_classes: int, device: torch.device
) -> tuple[nn.Module, nn.Module]:
    """The model in train mode, initialised from the recipe's seed, and a copy in eval mode."""
    torch.manual_seed(recipe.seed)
    model = recipe_model(recipe, num_classes)
    memory_format = torch.channels_last if channels_last(recipe, device) else None
    model = model.to(device, memory_format=memory_format).train()
    return model, copy.deepcopy(model).eval()


def evaluate_checkpoint(
    payload: dict[str, Any],
    data_dir: Path | None,
    device: str = "auto",
    recipe_module: types.ModuleType | None = None,
) -> Evaluation:
    """Test loss and accuracy of a loaded checkpoint, on the test split of its data.

    The weights evaluated are those the run evaluated: a plugin answering
    ``hooktrain_eval_params`` (``ema``) gets its saved state back and chooses them, with
    ``run=None``. ``recipe_module`` is the recipe file the user named, where plugin classes
    of a run of a recipe file come from.
    """
    recipe = recipe_from_config(payload["config"], recipe_module)
    torch_device = resolve_device(device)
    dataset = load_cifar10(data_dir)
    _, eval_model = build_models(recipe, len(dataset.classes), torch_device)
    check_usable(payload, recipe, {"num_classes": len(dataset.classes)})
    state = TrainState.from_dict(payload["state"], torch_device)
    load_plugin_states(recipe.plugins, payload)
    hook = make_plugin_manager(recipe.plugins).hook
    chosen = hook.hooktrain_eval_params(run=None, state=state)
    if chosen is not None:
        state = state.replace(params={name: t.to(torch_device) for name, t in chosen.items()})
    evaluate = build_evaluate(
        eval_model, autocast_dtype_of(recipe, torch_device), tta_flip=recipe.tta_flip
    )
    return evaluate(state, device_data(recipe, dataset, torch_device).test_batches())


def check_usable(payload: dict[str, Any], recipe: Recipe, run_info: dict[str, Any]) -> None:
    """Refuse in a sentence a checkpoint whose contents do not fit a run of ``recipe``."""
    problem = checkpoint_problem(payload, recipe, run_info)
    if problem is not None:
        raise HooktrainError(
            f"The checkpoint cannot be used: {problem}; use it with the recipe, settings, data "
            "and hooktrain version that wrote it."
        )


def load_plugin_states(plugins: Sequence[Plugin], payload: dict[str, Any]) -> None:
    for plugin in plugins:
        plugin.load_state_dict(payload["plugins"].get(plugin.name, {}))


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


def lockstep_recipe(recipe: Recipe, device: torch.device) -> Recipe:
    """``recipe`` as seeds trained together run it: in a contiguous memory layout.

    Under torch.func.vmap, channels_last BatchNorm inputs fail on CUDA and bf16 autocast casts
    some convolutions and BatchNorms and not others; ``auto`` layout becomes contiguous (the
    same numbers), while autocast, which changes the numbers, is refused in words.
    """
    autocast_dtype = autocast_dtype_of(recipe, device)
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


def check_vmappable(model: nn.Module) -> None:
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


def check_data_parallel(recipe: Recipe, seeds: Sequence[int]) -> None:
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


def check_resumable(
    recipe: Recipe,
    out_dirs: Sequence[Path],
    resume: Sequence[dict[str, Any]],
    echo: Callable[[str], None],
) -> None:
    """Refuse checkpoints seeds cannot resume together from, or of a finished run; say what
    resumes."""
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


def out_of_memory(error: BaseException, device: torch.device) -> HooktrainError:
    """The sentence for a run that ran out of memory on ``device``."""
    return HooktrainError(
        f"The run does not fit in the memory of {device} ({short_reason(error)}); make the "
        "model or the batches smaller (--set width=..., --set batch_size=...)."
    )
