"""Continuing a run from its folder: its config.json read and checked, the recipe rebuilt
from it (plugin classes from the registry or the recipe file the user names, never from the
file's text), and the newest checkpoint that fits the run chosen.

The reading of config.json needs no torch, so the command line says what is wrong with a run
folder at once; the engine loads when the run continues.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hooktrain.errors import HooktrainError
from hooktrain.run.files import CHECKPOINT_FOLDER, CONFIG_FILE, read_json, recipe_file_needed
from hooktrain.run.folder import is_run_config

DEVICES = ("auto", "cpu", "cuda")


def read_run_config(path: Path) -> dict[str, Any]:
    """A run folder's config.json, or a sentence saying why it is not usable."""
    if not path.is_file():
        raise HooktrainError(
            f"{path.parent} is not a hooktrain run folder (no {path.name}); pass the folder "
            "`hooktrain run --out` wrote."
        )
    try:
        config = read_json(path)
        if not is_run_config(config):
            raise ValueError("the recipe, plugins or run section is missing")
    except ValueError as error:
        raise HooktrainError(
            f"{path} is damaged ({type(error).__name__}: {error}); restore it from a copy, or "
            "start the run again with `hooktrain run ... --overwrite`."
        ) from error
    return config


def data_dir_of(config: dict[str, Any], given: Path | None) -> Path | None:
    """``--data-dir`` if given, else the folder the run trained on."""
    run_info = config.get("run")
    saved = run_info.get("data_dir") if isinstance(run_info, dict) else None
    return given or (Path(saved) if isinstance(saved, str) and saved else None)


def recipe_module_for(recipe_file: Path | None, config: dict[str, Any]) -> types.ModuleType | None:
    """The module of the recipe file the user named, or a sentence asking for the one needed."""
    from hooktrain.config.registry import load_recipe_module

    if recipe_file is not None:
        if recipe_file.suffix != ".py":
            raise HooktrainError(f"--recipe {recipe_file}: a recipe file ends in .py.")
        return load_recipe_module(str(recipe_file))[1]
    needed = recipe_file_needed(config)
    if needed is not None:
        raise HooktrainError(
            f"This run uses plugins defined in its recipe file {needed}; name it with "
            f"--recipe {needed} (a recipe file's code runs only when you name it)."
        )
    return None


def continue_run(
    run_dir: Path,
    *,
    data_dir: Path | None = None,
    device: str | None = None,
    recipe_module: types.ModuleType | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """Train the run in ``run_dir`` on from its newest usable checkpoint, or from its start
    if it has none yet; a finished run is refused. ``recipe_module`` is the recipe file the
    user named (see :func:`recipe_module_for`)."""
    config = read_run_config(run_dir / CONFIG_FILE)
    if config["run"].get("finished") is True:
        epochs = config["recipe"].get("epochs")
        reason = config["run"].get("stop_reason")
        how = f"a plugin stopped it: {reason}" if reason else f"epoch {epochs} of {epochs}"
        raise HooktrainError(
            f"The run in {run_dir} has finished ({how}); there is nothing to resume: start a "
            "new one with `hooktrain run`."
        )

    from hooktrain.config.stored import recipe_from_config
    from hooktrain.run.checkpoint_checks import checkpoint_problem
    from hooktrain.run.checkpoints import newest_usable_checkpoint
    from hooktrain.run.distributed import Topology
    from hooktrain.run.loop import train

    recipe = recipe_from_config(config, recipe_module)

    def belongs(payload: dict[str, Any]) -> str | None:
        saved = payload["config"]
        if payload["recipe"] != config["recipe"].get("name"):
            return f"it was written by the recipe {payload['recipe']!r}, not this run's"
        if not isinstance(saved, dict) or (saved.get("recipe"), saved.get("plugins")) != (
            config["recipe"],
            config["plugins"],
        ):
            return "it was written by a run with other settings"
        return checkpoint_problem(payload, recipe, config["run"])

    main_echo = Topology.from_environment().echo(echo)
    found = newest_usable_checkpoint(run_dir / CHECKPOINT_FOLDER, belongs, main_echo)
    if found is None:
        main_echo(f"{run_dir} has no checkpoint yet: starting the run from its beginning")
    saved_device = config["run"].get("device")
    train(
        recipe,
        out_dir=run_dir,
        data_dir=data_dir_of(config, data_dir),
        device=device or (saved_device if saved_device in DEVICES else "auto"),
        resume=None if found is None else found[1],
        echo=echo,
    )


def config_if_readable(run_dir: Path) -> dict[str, Any] | None:
    """The run folder's config.json, or None where it is missing or damaged."""
    try:
        return read_run_config(run_dir / CONFIG_FILE)
    except HooktrainError:
        return None
