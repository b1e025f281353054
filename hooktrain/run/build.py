"""Building a run from a recipe: its device, precision, data, task, model and step pieces."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pluggy
import torch
from torch import nn

from hooktrain.config import registry
from hooktrain.config.recipe import Recipe
from hooktrain.core.context import BuildContext
from hooktrain.core.plugin import Plugin, contributions, sole_contribution
from hooktrain.core.step import StepPieces, constant_schedule
from hooktrain.core.task import Task
from hooktrain.data.device import DeviceData, Splits
from hooktrain.data.in_memory import DatasetSplits
from hooktrain.data.loader import LoaderData
from hooktrain.errors import HooktrainError
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


def load_splits(
    recipe: Recipe, data_dir: Path | None, echo: Callable[[str], None]
) -> Splits | DatasetSplits:
    """The recipe's data, from its source (``data_dir`` goes to sources that take one)."""
    splits = registry.build("data", recipe.data, data_dir=data_dir, echo=echo)
    if not isinstance(splits, Splits | DatasetSplits):
        raise HooktrainError(
            f"The data source {recipe.data.label!r} returned a {type(splits).__name__}, not "
            "hooktrain's Splits or DatasetSplits; build it with hooktrain.data.from_tensors or "
            "from_datasets."
        )
    return splits


def build_task(recipe: Recipe) -> Task:
    return registry.build("task", recipe.task)


def device_data(
    recipe: Recipe,
    splits: Splits | DatasetSplits,
    device: torch.device,
    topology: Topology | None = None,
) -> DeviceData:
    """The data on ``device``, augmented by the recipe's chain; a process's shard under torchrun.

    DatasetSplits stay where they are, read batch by batch by DataLoader workers (LoaderData).
    """
    topology = topology or Topology()
    served = LoaderData if isinstance(splits, DatasetSplits) else DeviceData
    return served(
        splits,
        device,
        recipe.batch_size,
        [registry.build("augment", piece) for piece in recipe.augment],
        channels_last=channels_last(recipe, device),
        train_limit=recipe.train_limit,
        val_split=recipe.val_split,
        eval_batch_size=recipe.eval_batch_size,
        shard=topology.rank,
        shards=topology.world_size,
    )


def model_facts(data: DeviceData, task: Task) -> dict[str, Any]:
    """What the run tells a model factory that declares it (JSON-ready: config.json keeps it,
    so a checkpoint is checked against the model before any data is loaded)."""
    shape = list(data.input_shape)
    return {
        "num_classes": data.num_classes,
        "num_outputs": task.num_outputs(data.classes, data.train.targets),
        "input_shape": shape,
        "in_channels": shape[0],
    }


def recipe_model(recipe: Recipe, facts: dict[str, Any]) -> nn.Module:
    """The model the recipe names, built with its arguments and the run's facts."""
    facts = {**facts, "input_shape": tuple(facts["input_shape"])}
    model = registry.build("model", recipe.model, **facts)
    if not isinstance(model, nn.Module):
        raise HooktrainError(
            f"The model factory {recipe.model.label!r} returned a {type(model).__name__}, not a "
            "torch.nn.Module; make it return the module."
        )
    return model


def build_models(
    recipe: Recipe, facts: dict[str, Any], device: torch.device
) -> tuple[nn.Module, nn.Module]:
    """The model in train mode, initialised from the recipe's seed, and a copy in eval mode."""
    torch.manual_seed(recipe.seed)
    model = recipe_model(recipe, facts)
    memory_format = torch.channels_last if channels_last(recipe, device) else None
    model = model.to(device, memory_format=memory_format).train()
    return model, copy.deepcopy(model).eval()


def load_plugin_states(plugins: Sequence[Plugin], payload: dict[str, Any]) -> None:
    for plugin in plugins:
        plugin.load_state_dict(payload["plugins"].get(plugin.name, {}))


def compose_pieces(
    manager: pluggy.PluginManager,
    build: BuildContext,
    model: nn.Module,
    autocast_dtype: torch.dtype | None,
    task: Task,
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
        loss=sole_contribution(manager, "hooktrain_loss", build=build) or task.loss,
        autocast_dtype=autocast_dtype,
        replicas=replicas,
    )
