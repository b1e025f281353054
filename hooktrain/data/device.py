"""CIFAR-10 in memory: the dataset records, batched on-device augmentation and DeviceData.

Reading CIFAR-10 from disk is :mod:`hooktrain.data.sources`.
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs
import torch
from torch import Tensor

from hooktrain.errors import HooktrainError

__all__ = [
    "CIFAR10_CLASSES",
    "IMAGE_SIZE",
    "DeviceData",
    "EpochPlan",
    "ImageDataset",
    "ImageSplit",
    "crop_flip",
    "normalize",
]

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

    def __attrs_post_init__(self) -> None:
        # A label past the classes would surface as an IndexError deep inside training.
        for split in (self.train, self.test):
            labels = split.labels
            if len(labels) and not 0 <= labels.min() <= labels.max() < len(self.classes):
                raise ValueError(f"labels must lie in 0..{len(self.classes) - 1}")


@attrs.frozen(eq=False)
class EpochPlan:
    """One epoch's random draws, on the training device: sample order and per-slot augmentation."""

    order: Tensor
    top: Tensor
    left: Tensor
    flip: Tensor


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
