"""Checkpoint files: written atomically, checksummed, read without running any pickled code.

A checkpoint is an ordinary ``torch.save`` zip archive (``torch.load`` reads it), whose zip
comment holds the SHA-256 of the archive's bytes. A file that was truncated or damaged on disk
fails that check before anything in it is unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from hooktrain.errors import HooktrainError
from hooktrain.run.files import atomic_write, fsync_folder

FORMAT = "hooktrain-checkpoint"
VERSION = 3
# Version 1 files (no checksum) are still read: runs started before checksums can resume.
READABLE_VERSIONS = (3,)
PAYLOAD_KEYS = ("recipe", "config", "state", "plugins")
STATE_KEYS = ("step", "epoch", "params", "buffers", "opt_state", "rng", "transforms", "key")
CHECKSUM_PREFIX = b"hooktrain-sha256:"
_COMMENT_LENGTH = len(CHECKSUM_PREFIX) + 64
_CHUNK = 1 << 20


class CheckpointUnusable(HooktrainError):
    """A checkpoint file that cannot be used; ``reason`` says why in a few words."""

    def __init__(self, path: Path, reason: str, advice: str = "use another checkpoint") -> None:
        super().__init__(f"{path} cannot be used: {reason}; {advice}.")
        self.path = path
        self.reason = reason


def remove_stale_temp_files(folder: Path) -> None:
    """Delete what :func:`atomic_write` and :func:`copy_checkpoint` leave when killed mid-write.

    Only one process writes a run folder, so at its start every such file is stale. One that
    cannot be deleted (a read-only folder) is in no write's way, and the first real write
    there says what is wrong.
    """
    for stale in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink(missing_ok=True)


def copy_checkpoint(source: Path, target: Path) -> None:
    """Make ``target`` hold what ``source`` holds, atomically, without writing the bytes again.

    A hard link shares the finished file; a later atomic write of ``source`` replaces its name
    only, so ``target`` keeps this content. Where links are not supported, the file is copied.
    """
    if target.exists() and os.path.samefile(source, target):
        return  # renaming a link onto the same file would do nothing and leave the temp name
    temp = target.with_name(f".{target.name}.link.tmp")
    temp.unlink(missing_ok=True)
    try:
        os.link(source, temp)
    except OSError:
        with source.open("rb") as original:
            atomic_write(target, lambda file: shutil.copyfileobj(original, file))
        return
    os.replace(temp, target)
    fsync_folder(target.parent)


class _HashingWriter:
    """A write-only file that hashes what passes through it (``torch.save`` writes in order)."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def write_checksummed(payload: dict[str, Any], file: BinaryIO) -> None:
    """``torch.save`` into ``file``, then put the archive's SHA-256 in its zip comment.

    torch writes no zip comment, so the archive ends with a comment length of 0: that field
    becomes the checksum's length and the checksum follows it, which keeps a valid zip.
    """
    writer = _HashingWriter(file)
    handled = sys.exception()  # when called while handling one, torch's errors chain to it too
    try:
        torch.save(payload, writer)  # type: ignore[arg-type]  # a file-like object is enough
    except RuntimeError as error:
        raise _hidden_cause(error, handled) from None
    file.seek(-2, os.SEEK_END)
    file.write(struct.pack("<H", _COMMENT_LENGTH))
    file.write(CHECKSUM_PREFIX + writer.digest.hexdigest().encode())


def _hidden_cause(error: RuntimeError, handled: BaseException | None) -> BaseException:
    """The exception that made ``torch.save`` fail, where torch's zip writer hid it.

    When writing fails (OSError from a full disk, or the KeyboardInterrupt of a second Ctrl-C,
    raised inside ``write`` or as it is entered), torch still finishes the archive on the way
    out and raises "unexpected pos" instead, while handling the real exception: that one is
    its ``__context__``. ``handled`` is the exception the caller was handling, not the save's.
    """
    cause: BaseException = error
    while (
        isinstance(cause, RuntimeError)
        and cause.__context__ is not None
        and cause.__context__ is not handled
    ):
        cause = cause.__context__
    return cause


def stored_checksum(path: Path) -> bytes | None:
    """The SHA-256 hex digest in the file's zip comment; None for a file without one."""
    size = path.stat().st_size
    if size < _COMMENT_LENGTH + 22:  # 22: the smallest end-of-archive record
        return None
    with path.open("rb") as file:
        file.seek(size - _COMMENT_LENGTH - 2)
        length, comment = struct.unpack("<H", file.read(2))[0], file.read()
    if length != _COMMENT_LENGTH or not comment.startswith(CHECKSUM_PREFIX):
        return None
    return comment[len(CHECKSUM_PREFIX) :]


def archive_checksum(path: Path) -> bytes:
    """The SHA-256 of the archive as torch wrote it: the file less its comment, length 0."""
    digest = hashlib.sha256()
    remaining = path.stat().st_size - _COMMENT_LENGTH - 2
    with path.open("rb") as file:
        while remaining > 0 and (chunk := file.read(min(_CHUNK, remaining))):
            digest.update(chunk)
            remaining -= len(chunk)
    digest.update(b"\x00\x00")
    return digest.hexdigest().encode()


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write a checkpoint payload (see ``RunContext.checkpoint_payload``) atomically."""
    atomic_write(path, lambda file: write_checksummed(payload, file))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU, checking its checksum, format and version first.

    Loading uses ``weights_only=True``: a file that asks to import anything beyond tensors and
    plain containers is refused, so no code in it can run.
    """
    if path.exists() and not path.is_file():
        raise CheckpointUnusable(path, "it is not a file (a folder or a device has its name)")
    if not path.is_file():
        raise HooktrainError(f"There is no checkpoint at {path}; check the path.")
    stored = stored_checksum(path)
    if stored is not None and stored != archive_checksum(path):
        raise CheckpointUnusable(
            path, "its checksum does not match its contents (the file was damaged or cut short)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file fails in many ways; every one means "unusable"
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        reason = (
            f"it asks to import {refused.group(1)}, which loading refuses so no code can run"
            if refused
            else f"it is corrupt, truncated or not a checkpoint ({type(error).__name__})"
        )
        raise CheckpointUnusable(path, reason) from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointUnusable(path, "it is not a hooktrain checkpoint", "pass a file it wrote")
    version = payload.get("version")
    if version not in READABLE_VERSIONS:
        raise CheckpointUnusable(
            path,
            f"it has checkpoint format version {version} and this hooktrain reads versions up "
            f"to {VERSION}",
            "use the hooktrain release that wrote it",
        )
    if stored is None:
        raise CheckpointUnusable(
            path, f"it has lost the checksum every version {version} checkpoint carries"
        )
    missing = [key for key in PAYLOAD_KEYS if key not in payload]
    state = payload.get("state", {})
    if not isinstance(state, dict):
        raise CheckpointUnusable(path, "its state is not a record")
    state_missing = [key for key in STATE_KEYS if key not in state]
    if missing or state_missing:
        raise CheckpointUnusable(
            path, f"it is incomplete (missing {', '.join(missing + state_missing)})"
        )
    return payload


def newest_usable_checkpoint(
    folder: Path,
    belongs: Callable[[dict[str, Any]], str | None],
    echo: Callable[[str], None],
) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint in ``folder`` with the most steps among those that load and belong.

    ``belongs(payload)`` says why a loaded checkpoint is not this run's, or None. Files passed
    over are reported with ``echo``. None when the folder holds no checkpoint at all; an error
    when it holds some and none is usable, so a run never silently starts over.
    """
    usable, refused = [], []
    for path in sorted(folder.glob("*.pt")):
        try:
            payload = load_checkpoint(path)
            mismatch = belongs(payload)
            if mismatch is not None:
                raise CheckpointUnusable(path, mismatch)
        except CheckpointUnusable as error:
            refused.append(error)
            continue
        usable.append((path, payload))
    if not usable and refused:
        reasons = "; ".join(f"{error.path.name}: {error.reason}" for error in refused)
        raise HooktrainError(
            f"No checkpoint in {folder} can be resumed ({reasons}); start the run again with "
            "`hooktrain run ... --overwrite`."
        )
    if not usable:
        return None
    newest = max(usable, key=lambda entry: entry[1]["state"]["step"])
    for error in refused:
        echo(f"warning: passed over {error.path}: {error.reason}")
    if refused:
        echo(f"resuming from {newest[0]} instead (step {newest[1]['state']['step']})")
    return newest
