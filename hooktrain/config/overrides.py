"""Overrides: the one way to change a recipe, from the command line or an ablation.

Precedence is fixed: the recipe's defaults < the recipe (built-in, installed or a ``.py`` file)
< the command line (``--without``, then ``--with``, then ``--set`` in the order given). Keys are
recipe fields (``epochs``), ``PLUGIN.FIELD`` (``grad_clip.max``), an argument of a reference
(``model.width``, ``data.image_size``, ``task.top_k``), of an augmentation piece
(``augment.crop.pad``), a reference's factory (``model=resnet9``) or the augmentation chain
(``augment=crop,flip,normalize``). Unknown keys and values of the wrong type are errors that
name the valid choices.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args, get_origin

import attrs

from hooktrain.config.recipe import Recipe, field_names
from hooktrain.config.ref import Ref, parameters, takes_any_keyword
from hooktrain.config.registry import FIELDS, build, registered, resolve, unknown
from hooktrain.core.plugin import Plugin, make_plugin
from hooktrain.errors import HooktrainError, shown

FACTS = frozenset({"num_classes", "num_outputs", "input_shape", "in_channels", "data_dir", "echo"})
"""What the run passes to the factories that declare it: a recipe does not set these."""


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


# --------------------------------------------------------------------------------------------
# Arguments of references
# --------------------------------------------------------------------------------------------


def _annotations(factory: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(factory)
    except Exception:  # an annotation that names a type only a type checker sees
        return {}


def _guess(value: Any, key: str) -> Any:
    """Text for an argument the factory does not annotate: a number, true/false, none or text."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return coerce(value, kind, key)
        except HooktrainError:
            pass
    if value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    return None if value.lower() in ("none", "null") else value


def settings_of(factory: Callable[..., Any]) -> list[str]:
    """The arguments of a factory that a recipe may set (not the facts the run passes)."""
    return [
        name
        for name, p in parameters(factory).items()
        if name not in FACTS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def ref_with_args(kind: str, ref: Ref, changes: dict[str, Any], where: str, prefix: str) -> Ref:
    """``ref`` with arguments changed, each coerced to the type its factory declares."""
    factory = resolve(kind, ref.factory)
    valid = settings_of(factory)
    hints = _annotations(factory)
    typed = {}
    for key, value in changes.items():
        if key not in valid and not takes_any_keyword(factory):
            raise _unknown_key(prefix + key, [prefix + name for name in valid], where)
        if key in hints:
            typed[key] = coerce(value, hints[key], prefix + key)
        elif key in ref.args and ref.args[key] is not None:
            typed[key] = coerce(value, type(ref.args[key]), prefix + key)
        else:
            typed[key] = _guess(value, prefix + key)
    return ref.with_args(**typed)


def _replaced_factory(kind: str, name: str, recipe_module: types.ModuleType | None) -> Ref:
    """A reference to another factory: a registered name or a callable of the recipe file."""
    own = getattr(recipe_module, name, None) if recipe_module is not None else None
    if callable(own):
        return Ref(own)
    if name not in registered(kind):
        raise unknown(kind, name)
    return Ref(name)


def _chain_from_text(
    recipe: Recipe, value: str, module: types.ModuleType | None
) -> tuple[Ref, ...]:
    """``crop,flip,normalize``: pieces of the chain by label (keeping their arguments) or new
    pieces by registered name (or a callable of the recipe file); ``none`` for none."""
    if value.strip().lower() in ("", "none"):
        return ()
    chain = []
    for label in (part.strip() for part in value.split(",")):
        chain.append(recipe.piece(label) or _replaced_factory("augment", label, module))
    return tuple(chain)


def _set_ref(recipe: Recipe, key: str, value: str, module: types.ModuleType | None) -> Recipe:
    """The recipe with one reference key (``model.width``, ``augment.crop.pad``, ``model``) set."""
    field, _, rest = key.partition(".")
    if field == "augment":
        if not rest:
            return attrs.evolve(recipe, augment=_chain_from_text(recipe, value, module))
        label, dot, argument = rest.partition(".")
        piece = recipe.piece(label)
        if piece is None or not dot:
            labels = ", ".join(p.label for p in recipe.augment) or "none"
            raise HooktrainError(
                f"--set {shown(key)}: the augmentation chain has no piece {label!r} (its "
                f"pieces: {labels}); set augment.PIECE.SETTING, or the chain with "
                "--set augment=crop,flip,normalize."
            )
        changed = ref_with_args(
            "augment", piece, {argument: value}, f"The piece {label!r}", f"augment.{label}."
        )
        build("augment", changed)  # a piece checks its settings when made: refuse them now
        chain = tuple(changed if p is piece else p for p in recipe.augment)
        return attrs.evolve(recipe, augment=chain)
    kind = FIELDS[field]
    ref = getattr(recipe, field)
    if not rest:
        return attrs.evolve(recipe, **{field: _replaced_factory(kind, value, module)})
    changed = ref_with_args(kind, ref, {rest: value}, f"The {kind} {ref.label!r}", f"{field}.")
    if kind == "task":  # a task is made without the data: refuse its bad settings now
        build(kind, changed)
    return attrs.evolve(recipe, **{field: changed})


def _changed_plugins(
    recipe: Recipe, with_plugins: Sequence[str], without_plugins: Sequence[str]
) -> list[Plugin]:
    """The recipe's plugins with some dropped and some added.

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
    return plugins


def apply_overrides(
    recipe: Recipe,
    assignments: Sequence[str] = (),
    with_plugins: Sequence[str] = (),
    without_plugins: Sequence[str] = (),
    recipe_module: types.ModuleType | None = None,
) -> Recipe:
    """The recipe with plugins dropped, added and settings changed, as the command line asks.

    ``recipe_module`` is the recipe file the recipe came from, whose callables ``--set
    model=NAME`` may name.
    """
    plugins = _changed_plugins(recipe, with_plugins, without_plugins)
    recipe = attrs.evolve(recipe, plugins=tuple(plugins))
    recipe_changes: dict[str, str] = {}
    plugin_changes: dict[str, dict[str, str]] = {}
    for text in assignments:
        key, value = parse_assignment(text)
        prefix, dot, rest = key.partition(".")
        if prefix in FIELDS or prefix == "augment":
            recipe = _set_ref(recipe, key, value, recipe_module)
        elif dot:
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
        for p in recipe.plugins
    ]
    return evolve_checked(
        attrs.evolve(recipe, plugins=tuple(plugins)), recipe_changes, "The recipe"
    )
