"""The resolved configuration: a recipe as plain JSON data, and back.

A saved configuration is data. Rebuilding a recipe from it never imports what it names: plugin
classes come from the registry (built-in plugins and installed entry points) or from the recipe
file the user names on the command line, so a crafted ``config.json`` or checkpoint cannot make
hooktrain run code.
"""

from __future__ import annotations

import types
from typing import Any

from hooktrain.config.overrides import evolve_checked, ref_with_args
from hooktrain.config.recipe import Recipe, field_names
from hooktrain.config.ref import Ref
from hooktrain.config.registry import (
    FIELDS,
    import_object,
    recipe_paths,
    registered,
    registered_name,
)
from hooktrain.core.plugin import PLUGIN_GROUP, Plugin, class_path, plugin_classes
from hooktrain.errors import HooktrainError, shown
from hooktrain.run.files import RECIPE_FILE_MODULE


def _jsonable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def ref_path(kind: str, ref: Ref) -> str:
    """How config.json names a reference's factory: its registered name when it has one,
    else ``module:qualname`` (a recipe file's callables under the recipe-file module)."""
    if isinstance(ref.factory, str):
        return ref.factory
    name = registered_name(kind, ref.factory)
    return name or f"{ref.factory.__module__}:{ref.factory.__qualname__}"


def _ref_to_json(kind: str, ref: Ref) -> dict[str, Any]:
    args = {key: _jsonable(value) for key, value in ref.args.items()}
    return {"factory": ref_path(kind, ref), "label": ref.label, "args": args}


def _field_to_json(recipe: Recipe, field: str) -> Any:
    value = getattr(recipe, field)
    if field in FIELDS:
        return _ref_to_json(FIELDS[field], value)
    if field == "augment":
        return [_ref_to_json("augment", piece) for piece in value]
    return _jsonable(value)


def recipe_to_config(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain JSON data; :func:`recipe_from_config` rebuilds it."""
    fields = {f: _field_to_json(recipe, f) for f in ["name", *field_names(Recipe)]}
    plugins = [
        {
            "class": class_path(type(p)),
            "name": p.name,
            "settings": {k: _jsonable(v) for k, v in p.settings().items() if k != "name"},
        }
        for p in recipe.plugins
    ]
    return {"recipe": fields, "plugins": plugins}


def file_plugin_classes(module: types.ModuleType) -> dict[str, type[Plugin]]:
    """The plugin classes a recipe file brings, by class name: those it defines or imports,
    and those of its recipe's plugins."""
    recipe = getattr(module, "recipe", None)
    found = [value for value in vars(module).values() if isinstance(value, type)]
    found += [type(p) for p in recipe.plugins] if isinstance(recipe, Recipe) else []
    return {cls.__qualname__: cls for cls in found if issubclass(cls, Plugin)}


def _saved_plugin_class(
    path: Any, allowed: dict[str, type[Plugin]], recipe_module: types.ModuleType | None
) -> type[Plugin]:
    """The class a saved config names, looked up among the classes hooktrain may build.

    Nothing is imported from the saved text: a config is data, and a class path in it could
    name any callable (``os:makedirs``). Classes come from the registry (built-in plugins and
    installed entry points) or the recipe file the user named on the command line (looked up
    by class name, so the file may have been renamed).
    """
    if not isinstance(path, str):
        raise HooktrainError(f"A saved plugin class must be text, not {path!r}.")
    if path in allowed:
        return allowed[path]
    module_name, _, qualname = path.partition(":")
    if module_name.startswith(RECIPE_FILE_MODULE):
        if recipe_module is None:
            raise HooktrainError(
                f"This run uses the plugin class {shown(path)}, defined in its recipe file; "
                "name that file with --recipe FILE (a recipe file's code runs only when you "
                "name it)."
            )
        classes = file_plugin_classes(recipe_module)
        if qualname in classes:
            return classes[qualname]
        raise HooktrainError(
            f"The recipe file {shown(recipe_module.__file__)} defines no plugin class "
            f"{shown(qualname)}, which this run used; name the recipe file the run was "
            "started with."
        )
    raise HooktrainError(
        f"The saved plugin class {shown(path)} is not a hooktrain plugin (built in, or "
        f"installed under the {PLUGIN_GROUP!r} entry-point group), so it was not imported; "
        "install the package that provides it, or start the run again."
    )


def recipe_from_config(
    config: dict[str, Any], recipe_module: types.ModuleType | None = None
) -> Recipe:
    """The recipe a saved configuration describes.

    ``recipe_module`` is the recipe file the user named (see :func:`load_recipe_module`), the
    only place besides the registry that plugin classes may come from.
    """
    allowed = {class_path(cls): cls for cls in plugin_classes().values()}
    if recipe_module is not None:
        allowed.update({class_path(c): c for c in file_plugin_classes(recipe_module).values()})
    try:
        plugins = []
        for entry in config["plugins"]:
            cls = _saved_plugin_class(entry["class"], allowed, recipe_module)
            name = entry["name"]
            if not isinstance(name, str) or not isinstance(entry["settings"], dict):
                raise TypeError("a plugin's name must be text and its settings an object")
            plugin = evolve_checked(
                cls(name=name), entry["settings"], "The saved plugin", f"{name}."
            )
            plugins.append(plugin)
        fields = dict(config["recipe"])
        name = fields.pop("name")
        trusted = _trusted_paths(name, recipe_module)
        refs: dict[str, Any] = {
            field: _saved_ref(kind, fields.pop(field), trusted, recipe_module)
            for field, kind in FIELDS.items()
        }
        refs["augment"] = tuple(
            _saved_ref("augment", piece, trusted, recipe_module) for piece in fields.pop("augment")
        )
        source = recipe_module.__file__ if recipe_module is not None else None
        base = Recipe(name=name, plugins=tuple(plugins), source=source, **refs)
        return evolve_checked(base, fields, "The saved recipe")
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as error:
        raise HooktrainError(
            f"The saved configuration is incomplete or malformed ({type(error).__name__}: "
            f"{error}); it was not written by this version of hooktrain: start the run again."
        ) from error


def _recipe_refs(recipe: Recipe) -> list[tuple[str, Ref]]:
    return [(kind, getattr(recipe, field)) for field, kind in FIELDS.items()] + [
        ("augment", piece) for piece in recipe.augment
    ]


def _trusted_paths(name: Any, recipe_module: types.ModuleType | None) -> set[str]:
    """The import paths a saved config may name: those the recipe itself names, in the file the
    user named or in the registered recipe of the saved name (both code the user chose)."""
    recipe = getattr(recipe_module, "recipe", None) if recipe_module is not None else None
    known = recipe_paths()
    if recipe is None and isinstance(name, str) and name in known:
        recipe = import_object(known[name])
    if not isinstance(recipe, Recipe):
        return set()
    return {ref_path(kind, ref) for kind, ref in _recipe_refs(recipe)}


def _saved_ref(
    kind: str, saved: Any, trusted: set[str], recipe_module: types.ModuleType | None
) -> Ref:
    """The reference a saved config describes, resolved without importing what it names:
    a registered name, a callable of the recipe file the user named, or an import path that
    the user's recipe itself names."""
    if not isinstance(saved, dict) or not isinstance(saved.get("factory"), str):
        raise TypeError(f"a saved {kind} must be an object with a factory name")
    path, args, label = saved["factory"], saved["args"], saved["label"]
    if not isinstance(args, dict) or not isinstance(label, str):
        raise TypeError(f"a saved {kind}'s args must be an object and its label text")
    module_name, colon, qualname = path.partition(":")
    if not colon and path in registered(kind):
        ref = Ref(path)
    elif module_name.startswith(RECIPE_FILE_MODULE):
        own = getattr(recipe_module, qualname, None) if recipe_module is not None else None
        if not callable(own):
            raise HooktrainError(
                f"This run's {kind} {shown(path)} is defined in its recipe file; name that file "
                "with --recipe FILE (a recipe file's code runs only when you name it)."
            )
        ref = Ref(own)
    elif path in trusted:
        ref = Ref(path)
    else:
        raise HooktrainError(
            f"The saved {kind} {shown(path)} is neither registered (built in, or installed under "
            "an entry point) nor named by the recipe, so it was not imported; name the recipe "
            "file that uses it with --recipe FILE, or install the package that registers it."
        )
    return ref_with_args(kind, ref, args, f"The saved {kind}", f"{kind}.").named(label)
