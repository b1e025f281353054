"""Tests for hooktrain.data.device: DeviceData's batches, splits and checks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from hooktrain.data.augment import Normalize, RandomCrop, RandomFlip
from hooktrain.data.device import CIFAR10_CLASSES, VAL_SEED, DeviceData, Split, Splits
from hooktrain.errors import HooktrainError

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def cifar_chain(pad: int = 4, mode: str = "reflect") -> tuple:
    """The classic CIFAR-10 augmentation: pad and crop, flip, normalize."""
    return (RandomCrop(32, pad=pad, mode=mode), RandomFlip(), Normalize(MEAN, STD))  # type: ignore[arg-type]


def synthetic_dataset(n_train: int = 50, n_test: int = 23, seed: int = 0) -> Splits:
    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=gen)
        return Split(images, torch.randint(0, 10, (n,), generator=gen))

    return Splits(split(n_train), split(n_test), CIFAR10_CLASSES)


def features_dataset(n_train: int = 60, n_test: int = 9, outputs: int = 0) -> Splits:
    """Regression on float features; feature 0 is the row's index, to tell rows apart."""
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        inputs = torch.cat([torch.arange(n)[:, None].double(), torch.randn(n, 4, generator=gen)], 1)
        targets = torch.randn((n, outputs) if outputs else (n,), generator=gen)
        return Split(inputs.to(torch.float64), targets)

    return Splits(split(n_train), split(n_test), None)


def make_device_data(**kwargs: Any) -> DeviceData:
    options: dict[str, Any] = {"batch_size": 8, "augment": cifar_chain()}
    options.update(kwargs)
    dataset = options.pop("dataset", None) or synthetic_dataset()
    return DeviceData(dataset, torch.device("cpu"), **options)


def pixels_of(data: DeviceData, x: Tensor) -> Tensor:
    """Batches back to uint8 NHWC pixels."""
    return (data.denormalize(x) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


# ---------------------------------------------------------------------------------------------
# Training batches


def todays_batches(
    dataset: Splits, seed: int, batch_size: int, pad: int, mode: str
) -> list[tuple[Tensor, Tensor]]:
    """An epoch as DeviceData served it before the chain: its draws from the generator (order,
    then top, left, flip), then pad, crop and flip per image (torchvision) and normalize."""
    generator = torch.Generator().manual_seed(seed)
    n = len(dataset.train)
    order = torch.randperm(n, generator=generator)
    top = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator)
    padding = "reflect" if mode == "reflect" else "constant"
    batches = []
    for start in range(0, n - batch_size + 1, batch_size):
        images = []
        for slot in range(start, start + batch_size):
            image = dataset.train.inputs[order[slot]].permute(2, 0, 1)
            image = TF.pad(image, [pad] * 4, fill=0, padding_mode=padding)
            image = TF.crop(image, int(top[slot]), int(left[slot]), 32, 32)
            images.append(TF.horizontal_flip(image) if flip[slot] else image)
        x = TF.normalize(torch.stack(images).to(torch.float32) / 255, list(MEAN), list(STD))
        batches.append((x, dataset.train.targets[order[start : start + batch_size]]))
    return batches


@pytest.mark.parametrize("mode", ["reflect", "zeros"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batches_are_bit_identical_to_todays(mode: str, channels_last: bool) -> None:
    dataset = synthetic_dataset()
    data = make_device_data(
        dataset=dataset, augment=cifar_chain(4, mode), channels_last=channels_last
    )
    plan = data.epoch_plan(torch.Generator().manual_seed(5))
    expected = todays_batches(dataset, 5, 8, 4, mode)
    assert len(expected) == data.steps_per_epoch == 6
    for index, (x, y) in enumerate(expected):
        got_x, got_y = data.train_batch(plan, index)
        assert torch.equal(got_x, x) and torch.equal(got_y, y)
        assert got_x.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert got_x.is_contiguous() == (not channels_last)


def test_train_batch_shapes_and_dtypes() -> None:
    data = make_device_data()
    plan = data.epoch_plan(torch.Generator().manual_seed(1))
    x, y = data.train_batch(plan, 0)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (8,) and y.dtype == torch.int64
    assert data.num_classes == data.num_outputs == 10 and data.classes == CIFAR10_CLASSES
    assert data.input_shape == (3, 32, 32)
    assert (data.n_train, data.n_val, data.n_test) == (50, 0, 23)
    assert plan.order.shape == (50,)
    assert [list(d) for d in plan.draws] == [["top", "left"], ["flip"], []]


def test_steps_per_epoch_drops_partial_batch() -> None:
    data = make_device_data(batch_size=8)  # 50 images
    assert data.steps_per_epoch == 6
    plan = data.epoch_plan(torch.Generator().manual_seed(0))
    data.train_batch(plan, 5)
    with pytest.raises(IndexError):
        data.train_batch(plan, 6)


def test_no_augmentation_serves_the_pixels_scaled_to_unit_range() -> None:
    dataset = synthetic_dataset()
    data = make_device_data(dataset=dataset, augment=(), batch_size=10)
    assert data.augment == (Normalize((0.0,) * 3, (1.0,) * 3),)
    plan = data.epoch_plan(torch.Generator().manual_seed(3))
    seen = []
    for step in range(data.steps_per_epoch):
        x, y = data.train_batch(plan, step)
        order = plan.order[step * 10 : (step + 1) * 10]
        assert torch.equal(x, dataset.train.inputs[order].permute(0, 3, 1, 2) / 255)
        assert torch.equal(pixels_of(data, x), dataset.train.inputs[order])
        assert torch.equal(y, dataset.train.targets[order])
        seen.extend(order.tolist())
    assert sorted(seen) == list(range(50))


def test_same_generator_seed_gives_identical_batches() -> None:
    data = make_device_data()
    plans = [data.epoch_plan(torch.Generator().manual_seed(42)) for _ in range(2)]
    for step in range(data.steps_per_epoch):
        (xa, ya), (xb, yb) = (data.train_batch(plan, step) for plan in plans)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = data.epoch_plan(torch.Generator().manual_seed(43))
    assert not torch.equal(other.order, plans[0].order)


def test_train_limit_subset_is_fixed_and_independent_of_generator() -> None:
    dataset = synthetic_dataset(n_train=50)
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(0))[:20]
    torch.manual_seed(123)  # the global RNG must not matter either
    data_a = make_device_data(dataset=dataset, train_limit=20)
    torch.manual_seed(456)
    data_b = make_device_data(dataset=dataset, train_limit=20)
    assert data_a.n_train == 20 and data_a.steps_per_epoch == 2
    assert torch.equal(data_a.train.inputs, dataset.train.inputs[expected])
    assert torch.equal(data_a.train.targets, dataset.train.targets[expected])
    assert torch.equal(data_b.train.inputs, data_a.train.inputs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_limit": 4}, "Train limit 4 must be between the batch size 8 and the 50 training"),
        ({"train_limit": 51}, "Train limit 51"),
        ({"batch_size": 0}, "Batch size must be at least 1"),
        ({"eval_batch_size": 0}, "Eval batch size must be at least 1"),
        ({"batch_size": 51}, "larger than the 50 training images"),
        ({"shards": 3}, "batch size 8 does not split evenly over 3 processes.*=9 or 6"),
        ({"augment": cifar_chain(32)}, "Reflect padding of 32"),
        ({"augment": (Normalize((0.5,), (0.5,)),)}, "needs 3 means and 3 positive stds"),
        ({"val_split": 1.0}, "fraction .* from 0 up to \\(not including\\) 1, got 1.0"),
        ({"val_split": -0.1}, "fraction .* got -0.1"),
        ({"val_split": 0.005}, "validation split of 0.005 holds out none of the 50 training"),
        ({"val_split": 0.9}, "0.9 leaves 5 of the 50 training images, fewer than one batch of 8"),
        (
            {"val_split": 0.2, "train_limit": 41},
            "Train limit 41 .* the 40 training images left after the 10 held out for validation",
        ),
    ],
)
def test_device_data_rejects_bad_settings(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(HooktrainError, match=match):
        make_device_data(**kwargs)


# ---------------------------------------------------------------------------------------------
# Evaluation batches and the validation split


@pytest.mark.parametrize("eval_batch_size", [5, 23, 1000])
def test_test_batches_cover_every_image_once(eval_batch_size: int) -> None:
    dataset = synthetic_dataset(n_test=23)
    data = make_device_data(dataset=dataset, eval_batch_size=eval_batch_size)
    batches = list(data.eval_batches("test"))
    assert [len(y) for _, y in batches][:-1] == [eval_batch_size] * (len(batches) - 1)
    xs = torch.cat([x for x, _ in batches])
    assert torch.equal(torch.cat([y for _, y in batches]), dataset.test.targets)
    # Unaugmented: only the deterministic Normalize, exactly as torchvision's.
    chw = dataset.test.inputs.permute(0, 3, 1, 2).to(torch.float32) / 255
    assert torch.equal(xs, TF.normalize(chw, list(MEAN), list(STD)))
    assert torch.equal(pixels_of(data, xs), dataset.test.inputs)


def test_sharded_eval_batches_together_cover_the_split() -> None:
    dataset = synthetic_dataset(n_test=23)
    shards = [
        make_device_data(dataset=dataset, eval_batch_size=4, shard=r, shards=2) for r in (0, 1)
    ]
    batches = [list(data.eval_batches("test")) for data in shards]
    assert [len(b) for b in batches] == [3, 3]
    interleaved = [y for pair in zip(*batches, strict=True) for _, y in pair]
    assert torch.equal(torch.cat(interleaved), dataset.test.targets)


def val_rows(data: DeviceData) -> list[int]:
    return data.val.inputs[:, 0].long().tolist()


def test_val_split_holds_out_the_same_images_whatever_train_limit_or_seed() -> None:
    dataset = features_dataset(n_train=60)
    expected = torch.randperm(60, generator=torch.Generator().manual_seed(VAL_SEED))[:12]
    held = sorted(expected.tolist())
    for train_limit, seed in [(None, 0), (10, 1), (30, 2), (48, 3)]:
        torch.manual_seed(seed)
        data = make_device_data(
            dataset=dataset, augment=(), val_split=0.2, train_limit=train_limit, batch_size=10
        )
        trained = data.train.inputs[:, 0].long().tolist()
        assert val_rows(data) == held and data.n_val == 12
        assert not set(trained) & set(held)
        assert len(trained) == (train_limit or 48) == data.n_train
        if train_limit is None:
            assert sorted(trained + held) == list(range(60))
    assert (
        val_rows(make_device_data(dataset=dataset, augment=(), val_split=0.2, batch_size=4)) == held
    )


def test_val_batches_are_the_held_out_images_unaugmented() -> None:
    dataset = synthetic_dataset(n_train=50)
    data = make_device_data(dataset=dataset, val_split=0.3, eval_batch_size=6)
    held = torch.randperm(50, generator=torch.Generator().manual_seed(VAL_SEED))[:15].sort().values
    batches = list(data.eval_batches("val"))
    assert [len(y) for _, y in batches] == [6, 6, 3]
    xs, ys = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    assert torch.equal(pixels_of(data, xs), dataset.train.inputs[held])
    assert torch.equal(ys, dataset.train.targets[held])
    assert list(make_device_data(dataset=dataset).eval_batches("val")) == []
    # The training split in order, unaugmented (swa recomputes BatchNorm statistics on it).
    rows = torch.ones(50, dtype=torch.bool)
    rows[held] = False
    train_x = torch.cat([x for x, _ in data.eval_batches("train")])
    assert torch.equal(pixels_of(data, train_x), dataset.train.inputs[rows])
    with pytest.raises(HooktrainError, match="Unknown split 'training'"):
        next(data.eval_batches("training"))


# ---------------------------------------------------------------------------------------------
# Features and regression


@pytest.mark.parametrize("outputs", [0, 3])
def test_regression_on_features_passes_inputs_and_targets_through(outputs: int) -> None:
    dataset = features_dataset(outputs=outputs)
    data = make_device_data(dataset=dataset, augment=(), batch_size=12, eval_batch_size=5)
    assert data.num_classes is None and data.classes is None
    assert data.num_outputs == (outputs or 1) and data.input_shape == (5,)
    plan = data.epoch_plan(torch.Generator().manual_seed(0))
    assert plan.draws == ()
    for index in range(data.steps_per_epoch):
        x, y = data.train_batch(plan, index)
        order = plan.order[index * 12 : (index + 1) * 12]
        assert x.dtype == torch.float32 and torch.equal(x, dataset.train.inputs[order].float())
        assert torch.equal(y, dataset.train.targets[order])
    xs = torch.cat([x for x, _ in data.eval_batches("test")])
    assert torch.equal(xs, dataset.test.inputs.float())
    with pytest.raises(HooktrainError, match="Only images can be denormalized"):
        data.denormalize(xs)


def test_augmenting_features_is_refused() -> None:
    with pytest.raises(HooktrainError, match=r"features of shape \(5,\); drop the augmentation"):
        make_device_data(dataset=features_dataset(), augment=(RandomFlip(),))
