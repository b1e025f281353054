"""A data set in memory: the records, and DeviceData, which serves it as batches on a device.

Reading data from disk is :mod:`hooktrain.data.sources`; augmentation pieces are
:mod:`hooktrain.data.augment`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import attrs
import torch
from torch import Tensor

from hooktrain.data.augment import Augmentation, Draws, Normalize
from hooktrain.data.chain import Chain
from hooktrain.data.epochwise import Epoch
from hooktrain.errors import HooktrainError

__all__ = [
    "CIFAR10_CLASSES",
    "IMAGE_SIZE",
    "DeviceData",
    "EpochPlan",
    "Split",
    "Splits",
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
EVAL_SPLITS = ("test", "val", "train")
# Fixed seeds, not the run's: which images are held out or used is part of the experiment, not
# its noise, and stays the same whatever the run's seed.
VAL_SEED = 1
SUBSET_SEED = 0
ALIGNMENT = 16  # bytes: every dtype's tensor view of the shipped epoch buffer is aligned


@attrs.frozen(eq=False)
class Split:
    """One split: ``inputs`` (N, ...) and ``targets`` (N,) or (N, K).

    Images are uint8 (N, H, W, C) in NHWC order with C = 1 (grayscale) or 3 (RGB); other inputs
    (tabular features) are floating point. Targets are int64 class labels for classification,
    floating point for regression.
    """

    inputs: Tensor
    targets: Tensor

    def __attrs_post_init__(self) -> None:
        inputs, targets = self.inputs, self.targets
        if inputs.ndim < 2:
            raise ValueError(f"inputs must be (N, ...), got shape {tuple(inputs.shape)}")
        if inputs.dtype == torch.uint8 and (inputs.ndim != 4 or inputs.shape[3] not in (1, 3)):
            raise ValueError(
                f"uint8 images must be (N, H, W, 1 or 3), got shape {tuple(inputs.shape)}"
            )
        if targets.ndim not in (1, 2) or targets.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"targets must be ({inputs.shape[0]},) or ({inputs.shape[0]}, K), got "
                f"{tuple(targets.shape)}"
            )

    def __len__(self) -> int:
        return self.targets.shape[0]

    @property
    def is_image(self) -> bool:
        """Whether the inputs are uint8 NHWC images (augmented before they are normalized)."""
        return self.inputs.dtype == torch.uint8


@attrs.frozen(eq=False)
class Splits:
    """A train and a test split, plus the class names (indexed by label), None for regression."""

    train: Split
    test: Split
    classes: tuple[str, ...] | None

    def __attrs_post_init__(self) -> None:
        if self.train.inputs.shape[1:] != self.test.inputs.shape[1:]:
            raise ValueError(
                f"train inputs are {tuple(self.train.inputs.shape[1:])} but test inputs are "
                f"{tuple(self.test.inputs.shape[1:])}"
            )
        if self.classes is None:
            return
        # A label past the classes would surface as an IndexError deep inside training.
        for split in (self.train, self.test):
            labels = split.targets
            if labels.dtype != torch.int64 or labels.ndim != 1:
                raise ValueError(f"class labels must be int64 (N,), got {labels.dtype}")
            if len(labels) and not 0 <= labels.min() <= labels.max() < len(self.classes):
                raise ValueError(f"labels must lie in 0..{len(self.classes) - 1}")


@attrs.frozen(eq=False)
class EpochPlan:
    """One epoch's random draws, on the training device: the sample order, then each piece's
    draws (one dict per piece of the training chain, one row per position in the order)."""

    order: Tensor
    draws: tuple[Draws, ...]


def _ship(tensors: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """CPU `tensors` on `device` through one host-to-device copy of their bytes, packed."""
    chunks, starts, offset = [], [], 0
    for tensor in tensors:
        raw = tensor.contiguous().reshape(-1).view(torch.uint8)
        gap = -raw.numel() % ALIGNMENT
        chunks += [raw, raw.new_zeros(gap)]
        starts.append(offset)
        offset += raw.numel() + gap
    packed = torch.cat(chunks)
    if device.type == "cuda":
        packed = packed.pin_memory()
    packed = packed.to(device, non_blocking=True)
    return [
        packed[start : start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        for t, start in zip(tensors, starts, strict=True)
    ]


# ---------------------------------------------------------------------------------------------
# Choosing the images


def check_batch_sizes(batch_size: int, eval_batch_size: int, shards: int) -> None:
    """Refuse in a sentence batch sizes below 1, or a batch that does not split over shards."""
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


def held_out(available: int, val_split: float, batch_size: int) -> Tensor:
    """Indices of the training images held out for validation, ascending; a fixed choice."""
    if not 0 <= val_split < 1:
        raise HooktrainError(
            f"The validation split is a fraction of the training images from 0 up to (not "
            f"including) 1, got {val_split}; pass e.g. 0.1 to hold out a tenth."
        )
    n_val = round(val_split * available)
    if val_split and not n_val:
        raise HooktrainError(
            f"A validation split of {val_split} holds out none of the {available} training "
            "images; pass a larger val_split, or 0 for no validation split."
        )
    if val_split and available - n_val < batch_size:
        raise HooktrainError(
            f"A validation split of {val_split} leaves {available - n_val} of the {available} "
            f"training images, fewer than one batch of {batch_size}; pass a smaller val_split "
            "or batch size."
        )
    if not n_val:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.randperm(available, generator=torch.Generator().manual_seed(VAL_SEED))
    return order[:n_val].sort().values


def training_rows(
    available: int, held: Tensor, batch_size: int, train_limit: int | None
) -> Tensor | None:
    """Indices of the training images trained on (None for all of them, in order)."""
    left = available - len(held)
    where = f" left after the {len(held)} held out for validation" if len(held) else ""
    if train_limit is not None and not batch_size <= train_limit <= left:
        raise HooktrainError(
            f"Train limit {train_limit} must be between the batch size {batch_size} and the "
            f"{left} training images{where}; pass a train limit in that range."
        )
    if train_limit is None and left < batch_size:
        raise HooktrainError(
            f"Batch size {batch_size} is larger than the {left} training images; "
            "pass a smaller batch size."
        )
    rest = None
    if len(held):
        kept = torch.ones(available, dtype=torch.bool)
        kept[held] = False
        rest = kept.nonzero().squeeze(1)
    if train_limit is None:
        return rest
    subset = torch.randperm(left, generator=torch.Generator().manual_seed(SUBSET_SEED))
    subset = subset[:train_limit]
    return subset if rest is None else rest[subset]


def chains(split: Split, augment: Sequence[Augmentation]) -> tuple[Chain, Chain]:
    """The training chain and the evaluation chain (its deterministic pieces) for `split`.

    Images get a Normalize to [0, 1] (mean 0, std 1) where the chain does not end with one.
    """
    shape = tuple(split.inputs.shape[1:])
    if not split.is_image:
        if augment:
            raise HooktrainError(
                f"Augmentation works on images, but these inputs are {split.inputs.dtype} "
                f"features of shape {shape}; drop the augmentation pieces for this data."
            )
        chain = Chain((), shape)
        return chain, chain
    pieces = tuple(augment)
    if not pieces or not isinstance(pieces[-1], Normalize):
        channels = shape[2]
        pieces += (Normalize((0.0,) * channels, (1.0,) * channels),)
    chain = Chain(pieces, shape)
    return chain, chain.for_evaluation()


def _on(split: Split, rows: Tensor | None, device: torch.device) -> Split:
    inputs, targets = split.inputs, split.targets
    if rows is not None:
        inputs, targets = inputs[rows], targets[rows]
    return Split(inputs.contiguous().to(device), targets.to(device))


# ---------------------------------------------------------------------------------------------
# Device-resident data


class DeviceData:
    """A whole data set on one device, served as augmented training batches and plain
    evaluation batches.

    Images (uint8 NHWC) go through the `augment` chain, which ends with a Normalize (one to
    [0, 1] is added where it does not); evaluation applies its deterministic pieces only.
    Other inputs (floating point features) are served as float32, unaugmented. `val_split`
    holds out that fraction of the training split as a validation split.
    """

    device: torch.device
    batch_size: int
    shard: int
    shards: int
    eval_batch_size: int
    channels_last: bool
    augment: tuple[Augmentation, ...]
    train: Split
    val: Split
    test: Split
    n_train: int
    n_val: int
    n_test: int
    steps_per_epoch: int

    def __init__(
        self,
        splits: Splits,
        device: torch.device,
        batch_size: int,
        augment: Sequence[Augmentation] = (),
        *,
        channels_last: bool = False,
        train_limit: int | None = None,
        val_split: float = 0.0,
        eval_batch_size: int = 1000,
        shard: int = 0,
        shards: int = 1,
    ) -> None:
        check_batch_sizes(batch_size, eval_batch_size, shards)
        available = len(splits.train)
        held = held_out(available, val_split, batch_size)
        rows = training_rows(available, held, batch_size, train_limit)
        self._chain, self._eval_chain = chains(splits.train, augment)

        self.device = device = torch.device(device)
        self.batch_size = batch_size
        self.shard, self.shards = shard, shards
        self.eval_batch_size = eval_batch_size
        self.channels_last = channels_last
        self.augment = self._chain.pieces
        self._classes = splits.classes
        self.train = _on(splits.train, rows, device)
        self.val = _on(splits.train, held, device)
        self.test = _on(splits.test, None, device)
        self.n_train, self.n_val, self.n_test = len(self.train), len(self.val), len(self.test)
        # Dropping the partial batch keeps one batch shape, so a compiled step never recompiles.
        self.steps_per_epoch = self.n_train // batch_size

    @property
    def classes(self) -> tuple[str, ...] | None:
        """The class names, indexed by label; None for regression."""
        return self._classes

    @property
    def num_classes(self) -> int | None:
        """Number of classes; None for regression."""
        return None if self.classes is None else len(self.classes)

    @property
    def num_outputs(self) -> int:
        """The size of the model's output: one per class, or per regression target."""
        if self.classes is not None:
            return len(self.classes)
        targets = self.train.targets
        return targets.shape[1] if targets.ndim == 2 else 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One model input's shape: (C, H, W) for images after the chain, else (F,)."""
        shape = self._chain.output_shape
        return (shape[2], shape[0], shape[1]) if self.train.is_image else shape

    def epoch_plan(self, generator: torch.Generator, epoch: int = 0, seed: int = 0) -> EpochPlan:
        """Draw one epoch's order, then each piece's draws, from a CPU `generator` (pieces
        that alternate over epochs also see the `epoch` and the run's `seed`); ship them to the
        device in one copy."""
        n = self.n_train
        order = torch.randperm(n, generator=generator)
        draws = self._chain.draw(generator, n, Epoch(epoch, seed, order))
        shipped = iter(_ship([order, *(t for d in draws for t in d.values())], self.device))
        order = next(shipped)
        return EpochPlan(order, tuple({name: next(shipped) for name in d} for d in draws))

    def train_batch(self, plan: EpochPlan, index: int) -> tuple[Tensor, Tensor]:
        """The `index`-th augmented training batch: (model inputs, targets), on the device.

        A data-parallel process gets its shard of it: the `shard`-th of `shards` equal slices.
        """
        if not 0 <= index < self.steps_per_epoch:
            raise IndexError(f"batch {index} is outside 0..{self.steps_per_epoch - 1}")
        size = self.batch_size // self.shards
        start = index * self.batch_size + self.shard * size
        batch = slice(start, start + size)
        order = plan.order[batch]
        draws = [{name: t[batch] for name, t in d.items()} for d in plan.draws]
        x = self._chain.apply(self.train.inputs, order, draws)
        return self._model_input(x), self.train.targets[order]

    def eval_batches(self, split: str, whole: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """The whole `split` ("test", "val" or "train") in order, in batches of
        `eval_batch_size`, with only the deterministic pieces applied (no augmentation).

        A data-parallel process gets every `shards`-th batch from its `shard`-th on; the
        processes' sums together cover the split. With `whole`, every process gets it all.
        """
        data = self.split(split)
        no_draws = ({},) * len(self._eval_chain.pieces)
        first, step = self._eval_slices(whole)
        for start in range(first, len(data), step):
            end = start + self.eval_batch_size
            x = self._eval_chain.apply(data.inputs[start:end], None, no_draws)
            yield self._model_input(x), data.targets[start:end]

    def _eval_slices(self, whole: bool) -> tuple[int, int]:
        """Where this process's first evaluation batch starts, and the stride to its next."""
        if whole:
            return 0, self.eval_batch_size
        return self.shard * self.eval_batch_size, self.eval_batch_size * self.shards

    def split(self, name: str) -> Split:
        """The split called ``name``: "train", "val" or "test"."""
        if name not in EVAL_SPLITS:
            raise HooktrainError(
                f"Unknown split {name!r}; use {', '.join(repr(n) for n in EVAL_SPLITS)}."
            )
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def denormalize(self, x: Tensor) -> Tensor:
        """Undo the chain's Normalize on NCHW (or CHW) input, clamped to [0, 1] for grids."""
        if not self.train.is_image:
            raise HooktrainError("Only images can be denormalized; these inputs are features.")
        normalize = self.augment[-1]
        assert isinstance(normalize, Normalize)
        return normalize.inverse(x)

    def _model_input(self, x: Tensor) -> Tensor:
        if not self.train.is_image:
            return x.to(torch.float32)
        # Normalize gives the NCHW view of an NHWC buffer: already channels_last.
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=memory_format)
