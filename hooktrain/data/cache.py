"""The decoded-image cache: tensors saved once per image folder and way of decoding it,
checksummed like checkpoints.

A cache file is a ``torch.save`` archive written atomically with the SHA-256 of its bytes in
its zip comment (see :mod:`hooktrain.run.checkpoints`): a damaged file is found before
anything in it is unpickled, and loading uses ``weights_only=True``. Its name hashes the
folder's listing and the decoding (:func:`decoded_cache_file`), and its contents record both
again, so one decoding is never read as another. A damaged file is reported and decoded again:
a cache is disposable.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hooktrain.data.device import Split, Splits
from hooktrain.errors import short_reason, shown
from hooktrain.run.checkpoints import archive_checksum, stored_checksum, write_checksummed
from hooktrain.run.files import atomic_write

__all__ = [
    "CACHE_FORMAT",
    "CacheDamaged",
    "decoded_cache_file",
    "default_cache_dir",
    "read_cache",
    "read_decoded",
    "write_cache",
    "write_decoded",
]

# Bump when the cache file's contents change meaning, so stale files are never read.
CACHE_FORMAT = "hooktrain-decoded-v3"


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


def decoded_cache_file(listing: str, decoding: dict[str, Any]) -> Path:
    """Where the images of one folder ``listing`` (a digest of its files), decoded as
    ``decoding`` says (JSON values: size, resizing, channels), are cached.

    The name hashes the cache format, the decoding and the listing: a change to any of them
    decodes again, and two decodings of one folder (32x32 and 48x48, RGB and grayscale) never
    share a file.
    """
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    digest.update(json.dumps(decoding, sort_keys=True).encode())
    digest.update(listing.encode())
    return default_cache_dir() / "decoded" / f"{digest.hexdigest()}.pt"


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


def read_decoded(
    path: Path,
    classes: tuple[str, ...],
    labels: dict[str, Tensor],
    decoding: dict[str, Any],
    echo: Callable[[str], None],
) -> Splits | None:
    """The dataset cached at ``path``, if there is one, intact and matching the folder's classes
    and ``labels`` (per split) and the ``decoding`` (as for :func:`decoded_cache_file`) exactly;
    a damaged one is reported to ``echo`` and passed over."""
    try:
        payload = read_cache(path)
        if payload is None:
            return None
        if payload["decoding"] != decoding:
            raise ValueError("the images were decoded another way")
        if tuple(payload["classes"]) != classes:
            raise ValueError("the classes are not the folder's")
        channels = 1 if decoding["grayscale"] else 3
        splits = {}
        for split in ("train", "test"):
            images, cached_labels = payload[f"{split}_images"], payload[f"{split}_labels"]
            splits[split] = Split(images, cached_labels)
            if images.dtype != torch.uint8 or images.shape[3] != channels:
                raise ValueError(f"the {split} images have other channels")
            if decoding["size"] is not None and list(images.shape[1:3]) != decoding["size"]:
                raise ValueError(f"the {split} images have another size")
            if not torch.equal(cached_labels, labels[split]):
                raise ValueError(f"the {split} labels are not the folder's")
        return Splits(splits["train"], splits["test"], classes)
    except (CacheDamaged, AttributeError, IndexError, KeyError, TypeError, ValueError):
        echo(f"warning: the decoded cache {shown(path)} was damaged; decoding the images again")
        return None


def write_decoded(
    path: Path, dataset: Splits, decoding: dict[str, Any], echo: Callable[[str], None]
) -> None:
    """Cache ``dataset``, decoded as ``decoding`` says, at ``path``; a failure is a warning."""
    payload: dict[str, Any] = {"classes": list(dataset.classes or ()), "decoding": decoding}
    for split, part in (("train", dataset.train), ("test", dataset.test)):
        payload[f"{split}_images"], payload[f"{split}_labels"] = part.inputs, part.targets
    try:
        write_cache(path, payload)
    except (OSError, RuntimeError) as exc:
        echo(
            f"warning: cannot cache the decoded images in {shown(path.parent)} "
            f"({short_reason(exc)}); the next run decodes them again"
        )
