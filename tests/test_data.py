"""Tests for hooktrain.data.device: batched augmentation and DeviceData."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from hooktrain.data.device import (
    CIFAR10_CLASSES,
    DeviceData,
    ImageDataset,
    ImageSplit,
    crop_flip,
    normalize,
)
from hooktrain.errors import HooktrainError

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


# ---------------------------------------------------------------------------------------------
# Builders


def synthetic_dataset(n_train: int = 50, n_test: int = 23, seed: int = 0) -> ImageDataset:
    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> ImageSplit:
        images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=gen)
        return ImageSplit(images, torch.randint(0, 10, (n,), generator=gen))

    return ImageDataset(split(n_train), split(n_test), CIFAR10_CLASSES)


# ---------------------------------------------------------------------------------------------
# Augmentation


def reference_crop_flip(
    images: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    flip: torch.Tensor,
    pad: int,
    mode: str,
) -> torch.Tensor:
    out = []
    height, width = images.shape[1:3]
    for i, image in enumerate(images.permute(0, 3, 1, 2)):
        if mode == "reflect":
            padded = TF.pad(image, [pad] * 4, padding_mode="reflect")
        else:
            padded = TF.pad(image, [pad] * 4, fill=0, padding_mode="constant")
        cropped = TF.crop(padded, int(top[i]), int(left[i]), height, width)
        if flip[i]:
            cropped = TF.horizontal_flip(cropped)
        out.append(cropped.permute(1, 2, 0))
    return torch.stack(out)


@pytest.mark.parametrize("pad_mode", ["reflect", "zeros"])
@pytest.mark.parametrize(
    ("pad", "size"), [(0, (32, 32)), (1, (32, 32)), (4, (32, 32)), (7, (20, 28))]
)
def test_crop_flip_matches_torchvision(pad_mode: str, pad: int, size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(pad)
    batch = 64
    images = torch.randint(0, 256, (batch, *size, 3), dtype=torch.uint8, generator=gen)
    top = torch.randint(0, 2 * pad + 1, (batch,), generator=gen)
    left = torch.randint(0, 2 * pad + 1, (batch,), generator=gen)
    flip = torch.rand(batch, generator=gen) < 0.5
    # Make sure the extreme offsets are exercised, where the padding is actually visible.
    top[:4] = torch.tensor([0, 2 * pad, 0, 2 * pad])
    left[:4] = torch.tensor([0, 2 * pad, 2 * pad, 0])

    got = crop_flip(images, top, left, flip, pad, pad_mode)

    assert got.dtype == torch.uint8
    assert got.shape == images.shape
    assert torch.equal(got, reference_crop_flip(images, top, left, flip, pad, pad_mode))


def test_crop_flip_zeros_really_pads_with_zeros() -> None:
    images = torch.full((1, 32, 32, 3), 200, dtype=torch.uint8)
    out = crop_flip(images, torch.tensor([0]), torch.tensor([8]), torch.tensor([False]), 4, "zeros")
    assert out[0, :4].eq(0).all() and out[0, 4:, :28].eq(200).all() and out[0, :, 28:].eq(0).all()


def test_crop_flip_rejects_unknown_pad_mode() -> None:
    images = torch.zeros((2, 32, 32, 3), dtype=torch.uint8)
    offsets = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(HooktrainError, match="Unknown pad mode 'edge'"):
        crop_flip(images, offsets, offsets, torch.zeros(2, dtype=torch.bool), 4, "edge")


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_matches_torchvision(channels_last: bool) -> None:
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    got = normalize(images, torch.tensor(MEAN), torch.tensor(STD), channels_last)

    chw = images.permute(0, 3, 1, 2).contiguous()
    expected = TF.normalize(TF.to_dtype(chw, torch.float32, scale=True), list(MEAN), list(STD))
    assert got.dtype == torch.float32
    assert got.shape == (8, 3, 32, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    if channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert not got.is_contiguous()
    else:
        assert got.is_contiguous()


# ---------------------------------------------------------------------------------------------
# DeviceData


def make_device_data(**kwargs: Any) -> DeviceData:
    options: dict[str, Any] = {"batch_size": 8, "mean": MEAN, "std": STD}
    options.update(kwargs)
    dataset = options.pop("dataset", None) or synthetic_dataset()
    return DeviceData(dataset, torch.device("cpu"), **options)


@pytest.mark.parametrize("channels_last", [False, True])
def test_train_batch_shapes_and_dtypes(channels_last: bool) -> None:
    data = make_device_data(channels_last=channels_last)
    plan = data.epoch_plan(torch.Generator().manual_seed(1))
    x, y = data.train_batch(plan, 0)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (8,) and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert data.num_classes == 10 and data.n_train == 50 and data.n_test == 23
    assert plan.order.shape == (50,) and plan.flip.dtype == torch.bool


def test_steps_per_epoch_drops_partial_batch() -> None:
    data = make_device_data(batch_size=8)  # 50 images
    assert data.steps_per_epoch == 6
    plan = data.epoch_plan(torch.Generator().manual_seed(0))
    data.train_batch(plan, 5)
    with pytest.raises(IndexError):
        data.train_batch(plan, 6)


def test_epoch_is_a_permutation_with_matching_labels() -> None:
    dataset = synthetic_dataset()
    data = make_device_data(dataset=dataset, pad=0, flip=False, batch_size=10)
    plan = data.epoch_plan(torch.Generator().manual_seed(3))
    seen = []
    for step in range(data.steps_per_epoch):
        x, y = data.train_batch(plan, step)
        order = plan.order[step * 10 : (step + 1) * 10]
        pixels = (data.denormalize(x) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        assert torch.equal(pixels, dataset.train.images[order])
        assert torch.equal(y, dataset.train.labels[order])
        seen.extend(order.tolist())
    assert sorted(seen) == list(range(50))


def test_train_batch_applies_the_planned_augmentation() -> None:
    dataset = synthetic_dataset()
    data = make_device_data(dataset=dataset, pad=4, pad_mode="zeros")
    plan = data.epoch_plan(torch.Generator().manual_seed(5))
    x, _ = data.train_batch(plan, 2)
    batch = slice(16, 24)
    expected = crop_flip(
        dataset.train.images[plan.order[batch]],
        plan.top[batch],
        plan.left[batch],
        plan.flip[batch],
        4,
        "zeros",
    )
    assert torch.equal(x, normalize(expected, torch.tensor(MEAN), torch.tensor(STD), False))
    assert plan.flip.any() and not plan.flip.all()
    assert int(plan.top.min()) >= 0 and int(plan.top.max()) <= 8


def test_same_generator_seed_gives_identical_batches() -> None:
    data = make_device_data()
    plans = [data.epoch_plan(torch.Generator().manual_seed(42)) for _ in range(2)]
    for step in range(data.steps_per_epoch):
        (xa, ya), (xb, yb) = (data.train_batch(plan, step) for plan in plans)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = data.epoch_plan(torch.Generator().manual_seed(43))
    assert not torch.equal(other.order, plans[0].order)


def test_flip_disabled_never_flips() -> None:
    data = make_device_data(flip=False)
    assert not data.epoch_plan(torch.Generator().manual_seed(0)).flip.any()


def test_train_limit_subset_is_fixed_and_independent_of_generator() -> None:
    dataset = synthetic_dataset(n_train=50)
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(0))[:20]
    torch.manual_seed(123)  # the global RNG must not matter either
    data_a = make_device_data(dataset=dataset, train_limit=20)
    torch.manual_seed(456)
    data_b = make_device_data(dataset=dataset, train_limit=20)
    assert data_a.n_train == 20 and data_a.steps_per_epoch == 2
    assert torch.equal(data_a.train_images, dataset.train.images[expected])
    assert torch.equal(data_a.train_labels, dataset.train.labels[expected])
    assert torch.equal(data_b.train_images, data_a.train_images)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_limit": 4}, "Train limit 4"),
        ({"train_limit": 51}, "Train limit 51"),
        ({"batch_size": 0}, "Batch size must be at least 1"),
        ({"batch_size": 51}, "larger than the 50 training images"),
        ({"pad_mode": "wrap"}, "Unknown pad mode"),
        ({"pad": 32}, "Reflect padding of 32"),
    ],
)
def test_device_data_rejects_bad_settings(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(HooktrainError, match=match):
        make_device_data(**kwargs)


@pytest.mark.parametrize("eval_batch_size", [5, 23, 1000])
def test_test_batches_cover_every_image_once(eval_batch_size: int) -> None:
    dataset = synthetic_dataset(n_test=23)
    data = make_device_data(dataset=dataset, eval_batch_size=eval_batch_size)
    batches = list(data.test_batches())
    assert [len(y) for _, y in batches][:-1] == [eval_batch_size] * (len(batches) - 1)
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert torch.equal(ys, dataset.test.labels)
    pixels = (data.denormalize(xs) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(pixels, dataset.test.images)


def test_denormalize_is_clamped_to_unit_range() -> None:
    data = make_device_data()
    out = data.denormalize(torch.tensor([-10.0, 0.0, 10.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2))
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
