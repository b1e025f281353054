"""The decoded-image cache: tensors saved once per image folder, checksummed like checkpoints.

A cache file is a ``torch.save`` archive written atomically with the SHA-256 of its bytes in
its zip comment (see :mod:`hooktrain.run.checkpoints`): a damaged file is found before
anything in it is unpickled, and loading uses ``weights_only=True``. The caller says what to do
about a damaged file (decode the images again: a cache is disposable).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import torch

from hooktrain.run.checkpoints import archive_checksum, stored_checksum, write_checksummed
from hooktrain.run.files import atomic_write

__all__ = ["CACHE_FORMAT", "CacheDamaged", "default_cache_dir", "read_cache", "write_cache"]

# Bump when the cache file's contents change meaning, so stale files are never read.
CACHE_FORMAT = "hooktrain-decoded-v2"


class CacheDamaged(Exception):
    """The cache file exists but cannot be trusted; the message says why, in a few words."""


def xdg_cache_home() -> Path:
    """$XDG_CACHE_HOME when it is an absolute path (the XDG spec ignores others), else ~/.cache."""
    value = os.environ.get("XDG_CACHE_HOME", "")
    if value and Path(value).is_absolute():
        return Path(value)
    return Path.home() / ".cache"


def default_cache_dir() -> Path:
    """Root of hooktrain's caches: $HOOKTRAIN_CACHE_DIR, else $XDG_CACHE_HOME/hooktrain."""
    value = os.environ.get("HOOKTRAIN_CACHE_DIR", "")
    if value:
        return Path(value).expanduser()
    return xdg_cache_home() / "hooktrain"


def read_cache(path: Path) -> dict[str, Any] | None:
    """The payload saved at ``path`` by :func:`write_cache`; None when there is no such file.

    Raises CacheDamaged when the file is there but not a complete, intact cache file.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CacheDamaged(f"cannot stat it: {exc.strerror}") from exc
    # Only a regular file is read: opening a FIFO left at this name would wait forever.
    if not stat.S_ISREG(info.st_mode):
        raise CacheDamaged("it is not a regular file")
    try:
        stored = stored_checksum(path)
        if stored is None or stored != archive_checksum(path):
            raise CacheDamaged("its checksum does not match its contents")
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except CacheDamaged:
        raise
    except Exception as exc:  # a damaged archive fails in many ways; each means "unusable"
        raise CacheDamaged(f"it cannot be loaded ({type(exc).__name__})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
        raise CacheDamaged("it is not a decoded-image cache of this version")
    return payload


def write_cache(path: Path, payload: dict[str, Any]) -> None:
    """Save ``payload`` (tensors and plain values) at ``path`` atomically.

    Raises OSError or RuntimeError when it cannot be written; the old file, if any, stays.
    """
    content = {"format": CACHE_FORMAT, **payload}
    atomic_write(path, lambda file: write_checksummed(content, file))
