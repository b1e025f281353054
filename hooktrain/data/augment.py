"""Batched image augmentation as a chain of pure pieces.

Each piece is a pair of pure functions. ``draw`` makes the epoch's random decisions for every
training image at once, on the run's CPU generator, so an epoch is fixed by the generator's
state (a resumed run or another process repeats it exactly). ``apply`` transforms one batch on
the device, given that batch's rows of the draws. Images stay uint8 NHWC until the last piece,
:class:`Normalize`, makes them float32 NCHW. Evaluation applies the deterministic pieces alone.

Consecutive geometric pieces (:class:`RandomCrop`, :class:`RandomFlip`, or any piece with an
``index_map``) compose their pixel maps and read the batch from the stored images in one gather,
so crop and flip together cost one indexing call, with no padded copy and no per-sample loop.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import ClassVar, Literal, Protocol, runtime_checkable

import attrs
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

from hooktrain.errors import HooktrainError

__all__ = [
    "PAD_MODES",
    "Augmentation",
    "Cutout",
    "Draws",
    "Geometric",
    "IndexMap",
    "Normalize",
    "RandomCrop",
    "RandomFlip",
    "Resize",
    "Shape",
    "flip_map",
    "remap",
    "shape_of",
]

Shape = tuple[int, int, int]
"""One image's shape, (height, width, channels)."""
Draws = dict[str, Tensor]
"""A piece's random decisions: named tensors with one row per image of the epoch, in the order
the epoch serves them (row i is for the i-th image served, whichever sample that is)."""
PAD_MODES = ("reflect", "zeros")


@runtime_checkable
class Augmentation(Protocol):
    """One piece of a chain: an epoch's draws for all samples, and a batch's transform.

    ``train_only`` pieces (the random ones) are skipped at evaluation; deterministic pieces must
    draw nothing. ``apply`` takes uint8 NHWC images and returns uint8 NHWC images (Normalize,
    the last piece, returns float32 NCHW), and must not modify its input.
    """

    train_only: ClassVar[bool]

    def draw(self, generator: torch.Generator, n: int, shape: Shape) -> Draws:
        """The decisions for `n` images of `shape`: CPU tensors of first dimension `n`, drawn
        from `generator` alone (so the generator's state fixes them)."""
        ...

    def apply(self, images: Tensor, draws: Draws) -> Tensor:
        """The batch `images` transformed, given the batch's rows of the draws (on its device)."""
        ...

    def output_shape(self, shape: Shape) -> Shape:
        """One output image's shape; a sentence (HooktrainError) where `shape` cannot be used."""
        ...


@attrs.frozen(eq=False)
class IndexMap:
    """Where a geometric piece's output pixels come from, per sample and separately per axis.

    ``rows`` (B, H_out) and ``cols`` (B, W_out) are source indices (B may be 1 for all samples),
    None for an axis left as it is; ``rows_inside`` and ``cols_inside`` say which of them fall
    inside the source (the others read zero padding), None where all do.
    """

    rows: Tensor | None
    cols: Tensor | None
    rows_inside: Tensor | None = None
    cols_inside: Tensor | None = None

    def then(self, other: IndexMap) -> IndexMap:
        """This map followed by `other`, whose indices point into this map's output."""
        return IndexMap(
            _follow(self.rows, other.rows, other.rows),
            _follow(self.cols, other.cols, other.cols),
            _both(_follow(self.rows_inside, other.rows, None), other.rows_inside),
            _both(_follow(self.cols_inside, other.cols, None), other.cols_inside),
        )


def _follow(values: Tensor | None, index: Tensor | None, identity: Tensor | None) -> Tensor | None:
    """`values` read at `index` along dim 1; None `values` stand for `identity`."""
    if values is None:
        return identity
    if index is None:
        return values
    batch = max(values.shape[0], index.shape[0])
    return values.expand(batch, -1).gather(1, index.expand(batch, -1))


def _both(first: Tensor | None, second: Tensor | None) -> Tensor | None:
    """Elementwise `and` of two masks where None means all true."""
    if first is None or second is None:
        return second if first is None else first
    return first & second


@runtime_checkable
class Geometric(Augmentation, Protocol):
    """A piece that only moves pixels: its ``index_map`` lets a chain fuse it into one gather."""

    def index_map(self, draws: Draws, shape: Shape) -> IndexMap:
        """The batch's pixel map, given its rows of the draws and the input `shape`."""
        ...


def remap(images: Tensor, index: Tensor | None, maps: IndexMap) -> Tensor:
    """`images[index]` (all of `images` for None) moved by `maps`, in one gather; uint8 NHWC."""
    if index is None:
        index = torch.arange(images.shape[0], device=images.device)
    rows, cols = maps.rows, maps.cols
    if rows is None:
        rows = torch.arange(images.shape[1], device=images.device)[None]
    if cols is None:
        cols = torch.arange(images.shape[2], device=images.device)[None]
    out = images[index[:, None, None], rows[:, :, None], cols[:, None, :]]
    rows_inside = None if maps.rows_inside is None else maps.rows_inside[:, :, None]
    cols_inside = None if maps.cols_inside is None else maps.cols_inside[:, None, :]
    inside = _both(rows_inside, cols_inside)
    return out if inside is None else torch.where(inside[..., None], out, 0)


def shape_of(images: Tensor) -> Shape:
    height, width, channels = images.shape[1:]
    return height, width, channels


# ---------------------------------------------------------------------------------------------
# Built-in pieces


def _check_pad(pad: int, mode: str, image: tuple[int, int], crop: tuple[int, int]) -> None:
    """Refuse padding the images cannot take, or that lets a crop miss them entirely."""
    (height, width), size = image, min(image)
    if mode == "reflect" and pad >= size:
        raise HooktrainError(
            f"Reflect padding of {pad} pixels needs images larger than {pad} pixels, but they are "
            f"{size}; use a smaller pad or pad mode 'zeros'."
        )
    if crop[0] > height + 2 * pad or crop[1] > width + 2 * pad:
        raise HooktrainError(
            f"A {crop[0]}-pixel crop does not fit in the {height}x{width} images padded by {pad}; "
            f"use a crop size of at most {size + 2 * pad}, or more padding."
        )
    if mode == "zeros" and pad >= min(crop):
        raise HooktrainError(
            f"Padding of {pad} pixels lets a {min(crop)}-pixel crop miss the image entirely; "
            f"use a pad below {min(crop)}."
        )


def _source_indices(
    offset: Tensor, pad: int, out: int, size: int, mode: str
) -> tuple[Tensor, Tensor | None]:
    """Source coordinates of `out` crop pixels from `offset` in a `pad`-padded axis of `size`,
    and (zero padding only) which of them fall inside the image."""
    raw = offset[:, None] - pad + torch.arange(out, device=offset.device)
    if mode == "reflect":
        # Reflection about the edge pixel, without repeating it (torchvision's "reflect").
        mapped = torch.where(raw < 0, -raw, raw)
        return torch.where(mapped >= size, 2 * (size - 1) - mapped, mapped), None
    return raw.clamp(0, size - 1), (raw >= 0) & (raw < size)


@attrs.frozen
class RandomCrop:
    """torchvision's ``RandomCrop(size, padding=pad)``: pad every side by `pad` (mirrored, or
    with zeros), then cut a size x size window at a uniform position. `size` None keeps the
    input's height and width, the classic CIFAR-10 "pad and crop"."""

    size: int | None = None
    pad: int = 0
    mode: Literal["reflect", "zeros"] = "reflect"
    train_only: ClassVar[bool] = True

    def __attrs_post_init__(self) -> None:
        if self.mode not in PAD_MODES:
            raise HooktrainError(
                f"Unknown pad mode {self.mode!r}; use one of {', '.join(map(repr, PAD_MODES))}."
            )
        if self.pad < 0:
            raise HooktrainError(
                f"Crop padding must be 0 or more, got {self.pad}; set the crop's pad to 0 or more."
            )
        if self.size is not None and self.size < 1:
            raise HooktrainError(
                f"A crop size must be at least 1 pixel, got {self.size}; pass a positive size, "
                "or none to keep the images' size."
            )

    def _crop(self, shape: Shape) -> tuple[int, int]:
        return (shape[0], shape[1]) if self.size is None else (self.size, self.size)

    def output_shape(self, shape: Shape) -> Shape:
        crop = self._crop(shape)
        _check_pad(self.pad, self.mode, (shape[0], shape[1]), crop)
        return crop[0], crop[1], shape[2]

    def draw(self, generator: torch.Generator, n: int, shape: Shape) -> Draws:
        height, width = self._crop(shape)
        span_top = shape[0] + 2 * self.pad - height
        span_left = shape[1] + 2 * self.pad - width
        top = torch.randint(0, span_top + 1, (n,), generator=generator)
        left = torch.randint(0, span_left + 1, (n,), generator=generator)
        return {"top": top, "left": left}

    def index_map(self, draws: Draws, shape: Shape) -> IndexMap:
        height, width = self._crop(shape)
        rows, rows_inside = _source_indices(draws["top"], self.pad, height, shape[0], self.mode)
        cols, cols_inside = _source_indices(draws["left"], self.pad, width, shape[1], self.mode)
        return IndexMap(rows, cols, rows_inside, cols_inside)

    def apply(self, images: Tensor, draws: Draws) -> Tensor:
        return remap(images, None, self.index_map(draws, shape_of(images)))


def flip_map(draws: Draws, shape: Shape) -> IndexMap:
    """The columns mirrored in the rows whose ``draws["flip"]`` is 1."""
    flip = draws["flip"].bool()[:, None]
    cols = torch.arange(shape[1], device=flip.device)
    return IndexMap(None, torch.where(flip, cols.flip(0), cols))


@attrs.frozen
class RandomFlip:
    """Mirror left-right with probability 0.5 (torchvision's ``RandomHorizontalFlip()``)."""

    train_only: ClassVar[bool] = True

    def output_shape(self, shape: Shape) -> Shape:
        return shape

    def draw(self, generator: torch.Generator, n: int, shape: Shape) -> Draws:
        return {"flip": torch.randint(0, 2, (n,), generator=generator)}

    def index_map(self, draws: Draws, shape: Shape) -> IndexMap:
        return flip_map(draws, shape)

    def apply(self, images: Tensor, draws: Draws) -> Tensor:
        return remap(images, None, flip_map(draws, shape_of(images)))


@attrs.frozen
class Cutout:
    """Cutout (DeVries & Taylor, 2017): set a size x size square to `fill`, its centre uniform
    over the image and the square clipped at the edges. The square spans rows
    ``centre - size // 2`` up to, not including, ``centre - size // 2 + size`` (and the same for
    columns), which for an even size is the paper's square."""

    size: int
    fill: int = 0
    train_only: ClassVar[bool] = True

    def __attrs_post_init__(self) -> None:
        if self.size < 1:
            raise HooktrainError(f"A cutout size must be at least 1 pixel, got {self.size}.")
        if not 0 <= self.fill <= 255:
            raise HooktrainError(
                f"A cutout fill is a pixel value from 0 to 255, got {self.fill}; pass one in range."
            )

    def output_shape(self, shape: Shape) -> Shape:
        return shape

    def draw(self, generator: torch.Generator, n: int, shape: Shape) -> Draws:
        centre_y = torch.randint(0, shape[0], (n,), generator=generator)
        centre_x = torch.randint(0, shape[1], (n,), generator=generator)
        return {"y": centre_y, "x": centre_x}

    def _covered(self, centre: Tensor, length: int) -> Tensor:
        start = centre[:, None] - self.size // 2
        pixels = torch.arange(length, device=centre.device)
        return (pixels >= start) & (pixels < start + self.size)

    def apply(self, images: Tensor, draws: Draws) -> Tensor:
        rows = self._covered(draws["y"], images.shape[1])
        cols = self._covered(draws["x"], images.shape[2])
        return images.masked_fill((rows[:, :, None] & cols[:, None, :])[..., None], self.fill)


@attrs.frozen
class Resize:
    """Resize to height x width, bilinear with antialiasing (torchvision's ``Resize``); applied
    at evaluation too."""

    height: int
    width: int
    train_only: ClassVar[bool] = False

    def __attrs_post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise HooktrainError(
                f"Resize needs a positive height and width, got {self.height}x{self.width}."
            )

    def output_shape(self, shape: Shape) -> Shape:
        return self.height, self.width, shape[2]

    def draw(self, generator: torch.Generator, n: int, shape: Shape) -> Draws:
        return {}

    def apply(self, images: Tensor, draws: Draws) -> Tensor:
        size = [self.height, self.width]
        nchw = images.permute(0, 3, 1, 2)
        out = TF.resize(nchw, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
        return out.permute(0, 2, 3, 1)


def _floats(values: Sequence[float]) -> tuple[float, ...]:
    """A mean or std as a tuple of floats (JSON and Python users may give a list)."""
    if not isinstance(values, list | tuple) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    ):
        raise HooktrainError(
            f"Normalization needs a list of numbers, one per channel, got {values!r}."
        )
    return tuple(float(v) for v in values)


@functools.lru_cache(maxsize=32)
def _constant(values: tuple[float, ...], device: torch.device) -> Tensor:
    """`values` as a float32 tensor on `device`, made once: no host-to-device copy per batch."""
    with torch.inference_mode(False):  # usable outside inference mode, whoever asked first
        return torch.tensor(values, dtype=torch.float32, device=device)


@attrs.frozen
class Normalize:
    """uint8 NHWC -> float32 NCHW ``(x / 255 - mean) / std``, one mean and std per channel.

    The result is the NCHW view of an NHWC buffer (channels_last memory). It must be the last
    piece; ``inverse`` undoes it for image grids.
    """

    mean: tuple[float, ...] = attrs.field(converter=_floats)
    std: tuple[float, ...] = attrs.field(converter=_floats)
    train_only: ClassVar[bool] = False

    def __attrs_post_init__(self) -> None:
        if not self.mean or len(self.mean) != len(self.std) or min(self.std) <= 0:
            raise HooktrainError(
                "Normalization needs one mean and one positive std per channel, got "
                f"mean={self.mean} std={self.std}."
            )

    def output_shape(self, shape: Shape) -> Shape:
        channels = shape[2]
        if len(self.mean) != channels:
            raise HooktrainError(
                f"Normalization needs {channels} means and {channels} positive stds for "
                f"{channels}-channel images, got mean={self.mean} std={self.std}."
            )
        return shape

    def draw(self, generator: torch.Generator, n: int, shape: Shape) -> Draws:
        return {}

    def apply(self, images: Tensor, draws: Draws) -> Tensor:
        mean, std = _constant(self.mean, images.device), _constant(self.std, images.device)
        return images.to(torch.float32).div_(255).sub_(mean).div_(std).permute(0, 3, 1, 2)

    def inverse(self, x: Tensor) -> Tensor:
        """Undo `apply` on NCHW (or CHW) input, clamped to [0, 1] for image grids."""
        mean, std = _constant(self.mean, x.device), _constant(self.std, x.device)
        return (x * std[:, None, None] + mean[:, None, None]).clamp(0, 1)
