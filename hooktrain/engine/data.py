"""CIFAR-10 loading (official pickles or image folders) and batched on-device augmentation."""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import pickle
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import numpy as np
import torch
import torchvision
from torch import Tensor
from torchvision.datasets.folder import find_classes
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from hooktrain.errors import HooktrainError

__all__ = [
    "CIFAR10_CLASSES",
    "DeviceData",
    "EpochPlan",
    "ImageDataset",
    "ImageSplit",
    "crop_flip",
    "default_cache_dir",
    "default_data_dir",
    "load_cifar10",
    "normalize",
]

log = logging.getLogger(__name__)

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_SIZE = 32
PAD_MODES = ("reflect", "zeros")

_BATCHES_DIR = "cifar-10-batches-py"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"
_META = "batches.meta"
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp")
_JPEG_EXTENSIONS = (".jpg", ".jpeg")
# Bump when the cache file's contents change meaning, so stale files are never read.
_CACHE_FORMAT = "hooktrain-decoded-v1"
_DECODE_CHUNK = 1024
_TORCHVISION_IO_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"
_LAYOUT_HINT = "cifar-10-batches-py/ or train/ and test/ class folders"


@attrs.frozen(eq=False)
class ImageSplit:
    """One split: uint8 images (N, 32, 32, 3) in NHWC order and int64 labels (N,)."""

    images: Tensor
    labels: Tensor

    def __attrs_post_init__(self) -> None:
        images, labels = self.images, self.labels
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(
                f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"labels must be int64 ({images.shape[0]},), got {labels.dtype} {labels.shape}"
            )

    def __len__(self) -> int:
        return self.labels.shape[0]


@attrs.frozen(eq=False)
class ImageDataset:
    """A train and a test split plus the class names, indexed by label."""

    train: ImageSplit
    test: ImageSplit
    classes: tuple[str, ...]


@attrs.frozen(eq=False)
class EpochPlan:
    """One epoch's random draws, on the training device: sample order and per-slot augmentation."""

    order: Tensor
    top: Tensor
    left: Tensor
    flip: Tensor


# ---------------------------------------------------------------------------------------------
# Locations


def _xdg_cache_home() -> Path:
    value = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says to ignore relative values.
    if value and Path(value).is_absolute():
        return Path(value)
    return Path.home() / ".cache"


def default_data_dir() -> Path:
    """Where CIFAR-10 lives when no --data-dir is given (and where it is downloaded to)."""
    value = os.environ.get("HOOKTRAIN_DATA_DIR", "")
    if value:
        return Path(value).expanduser()
    return _xdg_cache_home() / "hooktrain" / "cifar10"


def default_cache_dir() -> Path:
    """Root of hooktrain's caches: $HOOKTRAIN_CACHE_DIR, else $XDG_CACHE_HOME/hooktrain."""
    value = os.environ.get("HOOKTRAIN_CACHE_DIR", "")
    if value:
        return Path(value).expanduser()
    return _xdg_cache_home() / "hooktrain"


# ---------------------------------------------------------------------------------------------
# Loading


def load_cifar10(data_dir: Path | None) -> ImageDataset:
    """Load CIFAR-10 from `data_dir`, or from `default_data_dir()` (downloading it) when None."""
    if data_dir is None:
        return _load_default()
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        # A mistyped path may hold a line break; quoted, the message stays one line.
        shown = str(data_dir) if str(data_dir).isprintable() else repr(str(data_dir))
        raise HooktrainError(
            f"Data folder {shown} does not exist; pass --data-dir pointing at a folder with "
            f"{_LAYOUT_HINT}."
        )
    loaded = _load_if_present(data_dir)
    if loaded is None:
        raise HooktrainError(
            f"No CIFAR-10 found in {data_dir}: expected {_LAYOUT_HINT}; "
            "pass --data-dir pointing at one of them."
        )
    return loaded


def _load_default() -> ImageDataset:
    data_dir = default_data_dir()
    loaded = _load_if_present(data_dir) if data_dir.is_dir() else None
    if loaded is not None:
        return loaded
    try:
        # The archive holds both splits, so one call fetches everything.
        torchvision.datasets.CIFAR10(root=str(data_dir), train=True, download=True)
    except Exception as exc:  # any failure here means "not available offline"
        raise HooktrainError(
            f"CIFAR-10 was not found in {data_dir} and could not be downloaded "
            f"({_short_reason(exc)}); pass --data-dir pointing at a folder with {_LAYOUT_HINT}."
        ) from exc
    loaded = _load_if_present(data_dir)
    if loaded is None:
        raise HooktrainError(
            f"CIFAR-10 was downloaded to {data_dir} but {_BATCHES_DIR}/ is not there; "
            "delete the folder and try again, or pass --data-dir pointing at a copy."
        )
    return loaded


def _short_reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _load_if_present(data_dir: Path) -> ImageDataset | None:
    """Load whichever layout `data_dir` holds; None when it holds neither."""
    batches = _find_batches_dir(data_dir)
    if batches is not None:
        return _load_batches(batches)
    has_train = (data_dir / "train").is_dir()
    has_test = (data_dir / "test").is_dir()
    if has_train and has_test:
        return _load_folders(data_dir)
    if has_train or has_test:
        present, absent = ("train", "test") if has_train else ("test", "train")
        raise HooktrainError(
            f"{data_dir} has a {present}/ folder but no {absent}/ folder; add {absent}/ with the "
            "same class folders, or pass --data-dir pointing at a complete copy."
        )
    return None


def _find_batches_dir(data_dir: Path) -> Path | None:
    nested = data_dir / _BATCHES_DIR
    if nested.is_dir():
        return nested
    names = (*_TRAIN_BATCHES, _TEST_BATCH, _META)
    if data_dir.name == _BATCHES_DIR or any((data_dir / name).is_file() for name in names):
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
                f"{self._path} is not a CIFAR-10 batch file: it asks to load {module}.{name}, "
                "which a real batch never does; replace it with the file from the official "
                "archive."
            )
        return found


def _unpickle(path: Path) -> dict[Any, Any]:
    if not path.is_file():
        raise HooktrainError(
            f"CIFAR-10 batch file {path} is missing; restore it from the official archive or "
            "pass --data-dir pointing at a complete copy."
        )
    try:
        with path.open("rb") as file:
            content = _BatchUnpickler(file, path).load()
    except HooktrainError:
        raise
    except (
        OSError,
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
    ) as exc:
        raise _malformed(path, _short_reason(exc)) from exc
    if not isinstance(content, dict):
        raise _malformed(path, f"it holds a {type(content).__name__}, not a dict")
    return content


def _malformed(path: Path, reason: str) -> HooktrainError:
    return HooktrainError(
        f"CIFAR-10 batch file {path} is malformed ({reason}); replace it with the file from the "
        "official archive."
    )


def _read_meta(path: Path) -> tuple[str, ...]:
    names = _unpickle(path).get(b"label_names")
    if not isinstance(names, list | tuple) or not names:
        raise _malformed(path, "no b'label_names' list")
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
    try:
        label_array = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _malformed(path, "b'labels' is not a list of integers") from exc
    if label_array.shape != (data.shape[0],):
        raise _malformed(path, f"{label_array.size} labels for {data.shape[0]} images")
    if label_array.size and (label_array.min() < 0 or label_array.max() >= num_classes):
        raise _malformed(path, f"a label is outside 0..{num_classes - 1}")
    return data, label_array


def _load_batches(folder: Path) -> ImageDataset:
    classes = _read_meta(folder / _META)

    def split(names: tuple[str, ...]) -> ImageSplit:
        parts = [_read_batch(folder / name, len(classes)) for name in names]
        data = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        # Rows are CHW planes; NHWC is what the augmentation gathers from.
        chw = torch.from_numpy(data).view(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
        return ImageSplit(chw.permute(0, 2, 3, 1).contiguous(), torch.from_numpy(labels))

    return ImageDataset(split(_TRAIN_BATCHES), split((_TEST_BATCH,)), classes)


# --- image folders -----------------------------------------------------------------------------


class _ImageFile(NamedTuple):
    # Plain strings: pathlib objects for 60,000 files cost more than the stat calls.
    path: str
    relative: str
    size: int
    mtime_ns: int


def _list_classes(split_dir: Path) -> list[str]:
    try:
        classes, _ = find_classes(split_dir)
    except FileNotFoundError as exc:
        raise HooktrainError(
            f"{split_dir} has no class folders; put each class's images in "
            f"{split_dir}/<class name>/."
        ) from exc
    return classes


def _scan_images(folder: Path, relative: str) -> list[_ImageFile]:
    """Image files under `folder` (recursively), sorted, named relative to the data folder."""
    found: list[_ImageFile] = []
    pending = [(str(folder), relative)]
    try:
        while pending:
            current, prefix = pending.pop()
            with os.scandir(current) as entries:
                for entry in entries:
                    name = entry.name
                    if name.startswith("."):
                        continue
                    if entry.is_dir():
                        pending.append((entry.path, f"{prefix}/{name}"))
                    elif name.lower().endswith(_IMAGE_EXTENSIONS):
                        stat = entry.stat()
                        found.append(
                            _ImageFile(
                                entry.path, f"{prefix}/{name}", stat.st_size, stat.st_mtime_ns
                            )
                        )
    except OSError as exc:  # a dangling link, a link loop, an unreadable folder
        raise HooktrainError(
            f"Cannot read {exc.filename or folder} ({exc.strerror or _short_reason(exc)}); "
            "remove or replace it."
        ) from exc
    found.sort(key=lambda f: f.relative)
    return found


def _check_classes(data_dir: Path, train: list[str], test: list[str]) -> None:
    if train != test:
        only_train = sorted(set(train) - set(test))
        only_test = sorted(set(test) - set(train))
        raise HooktrainError(
            f"train/ and test/ in {data_dir} have different class folders (only in train/: "
            f"{', '.join(only_train) or 'none'}; only in test/: {', '.join(only_test) or 'none'}); "
            "make both hold the same class folders."
        )
    if len(train) != len(CIFAR10_CLASSES):
        extra = sorted(set(train) - set(CIFAR10_CLASSES))
        missing = sorted(set(CIFAR10_CLASSES) - set(train))
        raise HooktrainError(
            f"{data_dir} has {len(train)} class folders but CIFAR-10 has "
            f"{len(CIFAR10_CLASSES)} (extra: {', '.join(extra) or 'none'}; missing: "
            f"{', '.join(missing) or 'none'}); keep exactly one folder per CIFAR-10 class in "
            "train/ and test/."
        )


def _read_bytes(file: _ImageFile) -> Tensor:
    try:
        with open(file.path, "rb") as handle:
            data = bytearray(handle.read())
    except OSError as exc:
        raise HooktrainError(
            f"Cannot read image {file.path} ({_short_reason(exc)}); remove or replace it."
        ) from exc
    if not data:
        raise HooktrainError(f"Image {file.path} is an empty file; remove or replace it.")
    return torch.frombuffer(data, dtype=torch.uint8)


def _decode_one(file: _ImageFile, data: Tensor) -> Tensor:
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:
        raise HooktrainError(
            f"Cannot decode image {file.path} ({_short_reason(exc)}); remove or replace it."
        ) from exc


def _decode_files(files: list[_ImageFile]) -> Tensor:
    """Decode `files` into one uint8 (N, 32, 32, 3) tensor."""
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs (for TorchCodec) and warns on every call;
        # they still work, and one warning per image would bury everything else.
        warnings.filterwarnings("ignore", _TORCHVISION_IO_DEPRECATION, DeprecationWarning)
        out = torch.empty((len(files), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8)
        for start in range(0, len(files), _DECODE_CHUNK):
            chunk = files[start : start + _DECODE_CHUNK]
            out[start : start + len(chunk)] = _decode_chunk(chunk)
    return out


def _decode_chunk(chunk: list[_ImageFile]) -> Tensor:
    datas = [_read_bytes(f) for f in chunk]
    images: list[Tensor] | None = None
    if all(f.relative.lower().endswith(_JPEG_EXTENSIONS) for f in chunk):
        # One call for a list of JPEGs is measurably faster than one call per image.
        try:
            images = decode_jpeg(datas, mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError):
            images = None  # decode one by one below to name the bad file
    if images is None:
        images = [_decode_one(f, d) for f, d in zip(chunk, datas, strict=True)]
    for file, image in zip(chunk, images, strict=True):
        if image.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise HooktrainError(
                f"Image {file.path} is {image.shape[2]}x{image.shape[1]} pixels but CIFAR-10 "
                f"images are {IMAGE_SIZE}x{IMAGE_SIZE}; remove or resize it."
            )
    return torch.stack(images).permute(0, 2, 3, 1)


def _load_folders(data_dir: Path) -> ImageDataset:
    train_classes = _list_classes(data_dir / "train")
    test_classes = _list_classes(data_dir / "test")
    _check_classes(data_dir, train_classes, test_classes)
    classes = tuple(train_classes)

    listing: dict[str, list[tuple[list[_ImageFile], int]]] = {}
    digest = hashlib.sha256(_CACHE_FORMAT.encode())
    for split in ("train", "test"):
        listing[split] = []
        for label, name in enumerate(classes):
            files = _scan_images(data_dir / split / name, f"{split}/{name}")
            if not files:
                raise HooktrainError(
                    f"Class folder {data_dir / split / name} has no images "
                    f"({', '.join(_IMAGE_EXTENSIONS)}); add its images to it."
                )
            listing[split].append((files, label))
            for f in files:
                digest.update(f"{f.relative}\0{f.size}\0{f.mtime_ns}\n".encode())
    counts = {split: sum(len(files) for files, _ in parts) for split, parts in listing.items()}

    cache_file = default_cache_dir() / "decoded" / f"{digest.hexdigest()}.pt"
    cached = _read_cache(cache_file, classes, counts)
    if cached is not None:
        return cached

    splits = {}
    for split, parts in listing.items():
        files = [f for group, _ in parts for f in group]
        labels = torch.cat([torch.full((len(group),), label) for group, label in parts])
        splits[split] = ImageSplit(_decode_files(files), labels)
    dataset = ImageDataset(splits["train"], splits["test"], classes)
    _write_cache(cache_file, dataset)
    return dataset


# --- decoded-image cache -----------------------------------------------------------------------


def _read_cache(
    path: Path, classes: tuple[str, ...], counts: dict[str, int]
) -> ImageDataset | None:
    if not path.is_file():
        return None
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
        dataset = ImageDataset(
            ImageSplit(content["train_images"], content["train_labels"]),
            ImageSplit(content["test_images"], content["test_labels"]),
            tuple(content["classes"]),
        )
    # A cache file is disposable: whatever is wrong with it, decoding again fixes it.
    except Exception as exc:
        log.warning("ignoring unreadable decoded-image cache %s (%s)", path, _short_reason(exc))
        return None
    shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    if (
        dataset.classes != classes
        or len(dataset.train) != counts["train"]
        or len(dataset.test) != counts["test"]
        or dataset.train.images.shape[1:] != shape
        or dataset.test.images.shape[1:] != shape
    ):
        log.warning("ignoring decoded-image cache %s: it does not match the data folder", path)
        return None
    return dataset


def _write_cache(path: Path, dataset: ImageDataset) -> None:
    content = {
        "format": _CACHE_FORMAT,
        "classes": list(dataset.classes),
        "train_images": dataset.train.images,
        "train_labels": dataset.train.labels,
        "test_images": dataset.test.images,
        "test_labels": dataset.test.labels,
    }
    temp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp", delete=False
        ) as file:
            temp = file.name
            torch.save(content, file)
            file.flush()
            os.fsync(file.fileno())
        # Readers see either no file or a complete one, even if this process dies mid-write.
        os.replace(temp, path)
        temp = None
    except (OSError, RuntimeError) as exc:
        log.warning("not caching decoded images in %s (%s)", path.parent, _short_reason(exc))
    finally:
        if temp is not None:
            Path(temp).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Augmentation


def _check_pad(pad: int, pad_mode: str, size: int) -> None:
    if pad_mode not in PAD_MODES:
        raise HooktrainError(
            f"Unknown pad mode {pad_mode!r}; use one of {', '.join(map(repr, PAD_MODES))}."
        )
    if pad < 0:
        raise HooktrainError(f"Crop padding must be 0 or more, got {pad}; pass a smaller --pad.")
    if pad_mode == "reflect" and pad >= size:
        raise HooktrainError(
            f"Reflect padding of {pad} pixels needs images larger than {pad} pixels, but they are "
            f"{size}; use a smaller pad or pad mode 'zeros'."
        )
    if pad >= size:
        raise HooktrainError(
            f"Padding of {pad} pixels lets a crop of the {size}-pixel images miss the image "
            f"entirely; use a pad below {size}."
        )


def _source_indices(offset: Tensor, pad: int, size: int, pad_mode: str) -> tuple[Tensor, Tensor]:
    """Map crop coordinates to source coordinates; also return where they fall inside the image."""
    raw = offset[:, None] - pad + torch.arange(size, device=offset.device)
    inside = (raw >= 0) & (raw < size)
    if pad_mode == "reflect":
        # Reflection about the edge pixel, without repeating it (torchvision's "reflect").
        mapped = torch.where(raw < 0, -raw, raw)
        mapped = torch.where(mapped >= size, 2 * (size - 1) - mapped, mapped)
    else:
        mapped = raw.clamp(0, size - 1)
    return mapped, inside


def _crop_flip_gather(
    source: Tensor,
    index: Tensor,
    top: Tensor,
    left: Tensor,
    flip: Tensor,
    pad: int,
    pad_mode: str,
) -> Tensor:
    """crop_flip of `source[index]`, reading straight from `source` to skip a batch copy.

    Callers check `pad` and `pad_mode` once (crop_flip per call, DeviceData at construction),
    keeping the check out of the per-batch path.
    """
    height, width = source.shape[1], source.shape[2]
    rows, rows_inside = _source_indices(top, pad, height, pad_mode)
    raw_cols, cols_inside = _source_indices(left, pad, width, pad_mode)
    flip = flip[:, None]
    cols = torch.where(flip, raw_cols.flip(1), raw_cols)
    out = source[index[:, None, None], rows[:, :, None], cols[:, None, :]]
    if pad_mode == "zeros":
        cols_inside = torch.where(flip, cols_inside.flip(1), cols_inside)
        inside = rows_inside[:, :, None] & cols_inside[:, None, :]
        out = torch.where(inside[..., None], out, 0)
    return out


def crop_flip(
    images: Tensor, top: Tensor, left: Tensor, flip: Tensor, pad: int, pad_mode: str
) -> Tensor:
    """Pad by `pad`, crop HxW at (top, left), then mirror where `flip`; uint8 NHWC in and out.

    Equals pad -> crop -> horizontal flip per sample, but gathers every output pixel straight
    from `images` in one indexing call, with no padded copy, no per-sample loop and no host sync.
    """
    _check_pad(pad, pad_mode, min(images.shape[1:3]))
    index = torch.arange(images.shape[0], device=images.device)
    return _crop_flip_gather(images, index, top, left, flip, pad, pad_mode)


def normalize(images: Tensor, mean: Tensor, std: Tensor, channels_last: bool) -> Tensor:
    """uint8 NHWC -> float32 NCHW `(x / 255 - mean) / std`, with per-channel mean and std."""
    x = images.to(torch.float32).div_(255).sub_(mean).div_(std)
    x = x.permute(0, 3, 1, 2)
    # The permuted NHWC buffer already is channels_last; only plain NCHW needs a copy.
    return x if channels_last else x.contiguous()


# ---------------------------------------------------------------------------------------------
# Device-resident data


class DeviceData:
    """The whole dataset on one device as uint8, served as augmented, normalized batches."""

    device: torch.device
    batch_size: int
    shard: int
    shards: int
    eval_batch_size: int
    pad: int
    pad_mode: str
    flip: bool
    channels_last: bool
    classes: tuple[str, ...]
    n_train: int
    n_test: int
    steps_per_epoch: int
    mean: Tensor
    std: Tensor
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor

    def __init__(
        self,
        dataset: ImageDataset,
        device: torch.device,
        batch_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        pad: int = 4,
        pad_mode: str = "reflect",
        flip: bool = True,
        channels_last: bool = False,
        train_limit: int | None = None,
        eval_batch_size: int = 1000,
        shard: int = 0,
        shards: int = 1,
    ) -> None:
        available = len(dataset.train)
        if batch_size < 1:
            raise HooktrainError(f"Batch size must be at least 1, got {batch_size}.")
        if batch_size % shards:
            below = batch_size - batch_size % shards
            above = below + shards
            raise HooktrainError(
                f"The batch size {batch_size} does not split evenly over {shards} processes; "
                f"set batch_size to a multiple of {shards} (e.g. --set batch_size={above}"
                f"{f' or {below}' if below else ''}) or start another number of processes."
            )
        if eval_batch_size < 1:
            raise HooktrainError(f"Eval batch size must be at least 1, got {eval_batch_size}.")
        if train_limit is not None and not batch_size <= train_limit <= available:
            raise HooktrainError(
                f"Train limit {train_limit} must be between the batch size {batch_size} and the "
                f"{available} training images; pass a train limit in that range."
            )
        if train_limit is None and available < batch_size:
            raise HooktrainError(
                f"Batch size {batch_size} is larger than the {available} training images; "
                "pass a smaller batch size."
            )
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise HooktrainError(
                f"Normalization needs 3 means and 3 positive stds, got mean={mean} std={std}."
            )
        _check_pad(pad, pad_mode, min(dataset.train.images.shape[1:3]))

        self.device = device = torch.device(device)
        self.batch_size = batch_size
        self.shard, self.shards = shard, shards
        self.eval_batch_size = eval_batch_size
        self.pad = pad
        self.pad_mode = pad_mode
        self.flip = flip
        self.channels_last = channels_last
        self.classes = dataset.classes

        train_images, train_labels = dataset.train.images, dataset.train.labels
        if train_limit is not None:
            # A fixed seed, not the run's: the subset is part of the experiment, not its noise.
            subset = torch.randperm(available, generator=torch.Generator().manual_seed(0))
            subset = subset[:train_limit]
            train_images, train_labels = train_images[subset], train_labels[subset]
        self.train_images = train_images.contiguous().to(device)
        self.train_labels = train_labels.to(device)
        self.test_images = dataset.test.images.contiguous().to(device)
        self.test_labels = dataset.test.labels.to(device)
        self.n_train = self.train_labels.shape[0]
        self.n_test = self.test_labels.shape[0]
        # Dropping the partial batch keeps one batch shape, so a compiled step never recompiles.
        self.steps_per_epoch = self.n_train // batch_size
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)

    @property
    def num_classes(self) -> int:
        """Number of classes, i.e. the size of the model's output."""
        return len(self.classes)

    def epoch_plan(self, generator: torch.Generator) -> EpochPlan:
        """Draw one epoch's order and augmentation from a CPU `generator`, then ship it once."""
        n = self.n_train
        order = torch.randperm(n, generator=generator)
        top = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
        left = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
        if self.flip:
            flip = torch.randint(0, 2, (n,), generator=generator)
        else:
            flip = torch.zeros(n, dtype=torch.int64)
        # One stacked tensor means one host-to-device copy per epoch.
        packed = torch.stack([order, top, left, flip])
        if self.device.type == "cuda":
            packed = packed.pin_memory()
        packed = packed.to(self.device, non_blocking=True)
        return EpochPlan(order=packed[0], top=packed[1], left=packed[2], flip=packed[3].bool())

    def train_batch(self, plan: EpochPlan, index: int) -> tuple[Tensor, Tensor]:
        """The `index`-th augmented training batch: (x float32 NCHW, y int64), on the device.

        A data-parallel process gets its shard of it: the `shard`-th of `shards` equal slices.
        """
        if not 0 <= index < self.steps_per_epoch:
            raise IndexError(f"batch {index} is outside 0..{self.steps_per_epoch - 1}")
        size = self.batch_size // self.shards
        start = index * self.batch_size + self.shard * size
        batch = slice(start, start + size)
        order = plan.order[batch]
        images = _crop_flip_gather(
            self.train_images,
            order,
            plan.top[batch],
            plan.left[batch],
            plan.flip[batch],
            self.pad,
            self.pad_mode,
        )
        x = normalize(images, self.mean, self.std, self.channels_last)
        return x, self.train_labels[order]

    def test_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The whole test split in order, unaugmented, in batches of `eval_batch_size`.

        A data-parallel process gets every `shards`-th batch from its `shard`-th on; the
        processes' sums together cover the split.
        """
        step = self.eval_batch_size * self.shards
        for start in range(self.shard * self.eval_batch_size, self.n_test, step):
            end = start + self.eval_batch_size
            x = normalize(self.test_images[start:end], self.mean, self.std, self.channels_last)
            yield x, self.test_labels[start:end]

    def denormalize(self, x: Tensor) -> Tensor:
        """Undo `normalize` on NCHW (or CHW) input, clamped to [0, 1] for image grids."""
        return (x * self.std[:, None, None] + self.mean[:, None, None]).clamp(0, 1)
