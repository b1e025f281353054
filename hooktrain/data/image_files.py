"""One image file a user pointed at: read safely, its size from its header, decoded to RGB.

Only regular files of a plausible size are opened (a FIFO named x.jpg would block forever, a
link to /dev/zero never end). An image's header gives its size before any pixel is decoded, so
a file claiming 100,000 x 100,000 pixels (a decompression bomb) is refused without allocating
them. Every mode decodes to RGB: grayscale is repeated, alpha dropped, palettes and CMYK
converted, 16-bit samples rounded to 8 bits as the PNG specification recommends.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import struct
import warnings
from collections.abc import Iterator

import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

from hooktrain.errors import HooktrainError, short_reason, shown

__all__ = [
    "IMAGE_ADVICE",
    "IMAGE_EXTENSIONS",
    "JPEG_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "decode_rgb",
    "header_size",
    "image_byte_limit",
    "luma",
    "quiet_torchvision_io",
    "read_regular_file",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp")
JPEG_EXTENSIONS = (".jpg", ".jpeg")
IMAGE_ADVICE = "remove or replace it"
# 8192x8192: above a 50-megapixel photo, below what a crafted header claims to fill memory.
MAX_IMAGE_PIXELS = 1 << 26
# Metadata (EXIF, ICC profiles, comments) takes a few KB and rarely near 4 MB...
_IMAGE_METADATA_BYTES = 4 << 20
# ...and the pixels at most 4 bytes each: 8-bit RGBA stored uncompressed.
_BYTES_PER_PIXEL = 4
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers (0xC4, 0xC8 and 0xCC are other segments in that range).
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, the restart markers, start and end of image.
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xDA)})
_TORCHVISION_IO_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"
# torchvision's errors begin with the C++ function, file and line: "decode_jpeg, /a/b.cpp:171, "
_TORCHVISION_SOURCE = re.compile(r"^\w+, \S+:\d+, ")
# Pillow's ITU-R 601-2 luma weights for convert("L"), in 1/65536, with its rounding.
_LUMA_WEIGHTS = (19595, 38470, 7471)
_LUMA_ROUNDING = 1 << 15


def image_byte_limit(pixels: int) -> int:
    """The most bytes an honest image file of ``pixels`` pixels takes (4 MB for 32x32)."""
    return _IMAGE_METADATA_BYTES + _BYTES_PER_PIXEL * pixels


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


@contextlib.contextmanager
def quiet_torchvision_io() -> Iterator[None]:
    """torchvision 0.29 deprecates its image codecs (for TorchCodec) and warns on every call;
    they still work, and one warning per image would bury everything else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _TORCHVISION_IO_DEPRECATION, DeprecationWarning)
        yield


def decode_rgb(path: str, data: Tensor) -> Tensor:
    """Decode any image torchvision reads into uint8 RGB (3, H, W); ``path`` names it in errors."""
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:
        reason = _TORCHVISION_SOURCE.sub("", short_reason(exc))
        raise HooktrainError(
            f"Cannot decode image {shown(path)} ({reason}); {IMAGE_ADVICE}."
        ) from exc
    if image.dtype == torch.uint16:
        # 16-bit PNGs: round(v * 255 / 65535) = round(v / 257), the PNG specification's scaling.
        image = ((image.to(torch.int32) + 128) // 257).to(torch.uint8)
    return image


def luma(images: Tensor) -> Tensor:
    """uint8 RGB (N, 3, H, W) -> uint8 (N, 1, H, W), exactly as Pillow's ``convert("L")``."""
    x = images.to(torch.int32)
    red, green, blue = _LUMA_WEIGHTS
    y = x[:, 0:1] * red + x[:, 1:2] * green + x[:, 2:3] * blue + _LUMA_ROUNDING
    return (y >> 16).to(torch.uint8)


def header_size(data: bytes) -> tuple[int, int] | None:
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
