"""Evaluating a saved checkpoint: the run rebuilt from its config, its test metrics measured."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

from hooktrain.config.stored import recipe_from_config
from hooktrain.core.evaluate import Metrics, build_evaluate
from hooktrain.core.plugin import make_plugin_manager
from hooktrain.core.state import TrainState
from hooktrain.run.build import (
    autocast_dtype_of,
    build_context,
    build_models,
    build_task,
    device_data,
    eval_views,
    load_plugin_states,
    load_splits,
    model_facts,
    resolve_device,
)
from hooktrain.run.checks import check_usable


def evaluate_checkpoint(
    payload: dict[str, Any],
    data_dir: Path | None,
    device: str = "auto",
    recipe_module: types.ModuleType | None = None,
) -> Metrics:
    """The test metrics of a loaded checkpoint, on the test split of its data.

    The weights evaluated are those the run evaluated: a plugin answering
    ``hooktrain_eval_params`` (``ema``) gets its saved state back and chooses them, with
    ``run=None``. ``recipe_module`` is the recipe file the user named, where plugin classes
    and factories of a run of a recipe file come from.
    """
    recipe = recipe_from_config(payload["config"], recipe_module)
    torch_device = resolve_device(device)
    task = build_task(recipe)
    data = device_data(recipe, load_splits(recipe, data_dir, print), torch_device)
    facts = model_facts(data, task)
    manager = make_plugin_manager(recipe.plugins)
    model, eval_model = build_models(recipe, facts, torch_device, manager)
    check_usable(payload, recipe, {"model_facts": facts})
    state = TrainState.from_dict(payload["state"], torch_device)
    load_plugin_states(recipe.plugins, payload)
    chosen = manager.hook.hooktrain_eval_params(run=None, state=state) or {}
    state = state.with_tensors({name: t.to(torch_device) for name, t in chosen.items()})
    build = build_context(recipe, model, data.steps_per_epoch, task, facts, manager)
    evaluate = build_evaluate(
        eval_model, task, autocast_dtype_of(recipe, torch_device), views=eval_views(manager, build)
    )
    return evaluate(state, data.eval_batches("test"))
