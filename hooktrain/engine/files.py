"""Names of the files in a run folder, and the command that continues a run; importable
without torch (the command line checks them before loading the engine)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"  # the metrics plugin's
TENSORBOARD_FOLDER = "tensorboard"  # the metrics plugin's
CHECKPOINT_FOLDER = "checkpoints"  # the checkpoint plugin's
# Recipe files load as modules named this prefix + the file's stem.
RECIPE_FILE_MODULE = "hooktrain_recipe_"


def recipe_file_needed(config: dict[str, Any]) -> str | None:
    """The recipe file a saved run needs to be rebuilt (plugin classes defined there), if any."""
    plugins = config.get("plugins")
    from_file = isinstance(plugins, list) and any(
        isinstance(entry, dict) and str(entry.get("class", "")).startswith(RECIPE_FILE_MODULE)
        for entry in plugins
    )
    run_info = config.get("run")
    recipe_file = run_info.get("recipe_file") if isinstance(run_info, dict) else None
    return recipe_file if from_file and isinstance(recipe_file, str) else None


def resume_command(run_dir: Path, config: dict[str, Any] | None, distributed: bool) -> str:
    """The command that continues the run in ``run_dir`` whose saved config is ``config``."""
    command = "torchrun ... -m hooktrain resume" if distributed else "hooktrain resume"
    command += f" {shlex.quote(str(run_dir))}"
    recipe_file = recipe_file_needed(config or {})
    return command + (f" --recipe {shlex.quote(recipe_file)}" if recipe_file else "")


# Far above any file hooktrain writes (a config is a few KB, an ablation's results a few MB).
JSON_SIZE_LIMIT = 64 << 20


def read_json(path: Path) -> Any:
    """The JSON value in the regular file ``path``.

    Raises ValueError, saying why in a few words, for anything else: a missing file, a folder,
    FIFO or device under that name (reading one could hang or never end), a file too large to
    be one of hooktrain's, bytes that are not UTF-8 JSON, or nesting deeper than Python parses.
    """
    try:
        if not path.is_file():
            raise ValueError("it is missing or not a regular file")
        if path.stat().st_size > JSON_SIZE_LIMIT:
            raise ValueError(f"it is larger than {JSON_SIZE_LIMIT >> 20} MB")
        return json.loads(path.read_bytes().decode())
    except RecursionError:
        raise ValueError("it is nested too deeply") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"it cannot be read ({type(error).__name__})") from None
