"""CIFAR-10 from disk: the official python batches, or folders of per-class images.

The official batches are pickles, and unpickling runs whatever a pickle asks for and builds
whatever it describes: the reader here walks a batch's opcodes before unpickling it, refusing
objects nested too deep or containers reused, and then rebuilds only numpy arrays. Image
folders are read by :mod:`hooktrain.data.image_folders` (with the CIFAR-10 checks: ten class
folders, 32x32 images), which also reads folders of any classes and size.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import pickletools
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torchvision

from hooktrain.data.cache import xdg_cache_home
from hooktrain.data.device import CIFAR10_CLASSES, IMAGE_SIZE, Split, Splits
from hooktrain.data.image_files import read_regular_file
from hooktrain.data.image_folders import has_split_folders, load_cifar10_folders
from hooktrain.errors import HooktrainError, short_reason, shown

__all__ = ["default_data_dir", "load_cifar10"]

_BATCHES_DIR = "cifar-10-batches-py"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"
_META = "batches.meta"
_LAYOUT_HINT = "cifar-10-batches-py/ or train/ and test/ class folders"
_BATCH_ADVICE = "replace it with the file from the official archive"
# An official batch is 31 MB; a far larger file is not one, and reading it could fill memory.
_MAX_BATCH_BYTES = 128 << 20
# The official batches nest 7 levels deep and reuse only names and small tuples.
_MAX_PICKLE_DEPTH = 32
_MAX_SHARED_SIZE = 64


def default_data_dir() -> Path:
    """Where CIFAR-10 lives when no --data-dir is given (and where it is downloaded to)."""
    value = os.environ.get("HOOKTRAIN_DATA_DIR", "")
    if value:
        return Path(value).expanduser()
    return xdg_cache_home() / "hooktrain" / "cifar10"


# ---------------------------------------------------------------------------------------------
# Loading


def load_cifar10(data_dir: Path | None, echo: Callable[[str], None] = print) -> Splits:
    """Load CIFAR-10 from `data_dir`, or from `default_data_dir()` (downloading it) when None.

    ``echo`` gets one line before a long first decode of image folders, and warnings.
    """
    if data_dir is None:
        return _load_default(echo)
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise HooktrainError(
            f"Data folder {shown(data_dir)} does not exist; pass --data-dir pointing at a folder "
            f"with {_LAYOUT_HINT}."
        )
    loaded = _load_if_present(data_dir, echo)
    if loaded is None:
        raise HooktrainError(
            f"No CIFAR-10 found in {shown(data_dir)}: expected {_LAYOUT_HINT}; "
            "pass --data-dir pointing at one of them."
        )
    return loaded


def _load_default(echo: Callable[[str], None]) -> Splits:
    data_dir = default_data_dir()
    loaded = _load_if_present(data_dir, echo) if data_dir.is_dir() else None
    if loaded is not None:
        return loaded
    try:
        # The archive holds both splits, so one call fetches everything.
        torchvision.datasets.CIFAR10(root=str(data_dir), train=True, download=True)
    except Exception as exc:  # any failure here means "not available offline"
        raise HooktrainError(
            f"CIFAR-10 was not found in {shown(data_dir)} and could not be downloaded "
            f"({short_reason(exc)}); pass --data-dir pointing at a folder with {_LAYOUT_HINT}."
        ) from exc
    loaded = _load_if_present(data_dir, echo)
    if loaded is None:
        raise HooktrainError(
            f"CIFAR-10 was downloaded to {shown(data_dir)} but {_BATCHES_DIR}/ is not there; "
            "delete the folder and try again, or pass --data-dir pointing at a copy."
        )
    return loaded


def _load_if_present(data_dir: Path, echo: Callable[[str], None]) -> Splits | None:
    """Load whichever layout `data_dir` holds; None when it holds neither."""
    batches = _find_batches_dir(data_dir)
    if batches is not None:
        return _load_batches(batches)
    if has_split_folders(data_dir):
        return load_cifar10_folders(data_dir, echo)
    return None


def _find_batches_dir(data_dir: Path) -> Path | None:
    nested = data_dir / _BATCHES_DIR
    if nested.is_dir():
        return nested
    names = (*_TRAIN_BATCHES, _TEST_BATCH, _META)
    if data_dir.name == _BATCHES_DIR or any((data_dir / name).exists() for name in names):
        return data_dir
    return None


# --- official python format --------------------------------------------------------------------


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    # Pickles name the module of the numpy that wrote them, so accept both spellings.
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
        ("codecs", "encode"): codecs.encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


_PICKLE_ALLOWED = _numpy_globals()


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays, so a crafted batch file cannot run code."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        found = _PICKLE_ALLOWED.get((module, name))
        if found is None:
            raise HooktrainError(
                f"{shown(self._path)} is not a CIFAR-10 batch file: it asks to load "
                f"{module}.{name}, which a real batch never does; {_BATCH_ADVICE}."
            )
        return found


class _Built(NamedTuple):
    """What the walk knows of an object the pickle builds: its size counting every shared part
    each time it appears, how deep it nests, and whether it is a (mutable) list, dict or set."""

    size: int
    depth: int
    container: bool


_LEAF = _Built(1, 1, False)
# Opcodes that push one plain value (a number, a string, a global) from nothing.
_PICKLE_LEAVES = frozenset(
    op.name
    for op in pickletools.opcodes
    if not op.stack_before
    and len(op.stack_after) == 1
    and op.stack_after[0].name not in ("list", "dict", "set", "tuple", "frozenset", "mark")
    and op.name not in ("GET", "BINGET", "LONG_BINGET")
)

# Opcodes that put what is above them into the object below (the last one they pop).
_PICKLE_FILLS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})


def _check_pickle(path: Path, data: bytes) -> None:
    """Refuse a pickle whose objects nest too deep or reuse containers, without building them.

    Through its memo a pickle can place one object in many others: 600 bytes then describe
    lists nested 40 deep and 2**40 wide (which fill memory when read) or a tuple that takes
    forever to hash as a dict key; a tuple nested a million deep overflows the C stack when
    hashed. The walk tracks each object's size and depth instead of the object.
    """
    stack: list[_Built] = []
    marks: list[int] = []
    memo: dict[int, _Built] = {}
    for opcode, arg, _ in pickletools.genops(data):
        name = opcode.name
        if name in _PICKLE_LEAVES:  # most opcodes: a fast path keeps the walk under 0.1 s a batch
            stack.append(_LEAF)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET", "DUP"):
            built = stack[-1] if name == "DUP" else memo[arg]
            if built.container or built.size > _MAX_SHARED_SIZE:
                raise _malformed(path, "it reuses one list, dict or large tuple in several places")
            stack.append(built)
        elif name == "MARK":
            marks.append(len(stack))
        else:
            before = opcode.stack_before
            popped: list[_Built] = []
            if pickletools.markobject in before:
                start = marks.pop()
                popped, stack[start:] = stack[start:], []
                before = before[: before.index(pickletools.markobject)]
            popped.extend(stack.pop() for _ in before)
            # APPENDS and the like fill the object below their items: that one grows, no deeper.
            target = popped.pop() if name in _PICKLE_FILLS else _Built(1, 1, False)
            size = target.size + sum(built.size for built in popped)
            depth = max(target.depth, 1 + max((built.depth for built in popped), default=0))
            if depth > _MAX_PICKLE_DEPTH:
                raise _malformed(
                    path, f"its objects nest more than {_MAX_PICKLE_DEPTH} levels deep"
                )
            for after in opcode.stack_after:
                stack.append(_Built(size, depth, after.name in ("list", "dict", "set")))


def _unpickle(path: Path) -> dict[Any, Any]:
    if not path.exists():
        raise HooktrainError(
            f"CIFAR-10 batch file {shown(path)} is missing; restore it from the official archive "
            "or pass --data-dir pointing at a complete copy."
        )
    data = read_regular_file(str(path), "CIFAR-10 batch file", _MAX_BATCH_BYTES, _BATCH_ADVICE)
    try:
        _check_pickle(path, data)
        content = _BatchUnpickler(io.BytesIO(data), path).load()
    except HooktrainError:
        raise
    except (
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        UnicodeError,
        OverflowError,
        MemoryError,  # a damaged length field asks for an absurd allocation
        RecursionError,
    ) as exc:
        raise _malformed(path, short_reason(exc)) from exc
    if not isinstance(content, dict):
        raise _malformed(path, f"it holds a {type(content).__name__}, not a dict")
    return content


def _malformed(path: Path, reason: str) -> HooktrainError:
    return HooktrainError(
        f"CIFAR-10 batch file {shown(path)} is malformed ({reason}); {_BATCH_ADVICE}."
    )


def _read_meta(path: Path) -> tuple[str, ...]:
    names = _unpickle(path).get(b"label_names")
    if not isinstance(names, list | tuple) or not names:
        raise _malformed(path, "no b'label_names' list")
    if len(names) != len(CIFAR10_CLASSES):  # the model would get one output per name
        raise _malformed(path, f"it names {len(names)} classes, not {len(CIFAR10_CLASSES)}")
    out = []
    for name in names:
        if isinstance(name, bytes):
            name = name.decode("utf-8", errors="replace")
        if not isinstance(name, str):
            raise _malformed(path, "a label name is not text")
        out.append(name)
    return tuple(out)


def _read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    content = _unpickle(path)
    data = content.get(b"data")
    labels = content.get(b"labels")
    pixels = 3 * IMAGE_SIZE * IMAGE_SIZE
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise _malformed(path, "b'data' is not a 2-D uint8 array")
    if data.shape[1] != pixels:
        raise _malformed(path, f"rows have {data.shape[1]} values instead of {pixels}")
    # Exactly a flat list of ints: numpy would otherwise walk whatever nesting it is given.
    if not isinstance(labels, list) or not all(type(label) is int for label in labels):
        raise _malformed(path, "b'labels' is not a flat list of integers")
    try:
        label_array = np.asarray(labels, dtype=np.int64)
    except OverflowError as exc:
        raise _malformed(path, "a label is too large") from exc
    if label_array.shape != (data.shape[0],):
        raise _malformed(path, f"{label_array.size} labels for {data.shape[0]} images")
    if label_array.size and (label_array.min() < 0 or label_array.max() >= num_classes):
        raise _malformed(path, f"a label is outside 0..{num_classes - 1}")
    return data, label_array


def _load_batches(folder: Path) -> Splits:
    classes = _read_meta(folder / _META)

    def split(names: tuple[str, ...]) -> Split:
        parts = [_read_batch(folder / name, len(classes)) for name in names]
        data = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        # Rows are CHW planes; NHWC is what the augmentation gathers from.
        chw = torch.from_numpy(data).view(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
        return Split(chw.permute(0, 2, 3, 1).contiguous(), torch.from_numpy(labels))

    return Splits(split(_TRAIN_BATCHES), split((_TEST_BATCH,)), classes)
