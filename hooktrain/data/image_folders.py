"""Folders of per-class images: listing, checking, decoding in chunks, caching what was decoded.

A data folder holds train/ and test/, each with one folder of images per class. Every file read
here is one a user pointed at, so each way it can be wrong ends in one sentence naming it
(reading one file safely is :mod:`hooktrain.data.image_files`). A folder is decoded once per
way of decoding it (image size, resizing, grayscale) and cached under a key naming all three.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import torch
from torch import Tensor
from torchvision.datasets.folder import find_classes
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2.functional import resize

from hooktrain.data.cache import decoded_cache_file, read_decoded, write_decoded
from hooktrain.data.device import CIFAR10_CLASSES, IMAGE_SIZE, Split, Splits
from hooktrain.data.image_files import (
    IMAGE_ADVICE,
    IMAGE_EXTENSIONS,
    JPEG_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    decode_rgb,
    header_size,
    image_byte_limit,
    luma,
    quiet_torchvision_io,
    read_regular_file,
)
from hooktrain.errors import HooktrainError, short_reason, shown

__all__ = ["has_split_folders", "load_cifar10_folders", "load_image_folder"]

Echo = Callable[[str], None]

_DECODE_CHUNK = 1024
# One class would train a model to answer it always; two is the least a classifier tells apart.
_MIN_CLASSES = 2


@attrs.frozen
class _Decoding:
    """How a folder's images become one uint8 (N, H, W, C) tensor, and which sizes it takes."""

    size: tuple[int, int] | None  # (height, width) of every image; None: the first image's
    resize: bool  # resize other sizes to `size` (bilinear, antialiased) instead of refusing them
    grayscale: bool  # one channel, Pillow's luma, instead of RGB
    size_rule: str = ""  # why another size is refused: "CIFAR-10 images are 32x32"
    size_advice: str = "remove or resize it"

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3

    def key(self) -> dict[str, Any]:
        """What the cache keys on, as JSON values."""
        size = None if self.size is None else list(self.size)
        return {"size": size, "resize": self.resize, "grayscale": self.grayscale}

    def described(self) -> str:
        """How the images are changed while decoded, for the line announcing a decode."""
        resized = f" resized to {self.size[1]}x{self.size[0]}" if self.resize and self.size else ""
        return resized + (" in grayscale" if self.grayscale else "")


_CIFAR10 = _Decoding(
    (IMAGE_SIZE, IMAGE_SIZE), False, False, f"CIFAR-10 images are {IMAGE_SIZE}x{IMAGE_SIZE}"
)


def load_image_folder(
    data_dir: Path | None,
    *,
    image_size: tuple[int, int] | None = None,
    grayscale: bool = False,
    echo: Echo = print,
) -> Splits:
    """Images in ``data_dir``/train/<class>/ and /test/<class>/ as uint8 (N, H, W, C) splits.

    Classes are the train/ folder names, sorted (label i is the i-th name); test/ must hold the
    same ones, and there must be at least two. Without ``image_size`` every image must have the
    first image's size; with it ((height, width)) each is resized to it as it is decoded,
    bilinear and antialiased. ``grayscale`` gives one channel (Pillow's ``convert("L")``
    luma, taken after any resizing), else three (RGB). Decoded once, then read from the cache.
    ``echo`` gets one line before a first decode, and warnings.
    """
    if data_dir is None:
        raise HooktrainError(
            "Image-folder data has no default location; pass --data-dir pointing at a folder "
            "holding train/ and test/ folders of class folders."
        )
    data_dir = Path(data_dir).expanduser()
    size = _checked_image_size(image_size)
    if not isinstance(grayscale, bool):
        raise HooktrainError(f"grayscale must be True or False, got {grayscale!r}.")
    if not data_dir.is_dir():
        raise HooktrainError(
            f"Image folder {shown(data_dir)} does not exist; pass a folder holding train/ and "
            "test/ folders of class folders."
        )
    if not has_split_folders(data_dir):
        raise HooktrainError(
            f"{shown(data_dir)} has no train/ and test/ folders; put each class's images in "
            f"{shown(data_dir / 'train')}/<class name>/ and {shown(data_dir / 'test')}/<class "
            "name>/."
        )
    advice = "resize it, or pass image_size to resize every image as it is loaded"
    decoding = _Decoding(size, size is not None, grayscale, size_advice=advice)
    return _load(data_dir, decoding, cifar10=False, echo=echo)


def load_cifar10_folders(data_dir: Path, echo: Echo) -> Splits:
    """CIFAR-10 as image folders: the ten classes' folders of 32x32 images, RGB."""
    return _load(data_dir, _CIFAR10, cifar10=True, echo=echo)


def has_split_folders(data_dir: Path) -> bool:
    """Whether ``data_dir`` holds train/ and test/ folders; refuses one without the other."""
    has_train = (data_dir / "train").is_dir()
    has_test = (data_dir / "test").is_dir()
    if has_train != has_test:
        present, absent = ("train", "test") if has_train else ("test", "train")
        raise HooktrainError(
            f"{shown(data_dir)} has a {present}/ folder but no {absent}/ folder; add {absent}/ "
            "with the same class folders, or pass --data-dir pointing at a complete copy."
        )
    return has_train


def _checked_image_size(image_size: object) -> tuple[int, int] | None:
    if image_size is None:
        return None
    valid = (
        isinstance(image_size, tuple | list)
        and len(image_size) == 2
        and all(type(side) is int and side >= 1 for side in image_size)
    )
    if not valid or image_size[0] * image_size[1] > MAX_IMAGE_PIXELS:  # type: ignore[index]
        raise HooktrainError(
            f"image_size must be (height, width) in pixels, each at least 1 and at most "
            f"{MAX_IMAGE_PIXELS:,} pixels in all, got {image_size!r}; pass e.g. (32, 32)."
        )
    return image_size[0], image_size[1]  # type: ignore[index]


def _load(data_dir: Path, decoding: _Decoding, cifar10: bool, echo: Echo) -> Splits:
    """The dataset in ``data_dir``, from the cache when the files and the decoding are unchanged."""
    train_classes = _list_classes(data_dir / "train")
    test_classes = _list_classes(data_dir / "test")
    _check_classes(data_dir, train_classes, test_classes, cifar10)
    classes = tuple(train_classes)
    listing, labels, digest = _list_images(data_dir, classes)
    key = decoding.key()
    cache_file = decoded_cache_file(digest, key)
    cached = read_decoded(cache_file, classes, labels, key, echo)
    if cached is not None:
        return cached

    total = sum(len(files) for files in listing.values())
    echo(
        f"decoding {total:,} images from {shown(data_dir)}{decoding.described()} "
        f"(once; cached in {shown(cache_file.parent)})"
    )
    decoding = _resolved(decoding, listing["train"][0])
    _check_memory(data_dir, total, decoding)
    dataset = Splits(
        Split(_decode_files(listing["train"], decoding), labels["train"]),
        Split(_decode_files(listing["test"], decoding), labels["test"]),
        classes,
    )
    write_decoded(cache_file, dataset, key, echo)
    return dataset


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
                    elif name.lower().endswith(IMAGE_EXTENSIONS):
                        info = entry.stat()
                        relative_name = f"{prefix}/{name}"
                        found.append(
                            _ImageFile(entry.path, relative_name, info.st_size, info.st_mtime_ns)
                        )
    except OSError as exc:  # a dangling link, a link loop, an unreadable folder
        raise HooktrainError(
            f"Cannot read {shown(exc.filename or folder)} "
            f"({exc.strerror or short_reason(exc)}); {IMAGE_ADVICE}."
        ) from exc
    found.sort(key=lambda f: f.relative)
    return found


def _check_classes(data_dir: Path, train: list[str], test: list[str], cifar10: bool) -> None:
    def listed(names: set[str]) -> str:
        return ", ".join(shown(name) for name in sorted(names)) or "none"

    if train != test:
        raise HooktrainError(
            f"train/ and test/ in {shown(data_dir)} have different class folders (only in "
            f"train/: {listed(set(train) - set(test))}; only in test/: "
            f"{listed(set(test) - set(train))}); make both hold the same class folders."
        )
    if cifar10 and len(train) != len(CIFAR10_CLASSES):
        raise HooktrainError(
            f"{shown(data_dir)} has {len(train)} class folders but CIFAR-10 has "
            f"{len(CIFAR10_CLASSES)} (extra: {listed(set(train) - set(CIFAR10_CLASSES))}; "
            f"missing: {listed(set(CIFAR10_CLASSES) - set(train))}); keep exactly one folder "
            "per CIFAR-10 class in train/ and test/."
        )
    if len(train) < _MIN_CLASSES:
        raise HooktrainError(
            f"{shown(data_dir)} has {len(train)} class folder ({listed(set(train))}) but a "
            f"classifier needs at least {_MIN_CLASSES}; add a folder of images per class to "
            "train/ and test/."
        )


def _list_images(
    data_dir: Path, classes: tuple[str, ...]
) -> tuple[dict[str, list[_ImageFile]], dict[str, Tensor], str]:
    """Each split's image files and labels, and a digest naming this listing in the cache.

    The digest hashes every file's name, size and modification time: any change decodes again.
    """
    listing: dict[str, list[_ImageFile]] = {}
    labels: dict[str, Tensor] = {}
    digest = hashlib.sha256()
    for split in ("train", "test"):
        listing[split], split_labels = [], []
        for label, name in enumerate(classes):
            files = _scan_images(data_dir / split / name, f"{split}/{name}")
            if not files:
                raise HooktrainError(
                    f"Class folder {shown(data_dir / split / name)} has no images "
                    f"({', '.join(IMAGE_EXTENSIONS)}); add its images to it."
                )
            listing[split].extend(files)
            split_labels.append(torch.full((len(files),), label))
            for f in files:
                # fsencode: a name that is not UTF-8 has surrogates that .encode() refuses.
                digest.update(os.fsencode(f"{f.relative}\0{f.size}\0{f.mtime_ns}\n"))
        labels[split] = torch.cat(split_labels)
    return listing, labels, digest.hexdigest()


# --- reading and decoding ----------------------------------------------------------------------


def _resolved(decoding: _Decoding, first: _ImageFile) -> _Decoding:
    """``decoding`` with its size: the first image's (from its header) when none was given."""
    if decoding.size is not None:
        return decoding
    _, (width, height) = _read_image(first, decoding)
    rule = f"{shown(first.path)}, the first image, is {width}x{height}"
    return attrs.evolve(decoding, size=(height, width), size_rule=rule)


def _check_memory(data_dir: Path, count: int, decoding: _Decoding) -> None:
    """Refuse a decode that cannot fit in this machine's memory before allocating it."""
    assert decoding.size is not None
    height, width = decoding.size
    needed = count * height * width * decoding.channels
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > memory:
        raise HooktrainError(
            f"The {count:,} images in {shown(data_dir)} take {needed / 2**30:,.1f} GiB decoded at "
            f"{width}x{height}, more than the {memory / 2**30:,.1f} GiB of memory here; load "
            "fewer images, or pass a smaller image_size."
        )


def _decode_files(files: list[_ImageFile], decoding: _Decoding) -> Tensor:
    """Decode `files` into one uint8 (N, H, W, C) tensor; ``decoding`` has its size."""
    assert decoding.size is not None
    out = torch.empty((len(files), *decoding.size, decoding.channels), dtype=torch.uint8)
    with quiet_torchvision_io():
        for start in range(0, len(files), _DECODE_CHUNK):
            chunk = files[start : start + _DECODE_CHUNK]
            out[start : start + len(chunk)] = _decode_chunk(chunk, decoding)
    return out


def _decode_chunk(chunk: list[_ImageFile], decoding: _Decoding) -> Tensor:
    datas = [_read_image(f, decoding)[0] for f in chunk]
    decoded = None
    if all(f.relative.lower().endswith(JPEG_EXTENSIONS) for f in chunk):
        # One call for a list of JPEGs is measurably faster than one call per image.
        try:
            decoded = decode_jpeg(datas, mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError):
            decoded = None  # decode one by one below to name the bad file
    if decoded is None:
        decoded = [decode_rgb(f.path, d) for f, d in zip(chunk, datas, strict=True)]
    fitted = [_fit(f, image, decoding) for f, image in zip(chunk, decoded, strict=True)]
    images = torch.stack(fitted)
    if decoding.grayscale:
        images = luma(images)
    return images.permute(0, 2, 3, 1)


def _fit(file: _ImageFile, image: Tensor, decoding: _Decoding) -> Tensor:
    """A decoded (3, H, W) image at the decoding's size: as it is, resized, or refused."""
    height, width = image.shape[1], image.shape[2]
    if (height, width) == decoding.size:
        return image
    if not decoding.resize:  # the decoder found another size than the header gave
        raise _wrong_size(file, width, height, decoding)
    size = list(decoding.size)  # type: ignore[arg-type]
    return resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)


def _read_image(file: _ImageFile, decoding: _Decoding) -> tuple[Tensor, tuple[int, int]]:
    """The bytes of one image file and its (width, height), once its header says it has a size
    ``decoding`` takes and its byte count fits that size."""
    fixed = decoding.size is not None and not decoding.resize
    pixels = decoding.size[0] * decoding.size[1] if fixed else MAX_IMAGE_PIXELS  # type: ignore[index]
    data = read_regular_file(file.path, "Image", image_byte_limit(pixels), IMAGE_ADVICE)
    if not data:
        raise HooktrainError(f"Image {shown(file.path)} is an empty file; {IMAGE_ADVICE}.")
    size = header_size(data)
    if size is None:
        raise HooktrainError(
            f"Cannot decode image {shown(file.path)} (it has no PNG, JPEG, GIF or WebP header "
            f"giving its size); {IMAGE_ADVICE}."
        )
    # Checked before decoding, so a file claiming 10**5 x 10**5 pixels is never decoded.
    width, height = size
    if fixed and (height, width) != decoding.size:
        raise _wrong_size(file, width, height, decoding)
    if width * height > MAX_IMAGE_PIXELS:
        raise HooktrainError(
            f"Image {shown(file.path)} is {width}x{height} pixels, more than the "
            f"{MAX_IMAGE_PIXELS:,} an image may have; {IMAGE_ADVICE} with a smaller one."
        )
    limit = image_byte_limit(width * height)
    if len(data) > limit:
        raise HooktrainError(
            f"Image {shown(file.path)} is {len(data):,} bytes, more than the {limit:,} a "
            f"{width}x{height} image takes; {IMAGE_ADVICE}."
        )
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), size


def _wrong_size(file: _ImageFile, width: int, height: int, decoding: _Decoding) -> HooktrainError:
    return HooktrainError(
        f"Image {shown(file.path)} is {width}x{height} pixels but {decoding.size_rule}; "
        f"{decoding.size_advice}."
    )
