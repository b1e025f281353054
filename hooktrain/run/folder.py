"""The run folder: one process writes it, and ``--overwrite`` replaces only a hooktrain run.

A process that writes a run folder holds an exclusive ``flock`` on the folder's lock file
(``.lock``, holding the process id for the message others get). The kernel drops the lock
when the process dies, so a run that was SIGKILLed never blocks its resume. Holding is
reentrant within a process: the command line claims the folder, then the engine holds it
again while it trains. Standard library only: the command line checks folders before torch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from hooktrain.errors import HooktrainError
from hooktrain.run.files import (
    CHECKPOINT_FOLDER,
    CONFIG_FILE,
    METRICS_FILE,
    TENSORBOARD_FOLDER,
    atomic_write,
    read_json,
)

LOCK_FILE = ".lock"
CONFIG_SECTIONS = (("recipe", dict), ("plugins", list), ("run", dict))
"""The sections of a run's config.json and their JSON types."""
# Where the lock file cannot be made for these, no file can: the run's first write fails and
# says why, and no other process can write there either, so the folder needs no guard.
_UNWRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}


def is_run_config(config: object) -> bool:
    """Whether ``config`` (parsed JSON) has the sections of a hooktrain run's config.json."""
    return isinstance(config, dict) and all(
        isinstance(config.get(key), kind) for key, kind in CONFIG_SECTIONS
    )


# --------------------------------------------------------------------------------------------
# Holding a folder: one process at a time


@attrs.define
class _Hold:
    descriptor: int | None  # the open lock file; None where none can be made
    depth: int = 1


_holds: dict[tuple[int, int], _Hold] = {}  # (device, inode) of a folder -> this process's hold
_holds_guard = threading.Lock()


@contextlib.contextmanager
def hold_run_folder(folder: Path) -> Iterator[None]:
    """Make ``folder`` if needed and hold it for this process while the body runs.

    Another process holding it is refused in one sentence naming its process id. Within this
    process, holding a folder again (under another spelling too) nests.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        identity = _identity(folder.stat())
    except OSError as error:
        raise _cannot_write(folder, error) from error
    with _holds_guard:
        hold = _holds.get(identity)
        if hold is None:
            _holds[identity] = hold = _Hold(_lock(folder))
        else:
            hold.depth += 1
    try:
        yield
    finally:
        with _holds_guard:
            hold.depth -= 1
            if hold.depth == 0:
                del _holds[identity]
                _unlock(folder, hold.descriptor)


@contextlib.contextmanager
def hold_run_folders(folders: Sequence[Path]) -> Iterator[None]:
    """:func:`hold_run_folder` for each of ``folders`` (seeds trained together)."""
    with contextlib.ExitStack() as stack:
        for folder in folders:
            stack.enter_context(hold_run_folder(folder))
        yield


def _identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino


def _lock(folder: Path) -> int | None:
    """An open lock file of ``folder`` that this process holds the flock of."""
    path = folder / LOCK_FILE
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            if error.errno in _UNWRITABLE:
                return None
            raise _cannot_write(folder, error) from error
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _in_use(folder, descriptor)
            os.close(descriptor)
            raise error from None
        except OSError:
            break  # a file system without locks: the run goes on, unguarded
        if _is_current(descriptor, path):
            break
        os.close(descriptor)  # its holder removed the file as we opened it: lock the new one
    with contextlib.suppress(OSError):  # the process id is for messages only (a full disk)
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
    return descriptor


def _unlock(folder: Path, descriptor: int | None) -> None:
    """Remove the lock file (a finished run leaves none), then let go of its flock."""
    if descriptor is None:
        return
    path = folder / LOCK_FILE
    with contextlib.suppress(OSError):
        if _is_current(descriptor, path):
            path.unlink()
    os.close(descriptor)


def _is_current(descriptor: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``descriptor``."""
    try:
        return _identity(os.fstat(descriptor)) == _identity(path.lstat())
    except FileNotFoundError:
        return False


def _in_use(folder: Path, descriptor: int) -> HooktrainError:
    """The refusal of a folder whose lock file, open as ``descriptor``, another process holds."""
    holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
    pid = f" (pid {holder})" if holder.isdecimal() else ""  # unwritten yet, the instant it began
    return HooktrainError(
        f"{folder} is in use by another hooktrain process{pid}; wait for it to end, or use "
        "another folder."
    )


def _cannot_write(folder: Path, error: OSError) -> HooktrainError:
    if error.errno == errno.ELOOP:
        reason = f"its {LOCK_FILE} is a symbolic link"
    else:
        reason = error.strerror or str(error)
    return HooktrainError(f"Cannot use the run folder {folder} ({reason}); pass another --out.")


# --------------------------------------------------------------------------------------------
# Claiming a folder for a new run


@contextlib.contextmanager
def claim_run_folder(out: Path, overwrite: bool) -> Iterator[bool]:
    """Hold ``out`` for a new run while the body runs: an empty folder, made if missing.

    With ``overwrite``, a folder that is provably a hooktrain run (see :func:`not_a_run`) is
    emptied first, once this process holds it; any other folder, the working directory and
    the folders above it, the home folder, and a symbolic link are refused untouched. Yields
    whether the folder was made here; such a folder is removed again if the body fails before
    anything was written into it.
    """
    if out.exists() and not out.is_dir():
        raise HooktrainError(f"--out {out} is a file, not a folder; pass a folder for the run.")
    if out.is_dir():  # refuse what can be refused before writing anything into the folder
        _check_not_held(out)
        _check_replaceable(out, overwrite)
    created = not out.exists()
    if created:
        try:
            out.mkdir(parents=True)
        except FileExistsError:
            created = False  # made by another process just now: holding it says whose it is
        except OSError as error:
            raise HooktrainError(
                f"Cannot make the run folder {out} ({error.strerror or error}); pass another --out."
            ) from error
    try:
        with hold_run_folder(out):
            _check_replaceable(out, overwrite)  # again: nobody else can change it now
            _empty(out)
            yield created
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # a run that failed before writing anything leaves no trace
        raise


def _check_not_held(folder: Path) -> None:
    """Refuse a folder another process holds, without writing anything into it."""
    try:
        with _holds_guard:
            if _identity(folder.stat()) in _holds:
                return  # this process holds it
        descriptor = os.open(folder / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return  # no lock file (or an unreadable one): claiming it says what is wrong
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(folder, descriptor) from None
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """Refuse ``out`` unless it holds nothing of worth, or is a run that ``overwrite`` replaces."""
    if all(_is_leftover(entry) for entry in _entries(out)):
        return  # empty, or what a run killed while writing its first file left
    if not overwrite:
        raise HooktrainError(
            f"The run folder {out} is not empty; pass another --out, continue that run with "
            f"`hooktrain resume {out}`, or replace it with --overwrite."
        )
    if out.is_symlink():
        raise HooktrainError(
            f"--out {out} is a symbolic link, and --overwrite deletes only in a real run "
            f"folder; pass the folder it points to ({out.resolve()}) or another --out."
        )
    protected = _protected_place(out)
    if protected:
        raise HooktrainError(
            f"--out {out} is {protected}, which --overwrite never empties; pass the run's own "
            "folder or another --out."
        )
    problem = not_a_run(out)
    if problem:
        # Never delete a folder hooktrain did not make (a typo in --out could name $HOME).
        raise HooktrainError(
            f"{out} holds files but no hooktrain run ({problem}), so --overwrite leaves it "
            "alone; pass another --out, or empty it yourself."
        )


def _protected_place(out: Path) -> str | None:
    """What ``out`` is, if it is a folder --overwrite must never empty whatever it holds."""
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd:
        return "the working directory"
    if real in cwd.parents:
        return "a folder above the working directory"
    with contextlib.suppress(RuntimeError, KeyError):  # no home folder known
        if real == Path.home().resolve():
            return "the home folder"
    return None


def _is_leftover(entry: os.DirEntry[str]) -> bool:
    """The lock file, or a temporary file a write killed midway left (never a link)."""
    name = entry.name
    temporary = name.startswith(".") and name.endswith(".tmp")
    return (name == LOCK_FILE or temporary) and entry.is_file(follow_symlinks=False)


def not_a_run(folder: Path) -> str | None:
    """Why ``folder`` is not provably a hooktrain run, or None if it is.

    A run has a config.json with hooktrain's sections, and every entry is one hooktrain
    writes: config.json, metrics.json, tensorboard/ (event files), checkpoints/ (``*.pt``),
    the lock file and temporary files. Symbolic links are never a run's.
    """
    if not (folder / CONFIG_FILE).is_file():
        return f"{CONFIG_FILE} is missing"
    for entry in _entries(folder):
        if entry.is_symlink():
            return f"{entry.name} is a symbolic link"
        if entry.name in (CONFIG_FILE, METRICS_FILE) and entry.is_file():
            continue
        if entry.name == TENSORBOARD_FOLDER and entry.is_dir():
            problem = _foreign_file(Path(entry.path), lambda name: name.startswith("events."))
        elif entry.name == CHECKPOINT_FOLDER and entry.is_dir():
            problem = _foreign_file(Path(entry.path), lambda name: name.endswith(".pt"), deep=False)
        elif _is_leftover(entry):
            continue
        else:
            problem = f"{entry.name} is not a file hooktrain writes"
        if problem:
            return problem
    return None if _reads_as_run_config(folder / CONFIG_FILE) else f"{CONFIG_FILE} is not a run's"


def _foreign_file(folder: Path, ours: Callable[[str], bool], deep: bool = True) -> str | None:
    """The first entry under ``folder`` that hooktrain does not write there, if any."""
    for entry in _entries(folder):
        where = f"{folder.name}/{entry.name}"
        if entry.is_symlink():
            return f"{where} is a symbolic link"
        if deep and entry.is_dir():
            problem = _foreign_file(Path(entry.path), ours)
            if problem:
                return f"{folder.name}/{problem}"
        elif not (entry.is_file() and (ours(entry.name) or _is_leftover(entry))):
            return f"{where} is not a file hooktrain writes"
    return None


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as error:
        raise _cannot_write(folder, error) from error


def _reads_as_run_config(path: Path) -> bool:
    try:
        return is_run_config(read_json(path))
    except ValueError:
        return False


def _empty(folder: Path) -> None:
    """Delete every entry of ``folder`` but the lock file (links are removed, never followed)."""
    for entry in _entries(folder):
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def write_config(out_dir: Path, config: dict[str, Any]) -> None:
    """Save the resolved configuration in the run folder, the first write of every run.

    A folder that cannot be written (a full disk, a read-only file system) stops the run here,
    before any training, and leaves the files already there as they were.
    """
    path = out_dir / CONFIG_FILE
    text = json.dumps(config, indent=2) + "\n"
    try:
        atomic_write(path, lambda file: file.write(text.encode()))
    except OSError as error:
        raise HooktrainError(
            f"Cannot write {path} ({error.strerror or error}), so training did not start and the "
            "files already there are as they were; make room on that disk or make the folder "
            "writable, then run the same command again."
        ) from error


def mark_finished(out_dir: Path, config: dict[str, Any], stop_reason: str | None = None) -> None:
    """Record in config.json that the run is complete, so resume never trains it again
    (whatever plugins it has: a recipe without checkpoint or metrics leaves nothing else);
    ``stop_reason`` is why a plugin ended it before its last epoch."""
    finished = {"finished": True, **({"stop_reason": stop_reason} if stop_reason else {})}
    write_config(out_dir, {**config, "run": {**config["run"], **finished}})
