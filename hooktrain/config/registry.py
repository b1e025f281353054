"""The registry: every named part a recipe can use, built in or installed, and the recipes.

Each kind of part has built-ins and an entry-point group through which installed packages add
their own (``[project.entry-points."hooktrain.models"] small_cnn = "mypackage.nets:small_cnn"``).
A reference resolves to a callable here; calling it with the run's facts builds the part.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import traceback
import types
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

import attrs

from hooktrain.config.recipe import Recipe
from hooktrain.config.ref import Ref, parameters, takes_any_keyword
from hooktrain.core.plugin import import_object
from hooktrain.errors import HooktrainError, short_reason, shown
from hooktrain.run.files import RECIPE_FILE_MODULE

RECIPE_GROUP = "hooktrain.recipes"
BUILTIN_RECIPES = {
    "resnet9_cifar10": "hooktrain.recipes.resnet9_cifar10:recipe",
    "resnet9_fast": "hooktrain.recipes.resnet9_fast:recipe",
    "airbench94": "hooktrain.recipes.airbench94:recipe",
    "airbench94_muon": "hooktrain.recipes.airbench94_muon:recipe",
    "resnet18_cifar10": "hooktrain.recipes.resnet18_cifar10:recipe",
    "resnet9_image_folder": "hooktrain.recipes.resnet9_image_folder:recipe",
    "mlp_tabular": "hooktrain.recipes.mlp_tabular:recipe",
}

Kind = Literal["model", "data", "augment", "task"]

BUILTINS: dict[str, dict[str, str]] = {
    "model": {
        "resnet9": "hooktrain.models.resnet9:resnet9",
        "airbench_net": "hooktrain.models.airbench:airbench_net",
        "resnet18": "hooktrain.models.resnet18:resnet18",
        "mlp": "hooktrain.models.mlp:mlp",
    },
    "data": {
        "cifar10": "hooktrain.data.sources:load_cifar10",
        "image_folder": "hooktrain.data.image_folders:load_image_folder",
        "torchvision": "hooktrain.data.torchvision_sets:load_torchvision",
    },
    "augment": {
        "crop": "hooktrain.data.augment:RandomCrop",
        "flip": "hooktrain.data.augment:RandomFlip",
        "altflip": "hooktrain.data.epochwise:AlternatingFlip",
        "cutout": "hooktrain.data.augment:Cutout",
        "resize": "hooktrain.data.augment:Resize",
        "normalize": "hooktrain.data.augment:Normalize",
    },
    "task": {
        "classification": "hooktrain.core.task:Classification",
        "regression": "hooktrain.core.task:Regression",
    },
}

GROUPS: dict[str, str] = {
    "model": "hooktrain.models",
    "data": "hooktrain.data",
    "augment": "hooktrain.augment",
    "task": "hooktrain.tasks",
}

FIELDS: dict[str, Kind] = {"model": "model", "data": "data", "task": "task"}
"""The recipe fields that hold one reference each, and their kind (``augment`` holds a chain)."""


def registered(kind: str) -> dict[str, str]:
    """Every registered part of ``kind`` by name: ``"module:attribute"``, built-ins first."""
    paths = dict(BUILTINS[kind])
    paths.update({entry.name: entry.value for entry in entry_points(group=GROUPS[kind])})
    return paths


def unknown(kind: str, name: str) -> HooktrainError:
    known = registered(kind)
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return HooktrainError(
        f"Unknown {kind} {shown(name)}.{hint} Registered: {', '.join(sorted(known)) or 'none'}; "
        f"a recipe file can also name its own callable, or an import path package.module:name."
    )


def resolve(kind: str, factory: str | Callable[..., Any]) -> Callable[..., Any]:
    """The callable a reference names: itself, a registered name, or an import path.

    Only references written in code or typed on the command line come here: a reference read
    back from a saved file is checked by :mod:`hooktrain.config.stored` first.
    """
    if callable(factory):
        return factory
    known = registered(kind)
    path = known.get(factory)
    if path is None and ":" not in factory:
        raise unknown(kind, factory)
    try:
        found = import_object(path or factory)
    except (ImportError, AttributeError, ValueError) as error:
        raise HooktrainError(
            f"The {kind} {shown(factory)} could not be imported ({short_reason(error)}); check "
            "the name, or install the package that provides it."
        ) from error
    if not callable(found):
        raise HooktrainError(f"The {kind} {shown(factory)} is not a callable.")
    return found


def registered_name(kind: str, factory: Callable[..., Any]) -> str | None:
    """The registered name of ``factory``, if it is registered."""
    for name, path in registered(kind).items():
        module, _, attribute = path.partition(":")
        if factory.__module__ == module and factory.__qualname__ == attribute:
            return name
    return None


def build(kind: str, ref: Ref, **facts: Any) -> Any:
    """Call the factory ``ref`` names with its arguments, plus the run's ``facts`` (the number of
    classes, the input shape, the data folder, ...) that it declares and the recipe left out."""
    factory = resolve(kind, ref.factory)
    declared = parameters(factory)
    given = {
        key: value
        for key, value in facts.items()
        if key not in ref.args and (key in declared or takes_any_keyword(factory))
    }
    try:
        return factory(**ref.args, **given)
    except HooktrainError:
        raise
    except TypeError as error:
        if error.__traceback__ is not None and error.__traceback__.tb_next is None:
            valid = ", ".join(name for name in declared if name not in facts) or "none"
            raise HooktrainError(
                f"The {kind} {ref.label!r} cannot be called with {dict(ref.args)!r} "
                f"({short_reason(error)}); its settings: {valid}."
            ) from error
        raise


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------


def recipe_paths() -> dict[str, str]:
    """Every recipe by name: ``"module:attribute"`` of the built-in and installed ones."""
    paths = dict(BUILTIN_RECIPES)
    paths.update({entry.name: entry.value for entry in entry_points(group=RECIPE_GROUP)})
    return paths


def _file_module(path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"{RECIPE_FILE_MODULE}{path.stem}", path)
    if spec is None or spec.loader is None:
        raise HooktrainError(f"{shown(path)} is not a Python file; a recipe file ends in .py.")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except HooktrainError:
        raise
    except SystemExit as error:
        raise HooktrainError(
            f"The recipe file {shown(path)} called sys.exit({error.code!r}) while loading, so "
            "there is no recipe to train; a recipe file only assigns `recipe = Recipe(...)`."
        ) from error
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # the user's own code: one sentence that says what and where
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        lines = [
            f.lineno for f in traceback.extract_tb(error.__traceback__) if f.filename == str(path)
        ]
        where = f" at line {lines[-1]}" if lines and not isinstance(error, SyntaxError) else ""
        raise HooktrainError(
            f"The recipe file {shown(path)} failed to run{where} ({reason}); fix it and try again."
        ) from error
    return module


def load_recipe_module(name: str) -> tuple[Recipe, types.ModuleType]:
    """A recipe by registered name, or from a ``.py`` file that assigns ``recipe``, and the
    module that defines it (where an ``ablation`` may be declared beside it)."""
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise HooktrainError(f"The recipe file {shown(path)} does not exist.")
        module = _file_module(path)
        recipe = getattr(module, "recipe", None)
        if not isinstance(recipe, Recipe):
            raise HooktrainError(
                f"{shown(path)} defines no `recipe = Recipe(...)`; a recipe file must assign one."
            )
        return attrs.evolve(recipe, source=str(path.resolve())), module
    paths = recipe_paths()
    if name not in paths:
        close = difflib.get_close_matches(name, list(paths), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise HooktrainError(
            f"Unknown recipe {name!r}.{hint} Known recipes: {', '.join(sorted(paths))} "
            "(or pass a .py file that assigns `recipe`)."
        )
    recipe = import_object(paths[name])
    if not isinstance(recipe, Recipe):
        raise HooktrainError(f"The recipe {name!r} ({paths[name]}) is not a hooktrain Recipe.")
    return recipe, importlib.import_module(paths[name].partition(":")[0])


def load_recipe(name: str) -> Recipe:
    """A recipe by registered name, or from a ``.py`` file that assigns ``recipe``."""
    return load_recipe_module(name)[0]
