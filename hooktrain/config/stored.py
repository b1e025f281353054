"""The resolved configuration: a recipe as plain JSON data, and back.

A saved configuration is data. Rebuilding a recipe from it never imports what it names: plugin
classes come from the registry (built-in plugins and installed entry points) or from the recipe
file the user names on the command line, so a crafted ``config.json`` or checkpoint cannot make
hooktrain run code.
"""

from __future__ import annotations

import types
from typing import Any

from hooktrain.config.recipe import Recipe, evolve_checked, field_names
from hooktrain.core.plugin import PLUGIN_GROUP, Plugin, class_path, plugin_classes
from hooktrain.errors import HooktrainError, shown
from hooktrain.run.files import RECIPE_FILE_MODULE


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def recipe_to_config(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain JSON data; :func:`recipe_from_config` rebuilds it."""
    fields = {f: _jsonable(getattr(recipe, f)) for f in ["name", *field_names(Recipe)]}
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
        source = recipe_module.__file__ if recipe_module is not None else None
        base = Recipe(name=fields.pop("name"), plugins=tuple(plugins), source=source)
        return evolve_checked(base, fields, "The saved recipe")
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as error:
        raise HooktrainError(
            f"The saved configuration is incomplete or malformed ({type(error).__name__}: "
            f"{error}); it was not written by this version of hooktrain: start the run again."
        ) from error
