"""Building a run from a recipe: its device, precision, data, task, model and step pieces."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import pluggy
import torch
from torch import nn

from hooktrain.config import registry
from hooktrain.config.recipe import Recipe
from hooktrain.core.context import BuildContext
from hooktrain.core.evaluate import flip_views
from hooktrain.core.optim import Optimizer, recipe_optimizer
from hooktrain.core.pieces import EvalViews, GradientTransform
from hooktrain.core.plugin import Plugin, chained, contributions, sole_contribution
from hooktrain.core.step import StepPieces, constant_schedule
from hooktrain.core.task import Task
from hooktrain.core.transforms import Chain, lr_scale_member, weight_decay_member
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
    recipe: Recipe, facts: dict[str, Any], device: torch.device, manager: pluggy.PluginManager
) -> tuple[nn.Module, nn.Module]:
    """The model in train mode, initialised from the recipe's seed and passed through the
    plugins' ``hooktrain_model``, and a copy in eval mode."""
    torch.manual_seed(recipe.seed)
    model = plugin_model(recipe, recipe_model(recipe, facts), manager)
    memory_format = torch.channels_last if channels_last(recipe, device) else None
    model = model.to(device, memory_format=memory_format).train()
    return model, copy.deepcopy(model).eval()


def plugin_model(recipe: Recipe, model: nn.Module, manager: pluggy.PluginManager) -> nn.Module:
    """``model`` after every plugin's ``hooktrain_model``."""
    changed = chained(manager, "hooktrain_model", "model", model, recipe=recipe)
    if not isinstance(changed, nn.Module):
        raise HooktrainError(
            f"A plugin's hooktrain_model returned a {type(changed).__name__}, not a "
            "torch.nn.Module; return the module to train, or None to keep the model."
        )
    return changed


def initial_params(
    manager: pluggy.PluginManager, build: BuildContext, model: nn.Module, data: DeviceData
) -> None:
    """Load into ``model`` what the plugins' ``hooktrain_initial_params`` answer, in turn."""
    for impl in reversed(manager.hook.hooktrain_initial_params.get_hookimpls()):
        params = {name: p.detach() for name, p in model.named_parameters()}
        buffers = {name: b.detach() for name, b in model.named_buffers()}
        arguments = {"build": build, "params": params, "buffers": buffers, "data": data}
        answer = impl.function(*(arguments[arg] for arg in impl.argnames))
        for name, value in (answer or {}).items():
            current = params.get(name, buffers.get(name))
            if (
                current is None
                or not isinstance(value, torch.Tensor)
                or (value.shape != current.shape or value.dtype != current.dtype)
            ):
                raise HooktrainError(
                    f"The plugin {impl.plugin_name!r} gave the initial value of {name!r} as "
                    f"{_described(value)}, but the model's {name!r} is "
                    f"{_described(current)}; give a tensor of the same name, shape and dtype."
                )
            with torch.no_grad():
                current.copy_(value)


def _described(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return "missing" if value is None else f"a {type(value).__name__}"


def load_plugin_states(plugins: Sequence[Plugin], payload: dict[str, Any]) -> None:
    for plugin in plugins:
        plugin.load_state_dict(payload["plugins"].get(plugin.name, {}))


def build_context(
    recipe: Recipe,
    model: nn.Module,
    steps_per_epoch: int,
    task: Task,
    facts: dict[str, Any],
    manager: pluggy.PluginManager,
) -> BuildContext:
    """What build hooks see: the model's shapes, the claimed parameter groups and optimizer."""
    build = BuildContext(
        recipe,
        {name: p.shape for name, p in model.named_parameters()},
        steps_per_epoch,
        recipe_optimizer(recipe),
        task,
        facts,
    )
    build = attrs.evolve(
        build, groups=sole_contribution(manager, "hooktrain_param_groups", build=build)
    )
    optimizer = sole_contribution(manager, "hooktrain_optimizer", build=build)
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        raise HooktrainError(
            f"A plugin's hooktrain_optimizer returned a {type(optimizer).__name__}; return a "
            "hooktrain.core.optim.Optimizer (a name, init and update)."
        )
    return attrs.evolve(build, optimizer=optimizer or build.optimizer)


def compose_chain(manager: pluggy.PluginManager, build: BuildContext) -> Chain:
    """The gradient chain: the plugins' members in call order, weight decay and parameter
    groups where their hooks put them, the optimizer between."""
    members = [
        member for _, member in contributions(manager, "hooktrain_gradient_transform", build=build)
    ]
    for member in members:
        if not isinstance(member, GradientTransform):
            raise HooktrainError(
                f"A plugin's hooktrain_gradient_transform returned a {type(member).__name__}; "
                "return a hooktrain.GradientTransform (GradientTransform.stateless(name, "
                "function) for one without state)."
            )
    decay = sole_contribution(manager, "hooktrain_weight_decay", build=build)
    before = [m for m in members if not m.after_optimizer]
    after = [m for m in members if m.after_optimizer]
    if build.groups is not None:
        after.insert(0, lr_scale_member(build.groups, build.param_names))
    if decay is not None:
        if build.groups is not None:
            decay = build.groups.decay_rule(decay)
        decay_member = weight_decay_member(decay, build.param_names)
        if decay.decoupled:
            after.insert(0, decay_member)
        else:
            before.append(decay_member)
    return Chain.of([*before, *after], build.optimizer)


def eval_views(manager: pluggy.PluginManager, build: BuildContext) -> EvalViews | None:
    """The plugins' evaluation views, or the recipe's flip; both is refused."""
    views = sole_contribution(manager, "hooktrain_eval_views", build=build)
    if views is not None and build.recipe.tta_flip:
        raise HooktrainError(
            "tta_flip is on and a plugin also gives the evaluation views; set tta_flip=false "
            "(the plugin's views decide what is evaluated)."
        )
    return flip_views if build.recipe.tta_flip else views


def compose_pieces(
    manager: pluggy.PluginManager,
    build: BuildContext,
    model: nn.Module,
    autocast_dtype: torch.dtype | None,
) -> StepPieces:
    """The step's pieces: what the plugins contribute, defaults for what none does."""
    replicas = sole_contribution(manager, "hooktrain_replicas", build=build)
    return StepPieces(
        model=replicas.train_model(model) if replicas else model,
        chain=compose_chain(manager, build),
        param_names=build.param_names,
        schedule=sole_contribution(manager, "hooktrain_lr_schedule", build=build)
        or constant_schedule(build.recipe.max_lr),
        loss=sole_contribution(manager, "hooktrain_loss", build=build) or build.task.loss,
        autocast_dtype=autocast_dtype,
        replicas=replicas,
        batch_transforms=[
            t for _, t in contributions(manager, "hooktrain_batch_transform", build=build)
        ],
        gradient_wrappers=[
            w for _, w in contributions(manager, "hooktrain_wrap_gradients", build=build)
        ],
    )
