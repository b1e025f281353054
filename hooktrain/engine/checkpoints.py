"""Checkpoint files: written atomically, read without running any pickled code."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from hooktrain.errors import HooktrainError

FORMAT = "hooktrain-checkpoint"
VERSION = 1
PAYLOAD_KEYS = ("recipe", "config", "state", "plugins")
STATE_KEYS = ("step", "epoch", "params", "buffers", "opt_state", "rng")


def atomic_write(path: Path, write: Any) -> None:
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
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` survive a power loss."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def copy_checkpoint(source: Path, target: Path) -> None:
    """Make ``target`` hold what ``source`` holds, atomically, without writing the bytes again.

    A hard link shares the finished file; a later atomic write of ``source`` replaces its name
    only, so ``target`` keeps this content. Where links are not supported, the file is copied.
    """
    temp = target.with_name(f".{target.name}.link.tmp")
    temp.unlink(missing_ok=True)
    try:
        os.link(source, temp)
    except OSError:
        with source.open("rb") as original:
            atomic_write(target, lambda file: shutil.copyfileobj(original, file))
        return
    os.replace(temp, target)
    _fsync_folder(target.parent)


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write a checkpoint payload (see ``RunContext.checkpoint_payload``) atomically."""
    atomic_write(path, lambda file: torch.save(payload, file))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU with ``weights_only=True``, checking it is one of ours."""
    if not path.is_file():
        raise HooktrainError(f"There is no checkpoint at {path}; check the path.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file fails in many ways; every one means "unusable"
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        reason = (
            f"it asks to import {refused.group(1)}, which loading refuses so no code can run"
            if refused
            else f"it is corrupt, truncated or not a checkpoint ({type(error).__name__})"
        )
        raise HooktrainError(
            f"{path} cannot be read: {reason}; use another checkpoint of the run."
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise HooktrainError(f"{path} is not a hooktrain checkpoint; pass a file it wrote.")
    if payload.get("version") != VERSION:
        raise HooktrainError(
            f"{path} has checkpoint format version {payload.get('version')}, this hooktrain "
            f"reads version {VERSION}; use the hooktrain release that wrote it."
        )
    missing = [key for key in PAYLOAD_KEYS if key not in payload]
    state_missing = [key for key in STATE_KEYS if key not in payload.get("state", {})]
    if missing or state_missing:
        raise HooktrainError(
            f"{path} is an incomplete checkpoint (missing {', '.join(missing + state_missing)}); "
            "use another checkpoint of the run."
        )
    return payload
