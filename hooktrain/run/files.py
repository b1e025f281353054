"""Names of the files in a run folder, the command that continues a run, and how hooktrain
reads and writes its files (JSON read only from regular files, every write atomic); importable
without torch (the command line checks them before loading the engine)."""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

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


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then move it into place.

    The file is flushed and fsynced before the rename and the folder after it, so a crash at
    any moment leaves either the old file or the complete new one, never a torn one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        # mkstemp makes the file private; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_name, 0o666 & ~umask)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` survive a power loss."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
