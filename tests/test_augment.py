"""Tests for hooktrain.data.augment and hooktrain.data.chain: each piece against torchvision's
per-sample ops on real CIFAR-10 images, chains (fused and not), a user's own piece, and the
sentences for settings that cannot work."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import attrs
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.io import decode_jpeg, read_file
from torchvision.transforms import InterpolationMode

from hooktrain.data.augment import (
    Augmentation,
    Cutout,
    Draws,
    Normalize,
    RandomCrop,
    RandomFlip,
    Resize,
    Shape,
)
from hooktrain.data.chain import Chain
from hooktrain.data.device import DeviceData, Split, Splits
from hooktrain.errors import HooktrainError

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
GRAY_MEAN, GRAY_STD = (0.48,), (0.24,)
PER_CLASS = 6
# torchvision 0.29 deprecates its JPEG decoder in favour of TorchCodec; it still decodes exactly.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


@pytest.fixture(scope="module")
def real_images(cifar_dir: Path) -> tuple[Tensor, Tensor]:
    """60 real training images, uint8 NHWC, with their labels."""
    classes = sorted(folder.name for folder in (cifar_dir / "train").iterdir())
    pixels, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((cifar_dir / "train" / name).iterdir())[:PER_CLASS]:
            pixels.append(decode_jpeg(read_file(str(path))).permute(1, 2, 0))
            labels.append(label)
    return torch.stack(pixels).contiguous(), torch.tensor(labels)


@pytest.fixture(scope="module")
def images(real_images: tuple[Tensor, Tensor]) -> Tensor:
    return real_images[0]


@pytest.fixture(scope="module")
def gray(images: Tensor) -> Tensor:
    """The same images in grayscale, (N, H, W, 1)."""
    return TF.rgb_to_grayscale(images.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).contiguous()


def shape_of(images: Tensor) -> Shape:
    height, width, channels = images.shape[1:]
    return height, width, channels


def per_sample(images: Tensor, transform: Callable[[Tensor, int], Tensor]) -> Tensor:
    """`transform(chw_image, i)` for every image, back in NHWC."""
    chw = images.permute(0, 3, 1, 2)
    return torch.stack([transform(image, i).permute(1, 2, 0) for i, image in enumerate(chw)])


# ---------------------------------------------------------------------------------------------
# Pieces against torchvision


@pytest.mark.parametrize("mode", ["reflect", "zeros"])
@pytest.mark.parametrize(
    ("size", "pad", "crop_to"),
    [(None, 0, None), (None, 4, None), (24, 2, None), (36, 4, None), (None, 7, (20, 28))],
)
def test_random_crop_matches_torchvision(
    images: Tensor, mode: str, size: int | None, pad: int, crop_to: tuple[int, int] | None
) -> None:
    if crop_to is not None:  # non-square images
        images = images[:, : crop_to[0], : crop_to[1]].contiguous()
    piece = RandomCrop(size, pad=pad, mode=mode)  # type: ignore[arg-type]
    shape = shape_of(images)
    height, width = (shape[0], shape[1]) if size is None else (size, size)
    draws = piece.draw(torch.Generator().manual_seed(pad), len(images), shape)
    # The extreme offsets, where the padding shows.
    draws["top"][:2] = torch.tensor([0, shape[0] + 2 * pad - height])
    draws["left"][:2] = torch.tensor([shape[1] + 2 * pad - width, 0])
    padding = "reflect" if mode == "reflect" else "constant"

    def crop(image: Tensor, i: int) -> Tensor:
        padded = TF.pad(image, [pad] * 4, fill=0, padding_mode=padding)
        return TF.crop(padded, int(draws["top"][i]), int(draws["left"][i]), height, width)

    got = piece.apply(images, draws)
    assert piece.output_shape(shape) == (height, width, 3) == got.shape[1:]
    assert got.dtype == torch.uint8
    assert torch.equal(got, per_sample(images, crop))


@pytest.mark.parametrize(("size", "pad", "shape"), [(None, 4, (32, 32, 3)), (24, 3, (32, 30, 1))])
def test_random_crop_draws_top_then_left_uniformly(
    size: int | None, pad: int, shape: Shape
) -> None:
    generator = torch.Generator().manual_seed(11)
    state = generator.get_state()
    draws = RandomCrop(size, pad=pad).draw(generator, 500, shape)
    generator.set_state(state)
    crop = size or shape[0]
    top = torch.randint(0, shape[0] + 2 * pad - crop + 1, (500,), generator=generator)
    left = torch.randint(
        0, shape[1] + 2 * pad - (size or shape[1]) + 1, (500,), generator=generator
    )
    assert list(draws) == ["top", "left"]
    assert torch.equal(draws["top"], top) and torch.equal(draws["left"], left)


def test_zero_padding_really_pads_with_zeros() -> None:
    images = torch.full((1, 32, 32, 3), 200, dtype=torch.uint8)
    draws = {"top": torch.tensor([0]), "left": torch.tensor([8])}
    out = RandomCrop(pad=4, mode="zeros").apply(images, draws)
    assert out[0, :4].eq(0).all() and out[0, 4:, :28].eq(200).all() and out[0, :, 28:].eq(0).all()


def test_random_flip_matches_horizontal_flip(images: Tensor) -> None:
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    draws = RandomFlip().draw(generator, len(images), shape_of(images))
    generator.set_state(state)
    assert torch.equal(draws["flip"], torch.randint(0, 2, (len(images),), generator=generator))
    flip = draws["flip"].bool()
    assert flip.any() and not flip.all()

    def reference(image: Tensor, i: int) -> Tensor:
        return TF.horizontal_flip(image) if flip[i] else image

    assert torch.equal(RandomFlip().apply(images, draws), per_sample(images, reference))


@pytest.mark.parametrize(("size", "fill"), [(16, 0), (7, 127), (40, 255)])
def test_cutout_matches_a_per_sample_loop(images: Tensor, size: int, fill: int) -> None:
    piece = Cutout(size, fill=fill)
    draws = piece.draw(torch.Generator().manual_seed(size), len(images), shape_of(images))
    draws["y"][:2], draws["x"][:2] = torch.tensor([0, 31]), torch.tensor([31, 0])  # corners
    expected = images.clone()
    for i in range(len(images)):
        top, left = int(draws["y"][i]) - size // 2, int(draws["x"][i]) - size // 2
        expected[i, max(top, 0) : max(top + size, 0), max(left, 0) : max(left + size, 0)] = fill
    got = piece.apply(images, draws)
    assert torch.equal(got, expected)
    assert not torch.equal(images, got)  # the input is left as it was
    assert draws["y"].min() >= 0 and draws["y"].max() < 32


@pytest.mark.parametrize(("height", "width"), [(24, 20), (48, 40), (32, 32)])
def test_resize_matches_torchvision(images: Tensor, height: int, width: int) -> None:
    piece = Resize(height, width)
    assert piece.draw(torch.Generator(), len(images), shape_of(images)) == {}

    def reference(image: Tensor, i: int) -> Tensor:
        return TF.resize(image, [height, width], InterpolationMode.BILINEAR, antialias=True)

    got = piece.apply(images, {})
    assert got.dtype == torch.uint8 and piece.output_shape(shape_of(images)) == got.shape[1:]
    # uint8 antialiased resizing is the same integer kernel batched or per image.
    assert torch.equal(got, per_sample(images, reference))


@pytest.mark.parametrize("grayscale", [False, True])
def test_normalize_matches_torchvision(images: Tensor, gray: Tensor, grayscale: bool) -> None:
    pixels, mean, std = (gray, GRAY_MEAN, GRAY_STD) if grayscale else (images, MEAN, STD)
    got = Normalize(mean, std).apply(pixels, {})
    chw = pixels.permute(0, 3, 1, 2).to(torch.float32) / 255
    assert got.dtype == torch.float32 and got.shape == chw.shape
    # Elementwise float32 division and subtraction round the same in both: exact.
    assert torch.equal(got, TF.normalize(chw, list(mean), list(std)))
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_normalize_inverse_gives_pixels_back_clamped(images: Tensor) -> None:
    piece = Normalize(MEAN, STD)
    back = piece.inverse(piece.apply(images, {}))
    expected = images.permute(0, 3, 1, 2).to(torch.float32) / 255
    torch.testing.assert_close(back, expected, rtol=0, atol=1e-6)  # float32 round trip
    out = piece.inverse(torch.tensor([-10.0, 0.0, 10.0]).view(3, 1, 1))
    assert out.flatten().tolist() == [0.0, torch.tensor(MEAN[1]).item(), 1.0]


def test_normalize_takes_lists_and_ints() -> None:
    assert Normalize([0, 1, 0.5], [1, 1, 1]) == Normalize((0.0, 1.0, 0.5), (1.0, 1.0, 1.0))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Chains


def one_by_one(
    pieces: tuple[Augmentation, ...], images: Tensor, index: Tensor, draws: list[Draws]
) -> Tensor:
    """The pieces applied one after another, each on its own, to `images[index]`."""
    out = images[index]
    for piece, drawn in zip(pieces, draws, strict=True):
        out = piece.apply(out, drawn)
    return out


@pytest.mark.parametrize(
    "pieces",
    [
        (RandomCrop(pad=4, mode="zeros"), RandomFlip(), Normalize(MEAN, STD)),
        (RandomFlip(), RandomCrop(28, pad=2, mode="zeros"), RandomCrop(30, pad=3), RandomFlip()),
        (Resize(40, 36), RandomCrop(32, pad=1), Cutout(8), RandomFlip(), RandomCrop(pad=4)),
        (Cutout(12, fill=9), RandomCrop(pad=3, mode="zeros")),
    ],
)
def test_chain_equals_its_pieces_one_by_one(images: Tensor, pieces: tuple) -> None:
    chain = Chain(pieces, shape_of(images))
    draws = chain.draw(torch.Generator().manual_seed(0), len(images))
    index = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))[:40]
    rows = [{name: t[index] for name, t in d.items()} for d in draws]
    got = chain.apply(images, index, rows)
    assert torch.equal(got, one_by_one(pieces, images, index, rows))


def test_consecutive_geometric_pieces_share_one_stage() -> None:
    chain = Chain(
        (RandomCrop(pad=4), RandomFlip(), Cutout(4), RandomFlip(), Normalize(MEAN, STD)),
        (32, 32, 3),
    )
    assert chain._stages == [[0, 1], [2], [3], [4]]


def test_draws_come_in_chain_order_and_reproduce() -> None:
    pieces = (RandomCrop(pad=2), Cutout(8), RandomFlip(), Normalize(MEAN, STD))
    chain = Chain(pieces, (32, 32, 3))
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    first = chain.draw(generator, 100)
    generator.set_state(state)
    again = chain.draw(generator, 100)
    generator.set_state(state)
    expected = [p.draw(generator, 100, (32, 32, 3)) for p in pieces]
    for drawn in (again, expected):
        assert [list(d) for d in drawn] == [["top", "left"], ["y", "x"], ["flip"], []]
        assert all(torch.equal(a[k], b[k]) for a, b in zip(first, drawn, strict=True) for k in a)


@attrs.frozen
class Brightness:
    """A user's own piece: add a per-image shift of -delta..delta to every pixel, clamped."""

    delta: int = 40
    train_only: ClassVar[bool] = True

    def output_shape(self, shape: Shape) -> Shape:
        return shape

    def draw(self, generator: torch.Generator, n: int, shape: Shape) -> Draws:
        shift = torch.randint(-self.delta, self.delta + 1, (n,), generator=generator)
        return {"shift": shift.to(torch.int16), "keep": torch.rand(n, generator=generator) < 0.2}

    def apply(self, images: Tensor, draws: Draws) -> Tensor:
        shift = torch.where(draws["keep"], 0, draws["shift"].int())[:, None, None, None]
        return (images.int() + shift).clamp(0, 255).to(torch.uint8)


def test_a_users_own_piece_works_in_device_data(real_images: tuple[Tensor, Tensor]) -> None:
    images, labels = real_images
    splits = Splits(Split(images, labels), Split(images[:10], labels[:10]), tuple("abcdefghij"))
    pieces = (RandomCrop(pad=4), Brightness(), RandomFlip(), Normalize(MEAN, STD))
    data = DeviceData(splits, torch.device("cpu"), 20, pieces)
    plan = data.epoch_plan(torch.Generator().manual_seed(2))
    assert plan.draws[1]["shift"].dtype == torch.int16 and plan.draws[1]["keep"].dtype == torch.bool

    generator = torch.Generator().manual_seed(2)
    order = torch.randperm(len(images), generator=generator)
    draws = Chain(pieces, (32, 32, 3)).draw(generator, len(images))
    rows = [{name: t[20:40] for name, t in d.items()} for d in draws]  # batch 1's slots
    x, y = data.train_batch(plan, 1)
    assert torch.equal(x, one_by_one(pieces, images, order[20:40], rows).contiguous())
    assert torch.equal(y, labels[order[20:40]])
    # Evaluation skips the random pieces, the user's among them.
    test_x, _ = next(data.eval_batches("test"))
    assert torch.equal(test_x, Normalize(MEAN, STD).apply(images[:10], {}).contiguous())


def test_grayscale_images_go_through_device_data(gray: Tensor) -> None:
    labels = torch.arange(len(gray)) % 10
    splits = Splits(Split(gray, labels), Split(gray[:7], labels[:7]), tuple("abcdefghij"))
    pieces = (RandomCrop(pad=4, mode="zeros"), RandomFlip(), Cutout(8), Normalize((0.5,), (0.25,)))
    data = DeviceData(splits, torch.device("cpu"), 12, pieces, channels_last=True)
    x, _ = data.train_batch(data.epoch_plan(torch.Generator().manual_seed(0)), 0)
    assert x.shape == (12, 1, 32, 32) and data.input_shape == (1, 32, 32)
    assert [tuple(x.shape) for x, _ in data.eval_batches("test")] == [(7, 1, 32, 32)]


# ---------------------------------------------------------------------------------------------
# Sentences


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: RandomCrop(mode="wrap"), "Unknown pad mode 'wrap'; use one of 'reflect', 'zeros'"),
        (lambda: RandomCrop(pad=-1), "Crop padding must be 0 or more, got -1"),
        (lambda: RandomCrop(size=0), "crop size must be at least 1 pixel, got 0"),
        (lambda: Cutout(0), "cutout size must be at least 1 pixel"),
        (lambda: Cutout(8, fill=256), "cutout fill is a pixel value from 0 to 255, got 256"),
        (lambda: Resize(0, 8), "Resize needs a positive height and width, got 0x8"),
        (lambda: Normalize((), ()), "one mean and one positive std per channel"),
        (lambda: Normalize((0.5, 0.5), (0.2,)), "one mean and one positive std per channel"),
        (lambda: Normalize((0.5,), (0.0,)), "one mean and one positive std per channel"),
        (lambda: Normalize("abc", (1.0,)), "needs a list of numbers, one per channel, got 'abc'"),
    ],
)
def test_bad_piece_settings_are_sentences(make: object, match: str) -> None:
    with pytest.raises(HooktrainError, match=match):
        make()  # type: ignore[operator]


@attrs.frozen
class DrawsWhenDeterministic:
    train_only: ClassVar[bool] = False

    def output_shape(self, shape: Shape) -> Shape:
        return shape

    def draw(self, generator: torch.Generator, n: int, shape: Shape) -> Draws:
        return {"noise": torch.rand(n, generator=generator)}

    def apply(self, images: Tensor, draws: Draws) -> Tensor:
        return images


@attrs.frozen
class DrawsTooFew(DrawsWhenDeterministic):
    train_only: ClassVar[bool] = True

    def draw(self, generator: torch.Generator, n: int, shape: Shape) -> Draws:
        return {"noise": torch.rand(n - 1, generator=generator)}


@pytest.mark.parametrize(
    ("pieces", "shape", "match"),
    [
        ((Normalize(MEAN, STD), RandomFlip()), (32, 32, 3), "Normalize must be the last.*Random"),
        ((RandomFlip, Normalize(MEAN, STD)), (32, 32, 3), "piece 1, .* is not an augmentation"),
        ((object(),), (32, 32, 3), "piece 1, <object object .* is not an augmentation"),
        ((RandomCrop(pad=32),), (32, 32, 3), "Reflect padding of 32 pixels needs images larger"),
        ((RandomCrop(pad=4),), (32, 3, 3), "Reflect padding of 4 .* but they are 3"),
        ((RandomCrop(41, pad=4),), (32, 32, 3), "41-pixel crop does not fit in the 32x32 images"),
        ((RandomCrop(pad=32, mode="zeros"),), (32, 32, 3), "Padding of 32 .* a pad below 32"),
        ((RandomCrop(8, pad=8, mode="zeros"),), (32, 32, 3), "lets a 8-pixel crop miss the"),
        ((Normalize(MEAN, STD),), (32, 32, 1), "needs 1 means and 1 positive stds for 1-channel"),
    ],
)
def test_bad_chains_are_sentences(pieces: tuple, shape: Shape, match: str) -> None:
    with pytest.raises(HooktrainError, match=match):
        Chain(pieces, shape)


def test_evaluation_with_another_size_is_refused() -> None:
    chain = Chain((RandomCrop(24), Normalize(MEAN, STD)), (32, 32, 3))
    with pytest.raises(HooktrainError, match=r"come out \(24, 24, 3\) .* gives \(32, 32, 3\)"):
        chain.for_evaluation()
    fixed = Chain((RandomCrop(24), Resize(32, 32), Normalize(MEAN, STD)), (32, 32, 3))
    assert fixed.for_evaluation().pieces == (Resize(32, 32), Normalize(MEAN, STD))


@pytest.mark.parametrize(
    ("piece", "match"),
    [
        (DrawsWhenDeterministic(), "is deterministic .* but draws noise"),
        (DrawsTooFew(), "drew 9 rows of 'noise' for 10 samples"),
    ],
)
def test_bad_draws_are_sentences(piece: Augmentation, match: str) -> None:
    with pytest.raises(HooktrainError, match=match):
        Chain((piece,), (32, 32, 3)).draw(torch.Generator(), 10)
