"""Recipes: a run described as data, and the one way to override it.

Precedence is fixed: the recipe's defaults < the recipe (built-in, installed or a ``.py`` file)
< the command line (``--without``, then ``--with``, then ``--set`` in the order given). Keys are
recipe fields (``epochs``) or ``PLUGIN.FIELD`` (``grad_clip.max``); unknown keys and values of
the wrong type are errors that name the valid choices.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import re
import traceback
import types
import typing
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import attrs

from hooktrain.core.plugin import (
    Plugin,
    import_object,
    make_plugin,
)
from hooktrain.errors import HooktrainError, shown
from hooktrain.run.files import RECIPE_FILE_MODULE

RECIPE_GROUP = "hooktrain.recipes"
BUILTIN_RECIPES = {
    "resnet9_cifar10": "hooktrain.recipes.resnet9_cifar10:recipe",
    "resnet9_fast": "hooktrain.recipes.resnet9_fast:recipe",
}

# torch seeds are 64-bit; a run adds offsets to its seed (the data generator, an ablation's seeds).
SEED_LIMIT = 2**62

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and value <= 0:
        raise HooktrainError(f"{attribute.name} must be greater than 0, not {value!r}.")
    if value is not None and not math.isfinite(value):
        raise HooktrainError(f"{attribute.name} must be a finite number, not {value!r}.")


def _unit_interval(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not 0 <= value < 1:
        raise HooktrainError(f"{attribute.name} must be at least 0 and below 1, not {value!r}.")


def _betas(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not all(0 <= beta < 1 for beta in value):
        raise HooktrainError(
            f"betas must be two numbers at least 0 and below 1 (e.g. 0.9,0.999), not {value!r}."
        )


def _positive_each(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not all(0 < item < math.inf for item in value):
        raise HooktrainError(f"every value of {attribute.name} must be above 0, not {value!r}.")


def _finite_each(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not all(math.isfinite(item) for item in value):
        raise HooktrainError(f"every value of {attribute.name} must be finite, not {value!r}.")


def _non_negative(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value < 0:
        raise HooktrainError(f"{attribute.name} must be 0 or more, not {value!r}.")


def _name(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    # It names run folders (runs/NAME-TIME): no path separators, no leading dot.
    if not isinstance(value, str) or not re.fullmatch(r"[\w+=,-][\w.+=,-]{0,99}", value):
        raise HooktrainError(
            f"A recipe's name must be 1 to 100 letters, digits and . _ - + = , (no slashes, "
            f"not starting with a dot), not {value!r}."
        )


def _seed(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not -SEED_LIMIT <= value <= SEED_LIMIT:
        raise HooktrainError(f"seed must be between {-SEED_LIMIT} and {SEED_LIMIT}, not {value!r}.")


@attrs.frozen(kw_only=True)
class Recipe:
    """A training run: model, data, optimizer, hyperparameters and plugins.

    Choice fields are typed with ``Literal`` so overrides are checked against them; ``auto``
    precision and memory format mean bf16 autocast and channels_last on CUDA, fp32 and
    contiguous on CPU.
    """

    name: str = attrs.field(validator=_name)
    model: str = "resnet9"
    width: int = attrs.field(default=64, validator=_positive)
    dropout: float = attrs.field(default=0.0, validator=_unit_interval)
    conv_bias: bool = True
    logit_scale: float = attrs.field(default=1.0, validator=_positive)
    tta_flip: bool = False
    epochs: int = attrs.field(default=8, validator=_positive)
    batch_size: int = attrs.field(default=400, validator=_positive)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    max_lr: float = attrs.field(default=0.01, validator=_positive)
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.999), validator=_betas)
    eps: float = attrs.field(default=1e-8, validator=_positive)
    momentum: float = attrs.field(default=0.9, validator=_unit_interval)
    nesterov: bool = True
    pad: int = attrs.field(default=4, validator=_non_negative)
    pad_mode: Literal["reflect", "zeros"] = "reflect"
    flip: bool = True
    mean: tuple[float, float, float] = attrs.field(default=CIFAR10_MEAN, validator=_finite_each)
    std: tuple[float, float, float] = attrs.field(default=CIFAR10_STD, validator=_positive_each)
    train_limit: int | None = attrs.field(default=None, validator=_positive)
    eval_batch_size: int = attrs.field(default=1000, validator=_positive)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    compile: bool = False
    # No CUDA-graph modes (reduce-overhead, max-autotune): a replay overwrites the outputs of
    # the previous one, and the step's outputs are the next step's state (seen on an H100).
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    seed: int = attrs.field(default=0, validator=_seed)
    plugins: tuple[Plugin, ...] = ()
    source: str | None = None
    """The recipe file this recipe came from (absolute path), None for a registered recipe:
    a run of it resumes only when the user names that file again."""

    def plugin(self, name: str) -> Plugin | None:
        """The plugin instance with this name, if the recipe has one."""
        return next((p for p in self.plugins if p.name == name), None)


def field_names(cls: type) -> list[str]:
    """The fields a user may set on an attrs class."""
    return [
        f.name for f in attrs.fields(cls) if f.init and f.name not in ("plugins", "name", "source")
    ]


# --------------------------------------------------------------------------------------------
# Typed values from text (command line) and JSON (saved configs)
# --------------------------------------------------------------------------------------------

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` (text or JSON) as an instance of ``annotation``, or a sentence saying why not."""

    def fail(expected: str) -> HooktrainError:
        return HooktrainError(f"{key} must be {expected}, not {value!r}.")

    origin = get_origin(annotation)
    if origin is Literal:
        choices = get_args(annotation)
        if value not in choices:
            raise fail("one of " + ", ".join(map(str, choices)))
        return value
    if origin in (types.UnionType, typing.Union):
        options = [a for a in get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, options[0], key)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        item_types = get_args(annotation)
        if not isinstance(items, list | tuple):
            raise fail("a comma-separated list")
        if item_types[-1] is Ellipsis:
            return tuple(coerce(item, item_types[0], key) for item in items)
        if len(items) != len(item_types):
            raise fail(f"{len(item_types)} comma-separated values")
        return tuple(coerce(i, t, key) for i, t in zip(items, item_types, strict=True))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise fail("true or false")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise fail(f"a number ({annotation.__name__})")
        try:
            number = annotation(value)
        except (TypeError, ValueError, OverflowError):
            raise fail(f"a number ({annotation.__name__})") from None
        if annotation is int and isinstance(value, float) and value != number:
            raise fail("a whole number")
        if annotation is float and math.isnan(number):
            raise fail("a number (float)")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise fail("text")
        return value
    raise HooktrainError(f"{key} cannot be set from the command line.")


def _unknown_key(key: str, valid: Sequence[str], where: str) -> HooktrainError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return HooktrainError(
        f"{where} has no setting {key!r}.{hint} Valid settings: {', '.join(valid)}."
    )


def evolve_checked(obj: Any, changes: dict[str, Any], where: str, prefix: str = "") -> Any:
    """``attrs.evolve`` with every value coerced to its field's type."""
    types_ = typing.get_type_hints(type(obj))
    valid = field_names(type(obj))
    typed = {}
    for key, value in changes.items():
        if key not in valid:
            raise _unknown_key(prefix + key, [prefix + name for name in valid], where)
        typed[key] = coerce(value, types_[key], prefix + key)
    return attrs.evolve(obj, **typed)


def parse_assignment(text: str) -> tuple[str, str]:
    """``"key=value"`` as its two halves."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise HooktrainError(f"--set takes KEY=VALUE (e.g. --set epochs=12), not {text!r}.")
    return key.strip(), value.strip()


def apply_overrides(
    recipe: Recipe,
    assignments: Sequence[str] = (),
    with_plugins: Sequence[str] = (),
    without_plugins: Sequence[str] = (),
) -> Recipe:
    """The recipe with plugins dropped, added and settings changed, as the command line asks.

    An added plugin goes after the recipe's plugins but before the ``metrics`` and
    ``checkpoint`` that close the list, which record and save what the others did; those two,
    added themselves, go last.
    """
    closing = ("metrics", "checkpoint")
    plugins = list(recipe.plugins)
    for name in without_plugins:
        if recipe.plugin(name) is None:
            raise HooktrainError(
                f"--without {shown(name)}: the recipe {recipe.name!r} has no plugin {name!r} "
                f"(its plugins: {', '.join(p.name for p in plugins) or 'none'})."
            )
        plugins = [p for p in plugins if p.name != name]
    for name in with_plugins:
        if any(p.name == name for p in plugins):
            raise HooktrainError(f"--with {name}: the recipe already has the plugin {name!r}.")
        plugin = make_plugin(name)
        position = len(plugins)
        while plugin.name not in closing and position and plugins[position - 1].name in closing:
            position -= 1
        plugins.insert(position, plugin)

    recipe_changes: dict[str, str] = {}
    plugin_changes: dict[str, dict[str, str]] = {}
    for text in assignments:
        key, value = parse_assignment(text)
        prefix, dot, rest = key.partition(".")
        if dot:
            if not any(p.name == prefix for p in plugins):
                names = [p.name for p in plugins]
                close = difflib.get_close_matches(prefix, names, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise HooktrainError(
                    f"--set {shown(key)}: there is no plugin {prefix!r} in this run "
                    f"({hint}plugins: {', '.join(names) or 'none'}); add it with "
                    f"--with {shown(prefix)} or check the spelling."
                )
            plugin_changes.setdefault(prefix, {})[rest] = value
        else:
            recipe_changes[key] = value
    plugins = [
        evolve_checked(p, plugin_changes[p.name], f"The plugin {p.name!r}", f"{p.name}.")
        if p.name in plugin_changes
        else p
        for p in plugins
    ]
    return evolve_checked(
        attrs.evolve(recipe, plugins=tuple(plugins)), recipe_changes, "The recipe"
    )


# --------------------------------------------------------------------------------------------
# Finding recipes
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
