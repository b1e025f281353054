"""Checks of a checkpoint's contents against the run that would continue from it.

A checkpoint that passes its checksum and loads with ``weights_only=True`` holds only tensors
and plain containers, but not necessarily the right ones: a hand-made or foreign file can hold
a parameter as a list, a step as text, an empty optimizer state or random bytes as an RNG
state. :func:`state_problem` says in a few words what is wrong before any of it is used, so
resume passes such a file over for an older one and eval refuses it in a sentence.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from hooktrain.config.recipe import Recipe
from hooktrain.core.plugin import Plugin, make_plugin_manager
from hooktrain.core.state import TrainState
from hooktrain.errors import HooktrainError
from hooktrain.run.build import (
    build_context,
    build_task,
    compose_chain,
    plugin_model,
    recipe_model,
)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _dense(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.layout == torch.strided


def _tensors_problem(what: str, saved: Any, expected: dict[str, torch.Tensor]) -> str | None:
    if not isinstance(saved, dict) or saved.keys() != expected.keys():
        return f"its {what} do not have this recipe's model's names"
    for name, tensor in expected.items():
        value = saved[name]
        if not _dense(value) or value.shape != tensor.shape:
            return f"its {what} entry {name} is not a dense tensor of shape {tuple(tensor.shape)}"
        if value.dtype != tensor.dtype:
            return f"its {what} entry {name} is {value.dtype}, not {tensor.dtype}"
    return None


def _structure_problem(what: str, saved: Any, expected: Any) -> str | None:
    saved_leaves, saved_spec = tree_flatten(saved)
    expected_leaves, expected_spec = tree_flatten(expected)
    if saved_spec != expected_spec:
        return f"its {what} does not have this recipe's structure"
    for value, template in zip(saved_leaves, expected_leaves, strict=True):
        if isinstance(template, torch.Tensor) and not (
            _dense(value) and value.shape == template.shape and value.dtype == template.dtype
        ):
            return f"its {what} holds a tensor of the wrong shape or type"
    return None


def _rng_problem(saved: Any) -> str | None:
    if not isinstance(saved, dict) or not {"data", "torch"} <= saved.keys():
        return "its random-number generator states are missing"
    for name, value in saved.items():
        if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
            return f"its {name} generator state is not a byte tensor"
        if name != "cuda":  # a CUDA state can only be tried on a GPU; its size is checked there
            try:
                torch.Generator().set_state(value)
            except RuntimeError:
                return f"its {name} generator state is not one a generator accepts"
    return None


def state_problem(
    saved: Any, expected: TrainState, epochs: int, steps_per_epoch: int | None
) -> str | None:
    """What makes a checkpoint's ``state`` unusable for a run whose fresh state is
    ``expected`` (shapes and types only matter: it may live on the meta device), or None.

    ``steps_per_epoch`` (None when unknown) also checks that step and epoch agree.
    """
    if not isinstance(saved, dict):
        return "its state is not a record"
    step, epoch = saved.get("step"), saved.get("epoch")
    if not _is_count(step) or not _is_count(epoch):
        return "its step and epoch are not whole numbers of 0 or more"
    if epoch > epochs:
        return f"it is at epoch {epoch} of a run of {epochs}"
    if steps_per_epoch is not None:
        done = step - epoch * steps_per_epoch
        if not (0 <= done < steps_per_epoch or (epoch == epochs and done == 0)):
            return f"its step {step} does not fit epoch {epoch} at {steps_per_epoch} steps an epoch"
    return (
        _tensors_problem("parameters", saved.get("params"), expected.params)
        or _tensors_problem("buffers", saved.get("buffers"), expected.buffers)
        or _structure_problem("optimizer state", saved.get("opt_state"), expected.opt_state)
        or _structure_problem(
            "gradient transforms' state", saved.get("transforms"), expected.transforms
        )
        or _structure_problem("step key", saved.get("key"), expected.key)
        or _rng_problem(saved.get("rng"))
    )


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def progress_problem(payload: dict[str, Any]) -> str | None:
    """What makes a checkpoint's mid-epoch ``progress`` record unusable, or None (also when
    the checkpoint has none: version 1 files)."""
    if "progress" not in payload:
        return None
    saved = payload["progress"]
    if not (
        isinstance(saved, dict)
        and _is_finite_number(saved.get("loss_sum"))
        and _is_finite_number(saved.get("seconds"))
        and saved["seconds"] >= 0
    ):
        return "its epoch progress record is malformed"
    return None


def plugin_states_problem(saved: Any, plugins: Sequence[Plugin]) -> str | None:
    """What makes a checkpoint's per-plugin states unusable for ``plugins``, or None.

    Each state is tried on a copy of its plugin, whose ``load_state_dict`` refuses what it
    cannot take (TypeError, ValueError, KeyError); the plugins themselves stay untouched.
    """
    if not isinstance(saved, dict):
        return "its plugin states are malformed"
    for plugin in plugins:
        state = saved.get(plugin.name, {})
        try:
            if not isinstance(state, dict):
                raise TypeError("not a record")
            copy.deepcopy(plugin).load_state_dict(state)
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            return f"its state of the plugin {plugin.name!r} is malformed ({error})"
    return None


def expected_state(recipe: Recipe, facts: dict[str, Any], steps_per_epoch: int) -> TrainState:
    """A fresh state of a run of ``recipe`` on the meta device: its shapes and types, no data.

    ``facts`` are what the run told the model factory (config.json keeps them); the plugins
    give the model and the gradient chain as they did for the run."""
    manager = make_plugin_manager([copy.deepcopy(p) for p in recipe.plugins])
    with torch.device("meta"):
        model = plugin_model(recipe, recipe_model(recipe, facts), manager)
        build = build_context(recipe, model, steps_per_epoch, build_task(recipe), facts, manager)
        return TrainState.create(model, compose_chain(manager, build), recipe.seed)


def checkpoint_problem(
    payload: dict[str, Any], recipe: Recipe, run_info: dict[str, Any]
) -> str | None:
    """What makes a loaded checkpoint unusable to continue (or evaluate) a run of ``recipe``
    whose config's ``run`` section is ``run_info``, or None."""
    facts, steps_per_epoch = run_info.get("model_facts"), run_info.get("steps_per_epoch")
    if not isinstance(facts, dict) or not isinstance(facts.get("input_shape"), list):
        return "its run was written by an older hooktrain, which did not record the model's facts"
    try:
        expected = expected_state(
            recipe, facts, steps_per_epoch if isinstance(steps_per_epoch, int) else 1
        )
    except (HooktrainError, TypeError, ValueError, RuntimeError) as error:
        return f"its run's recorded model facts do not build this recipe's model ({error})"
    problem = state_problem(
        payload["state"],
        expected,
        recipe.epochs,
        steps_per_epoch if isinstance(steps_per_epoch, int) else None,
    )
    return (
        problem
        or progress_problem(payload)
        or plugin_states_problem(payload["plugins"], recipe.plugins)
    )
