"""Folders of per-class images: listing, reading, decoding, and caching what was decoded.

Every file read here is one a user pointed at, so each way it can be wrong ends in one
sentence naming it. Only regular files of a plausible size are opened (a FIFO named x.jpg
would block forever, a link to /dev/zero never end). An image's header gives its size before
any pixel is decoded, so a file claiming 100,000 x 100,000 pixels (a decompression bomb) is
refused without allocating them. Every mode decodes to RGB: grayscale is repeated, alpha
dropped, palettes and CMYK converted, 16-bit samples rounded to 8 bits as the PNG
specification recommends.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import stat
import struct
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch import Tensor
from torchvision.datasets.folder import find_classes
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from hooktrain.data.cache import (
    CACHE_FORMAT,
    CacheDamaged,
    default_cache_dir,
    read_cache,
    write_cache,
)
from hooktrain.data.device import CIFAR10_CLASSES, IMAGE_SIZE, ImageDataset, ImageSplit
from hooktrain.errors import HooktrainError, short_reason, shown

__all__ = ["load_folders", "read_regular_file", "short_reason", "shown"]

Echo = Callable[[str], None]

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp")
_JPEG_EXTENSIONS = (".jpg", ".jpeg")
_IMAGE_ADVICE = "remove or replace it"
# A 32x32 image takes a few KB even with large metadata; a bigger file is something else.
_MAX_IMAGE_BYTES = 4 << 20
_DECODE_CHUNK = 1024
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers (0xC4, 0xC8 and 0xCC are other segments in that range).
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, the restart markers, start and end of image.
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xDA)})
_TORCHVISION_IO_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"
# torchvision's errors begin with the C++ function, file and line: "decode_jpeg, /a/b.cpp:171, "
_TORCHVISION_SOURCE = re.compile(r"^\w+, \S+:\d+, ")


def read_regular_file(path: str, what: str, limit: int, advice: str) -> bytes:
    """The bytes of the regular file at ``path``, refusing anything else or anything huge.

    Opened without blocking and checked on the open descriptor, so a FIFO or a device put
    there (even after the folder was listed) is refused instead of read.
    """
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(handle, "rb") as file:
            info = os.fstat(handle)
            if not stat.S_ISREG(info.st_mode):
                raise HooktrainError(
                    f"{what} {shown(path)} is {_file_kind(info.st_mode)}, not a regular file; "
                    f"{advice}."
                )
            if info.st_size > limit:
                raise HooktrainError(
                    f"{what} {shown(path)} is {info.st_size:,} bytes, more than the {limit:,} a "
                    f"real one takes; {advice}."
                )
            # Never more than the size checked, even if the file grows meanwhile.
            return file.read(info.st_size)
    except OSError as exc:
        raise HooktrainError(f"Cannot read {shown(path)} ({short_reason(exc)}); {advice}.") from exc


def _file_kind(mode: int) -> str:
    """What a file that is not a regular one is, in a few words."""
    kinds = {
        stat.S_ISDIR: "a folder",
        stat.S_ISFIFO: "a FIFO (named pipe)",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    return next((kind for test, kind in kinds.items() if test(mode)), "a special file")


# --- listing ---------------------------------------------------------------------------------


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
            f"{shown(split_dir)} has no class folders; put each class's images in "
            f"{shown(split_dir)}/<class name>/."
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
                        info = entry.stat()
                        relative_name = f"{prefix}/{name}"
                        found.append(
                            _ImageFile(entry.path, relative_name, info.st_size, info.st_mtime_ns)
                        )
    except OSError as exc:  # a dangling link, a link loop, an unreadable folder
        raise HooktrainError(
            f"Cannot read {shown(exc.filename or folder)} "
            f"({exc.strerror or short_reason(exc)}); {_IMAGE_ADVICE}."
        ) from exc
    found.sort(key=lambda f: f.relative)
    return found


def _check_classes(data_dir: Path, train: list[str], test: list[str]) -> None:
    def listed(names: set[str]) -> str:
        return ", ".join(shown(name) for name in sorted(names)) or "none"

    if train != test:
        raise HooktrainError(
            f"train/ and test/ in {shown(data_dir)} have different class folders (only in "
            f"train/: {listed(set(train) - set(test))}; only in test/: "
            f"{listed(set(test) - set(train))}); make both hold the same class folders."
        )
    if len(train) != len(CIFAR10_CLASSES):
        raise HooktrainError(
            f"{shown(data_dir)} has {len(train)} class folders but CIFAR-10 has "
            f"{len(CIFAR10_CLASSES)} (extra: {listed(set(train) - set(CIFAR10_CLASSES))}; "
            f"missing: {listed(set(CIFAR10_CLASSES) - set(train))}); keep exactly one folder "
            "per CIFAR-10 class in train/ and test/."
        )


def load_folders(data_dir: Path, echo: Echo) -> ImageDataset:
    """The dataset in ``data_dir``/train and /test, from the cache when the files are unchanged.

    ``echo`` gets one line before a first decode (seconds for 60,000 files) and warnings.
    """
    train_classes = _list_classes(data_dir / "train")
    test_classes = _list_classes(data_dir / "test")
    _check_classes(data_dir, train_classes, test_classes)
    classes = tuple(train_classes)
    listing, labels, key = _list_images(data_dir, classes)
    cache_file = default_cache_dir() / "decoded" / f"{key}.pt"
    cached = _read_cached(cache_file, classes, labels, echo)
    if cached is not None:
        return cached

    total = sum(len(files) for files in listing.values())
    echo(
        f"decoding {total:,} images from {shown(data_dir)} "
        f"(once; cached in {shown(cache_file.parent)})"
    )
    dataset = ImageDataset(
        ImageSplit(_decode_files(listing["train"]), labels["train"]),
        ImageSplit(_decode_files(listing["test"]), labels["test"]),
        classes,
    )
    payload = {"classes": list(classes)}
    for split, part in (("train", dataset.train), ("test", dataset.test)):
        payload[f"{split}_images"], payload[f"{split}_labels"] = part.images, part.labels
    try:
        write_cache(cache_file, payload)
    except (OSError, RuntimeError) as exc:
        echo(
            f"warning: cannot cache the decoded images in {shown(cache_file.parent)} "
            f"({short_reason(exc)}); the next run decodes them again"
        )
    return dataset


def _list_images(
    data_dir: Path, classes: tuple[str, ...]
) -> tuple[dict[str, list[_ImageFile]], dict[str, Tensor], str]:
    """Each split's image files and labels, and a key naming this listing in the cache.

    The key hashes every file's name, size and modification time: any change decodes again.
    """
    listing: dict[str, list[_ImageFile]] = {}
    labels: dict[str, Tensor] = {}
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    for split in ("train", "test"):
        listing[split], split_labels = [], []
        for label, name in enumerate(classes):
            files = _scan_images(data_dir / split / name, f"{split}/{name}")
            if not files:
                raise HooktrainError(
                    f"Class folder {shown(data_dir / split / name)} has no images "
                    f"({', '.join(_IMAGE_EXTENSIONS)}); add its images to it."
                )
            listing[split].extend(files)
            split_labels.append(torch.full((len(files),), label))
            for f in files:
                # fsencode: a name that is not UTF-8 has surrogates that .encode() refuses.
                digest.update(os.fsencode(f"{f.relative}\0{f.size}\0{f.mtime_ns}\n"))
        labels[split] = torch.cat(split_labels)
    return listing, labels, digest.hexdigest()


def _read_cached(
    path: Path, classes: tuple[str, ...], labels: dict[str, Tensor], echo: Echo
) -> ImageDataset | None:
    """The cached dataset, if there is one, intact and matching the folder's classes and
    labels exactly; a damaged one is reported and passed over."""
    try:
        payload = read_cache(path)
        if payload is None:
            return None
        splits = {}
        for split in ("train", "test"):
            images, cached_labels = payload[f"{split}_images"], payload[f"{split}_labels"]
            splits[split] = ImageSplit(images, cached_labels)
            if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
                raise ValueError(f"the {split} images are not 32x32 RGB")
            if not torch.equal(cached_labels, labels[split]):
                raise ValueError(f"the {split} labels are not the folder's")
        if tuple(payload["classes"]) != classes:
            raise ValueError("the classes are not the folder's")
        return ImageDataset(splits["train"], splits["test"], classes)
    except (CacheDamaged, AttributeError, KeyError, TypeError, ValueError):
        echo(f"warning: the decoded cache {shown(path)} was damaged; decoding the images again")
        return None


# --- reading and decoding ----------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_torchvision_io() -> Iterator[None]:
    """torchvision 0.29 deprecates its image codecs (for TorchCodec) and warns on every call;
    they still work, and one warning per image would bury everything else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _TORCHVISION_IO_DEPRECATION, DeprecationWarning)
        yield


def _decode_files(files: list[_ImageFile]) -> Tensor:
    """Decode `files` into one uint8 (N, 32, 32, 3) tensor."""
    out = torch.empty((len(files), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8)
    with _quiet_torchvision_io():
        for start in range(0, len(files), _DECODE_CHUNK):
            chunk = files[start : start + _DECODE_CHUNK]
            out[start : start + len(chunk)] = _decode_chunk(chunk)
    return out


def _decode_chunk(chunk: list[_ImageFile]) -> Tensor:
    datas = [_read_image(f) for f in chunk]
    decoded = None
    if all(f.relative.lower().endswith(_JPEG_EXTENSIONS) for f in chunk):
        # One call for a list of JPEGs is measurably faster than one call per image.
        try:
            decoded = decode_jpeg(datas, mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError):
            decoded = None  # decode one by one below to name the bad file
    if decoded is None:
        decoded = [_decode_one(f, d) for f, d in zip(chunk, datas, strict=True)]
    for file, image in zip(chunk, decoded, strict=True):
        _check_size(file, image.shape[2], image.shape[1])
    return torch.stack(decoded).permute(0, 2, 3, 1)


def _read_image(file: _ImageFile) -> Tensor:
    """The bytes of one image file, once its header says it is a 32x32 image."""
    data = read_regular_file(file.path, "Image", _MAX_IMAGE_BYTES, _IMAGE_ADVICE)
    if not data:
        raise HooktrainError(f"Image {shown(file.path)} is an empty file; {_IMAGE_ADVICE}.")
    size = _header_size(data)
    if size is None:
        raise HooktrainError(
            f"Cannot decode image {shown(file.path)} (it has no PNG, JPEG, GIF or WebP header "
            f"giving its size); {_IMAGE_ADVICE}."
        )
    # Checked before decoding, so a file claiming 10**5 x 10**5 pixels is never decoded.
    _check_size(file, *size)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _check_size(file: _ImageFile, width: int, height: int) -> None:
    if (width, height) != (IMAGE_SIZE, IMAGE_SIZE):
        raise HooktrainError(
            f"Image {shown(file.path)} is {width}x{height} pixels but CIFAR-10 images are "
            f"{IMAGE_SIZE}x{IMAGE_SIZE}; remove or resize it."
        )


def _decode_one(file: _ImageFile, data: Tensor) -> Tensor:
    """Decode any image torchvision reads into uint8 RGB (3, H, W)."""
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:
        reason = _TORCHVISION_SOURCE.sub("", short_reason(exc))
        raise HooktrainError(
            f"Cannot decode image {shown(file.path)} ({reason}); {_IMAGE_ADVICE}."
        ) from exc
    if image.dtype == torch.uint16:
        # 16-bit PNGs: round(v * 255 / 65535) = round(v / 257), the PNG specification's scaling.
        image = ((image.to(torch.int32) + 128) // 257).to(torch.uint8)
    return image


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the file's header gives them, or None when it has no image header.

    PNG and JPEG headers are read here (cheaply: 60,000 files); other formats by Pillow,
    which reads the header only.
    """
    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack_from(">II", data, 16)
        return width, height
    if data.startswith(b"\xff\xd8"):
        size = _jpeg_frame_size(data)
        if size is not None:
            return size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Exception:  # Pillow raises many kinds for bytes that are not an image
        return None


def _jpeg_frame_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame segment, walking the segments before it."""
    position = 2
    while position + 9 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # a fill byte before the marker
            position += 1
        elif marker in _JPEG_FRAME_MARKERS:
            height, width = struct.unpack_from(">HH", data, position + 5)
            return width, height
        elif marker in _JPEG_STANDALONE_MARKERS:
            position += 2
        else:
            position += 2 + struct.unpack_from(">H", data, position + 2)[0]
    return None
