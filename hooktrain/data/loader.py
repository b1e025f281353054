"""Data too large for the device: a map-style Dataset read by DataLoader workers, batch by
batch, and served as :class:`~hooktrain.data.device.DeviceData` serves tensors.

The workers only read, decode and stack items (uint8 HWC images or float features); the batch
goes to the device and through the same augmentation chain as DeviceData's, with that batch's
rows of the epoch plan's draws. The plan is DeviceData's too (order, then each piece's draws,
from the run's generator), so both serve the same batches of the same data, bit for bit, and a
run resumed inside an epoch continues at its batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import attrs
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from hooktrain.data.augment import Augmentation
from hooktrain.data.device import (
    DeviceData,
    EpochPlan,
    Split,
    chains,
    check_batch_sizes,
    held_out,
    training_rows,
)
from hooktrain.data.in_memory import DatasetSplits
from hooktrain.data.items import check_item_like, item_arrays
from hooktrain.errors import HooktrainError

__all__ = ["DatasetSplit", "LoaderData"]

PREFETCH = 2  # batches each worker reads ahead
Item = tuple[Tensor, Tensor]


@attrs.frozen(eq=False)
class DatasetSplit:
    """One split as LoaderData serves it: its items (``rows``, indices into the reader's items)
    and their ``targets``, on the CPU; the inputs stay in the Dataset."""

    rows: Tensor
    targets: Tensor
    is_image: bool

    def __len__(self) -> int:
        return len(self.rows)


class _Items(Dataset[Item | HooktrainError]):
    """The train items, then the test items, as (input, target) tensors, each checked against
    its split's item 0. A refused item comes back as its HooktrainError (a worker's exception
    would reach the training process as a traceback, not as the sentence)."""

    def __init__(self, splits: DatasetSplits) -> None:
        self.splits = splits
        self.n_train = len(splits.train)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n_train + len(self.splits.test)  # type: ignore[arg-type]

    def __getitem__(self, row: int) -> Item | HooktrainError:
        split, index = ("train", row) if row < self.n_train else ("test", row - self.n_train)
        dataset = self.splits.train if split == "train" else self.splits.test
        try:
            item = item_arrays(dataset[index], index, split)
            check_item_like(item, self.splits.first_items[split], index, split)
            if item[0].is_floating_point() and not torch.isfinite(item[0]).all():
                raise HooktrainError(
                    f"Item {index} of the {split} dataset holds NaN or infinite features; drop "
                    "or fill them."
                )
        except HooktrainError as error:
            return error
        return item


def _collate(items: list[Item | HooktrainError]) -> Item | HooktrainError:
    """A batch of items stacked (in shared memory, in a worker), or the first refusal."""
    for item in items:
        if isinstance(item, HooktrainError):
            return item
    inputs, targets = default_collate(items)
    return inputs, targets


class _Batches:
    """The batch sampler: each batch's item indices, from batch ``start`` of ``batches`` on."""

    def __init__(self) -> None:
        self.batches: Sequence[Tensor] = ()
        self.start = 0

    def __iter__(self) -> Iterator[list[int]]:
        for rows in self.batches[self.start :]:
            yield rows.tolist()

    def __len__(self) -> int:
        return len(self.batches) - self.start


class _Reader:
    """One DataLoader over the items, its workers kept for the whole run, asked for batch
    ``position`` of a sequence of batches: it continues where that is the next batch it reads,
    and otherwise starts reading the sequence at that position."""

    def __init__(self, items: _Items, workers: int, device: torch.device) -> None:
        self._device = device
        self._batches = _Batches()
        self._loader = DataLoader(
            items,
            batch_sampler=self._batches,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=PREFETCH if workers else None,
        )
        self._iterator: Iterator[Item | HooktrainError] = iter(())
        self._next: tuple[object, int] | None = None

    def read(self, key: object, batches: Sequence[Tensor], position: int) -> Item:
        """Batch ``position`` of ``batches`` (a sequence that ``key`` names), on the device."""
        if self._next != (key, position):
            self._batches.batches, self._batches.start = batches, position
            self._iterator = iter(self._loader)
        self._next = None
        read = next(self._iterator)
        if isinstance(read, HooktrainError):
            raise read
        self._next = (key, position + 1)
        inputs, targets = read
        return (
            inputs.to(self._device, non_blocking=True),
            targets.to(self._device, non_blocking=True),
        )


class LoaderData(DeviceData):
    """:class:`DeviceData`'s batches of a :class:`DatasetSplits`, read by DataLoader workers.

    The same arguments, holdout (``val_split``, ``train_limit``: the same images), epoch plans,
    augmentation and sharding as DeviceData; ``splits.workers`` worker processes read the items.
    The loop's order of calls (a plan per lane, then batch ``index`` of each lane's plan for
    index = first, first + 1, ...) is read ahead; any other call restarts the reading there.
    """

    train: DatasetSplit  # type: ignore[assignment]
    val: DatasetSplit  # type: ignore[assignment]
    test: DatasetSplit  # type: ignore[assignment]

    def __init__(
        self,
        splits: DatasetSplits,
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
        items = _Items(splits)
        held = held_out(items.n_train, val_split, batch_size)
        rows = training_rows(items.n_train, held, batch_size, train_limit)
        rows = torch.arange(items.n_train) if rows is None else rows
        first_input, first_target = splits.first_items["train"]
        self._chain, self._eval_chain = chains(
            Split(first_input[None], first_target[None]), augment
        )

        self.device = device = torch.device(device)
        self.batch_size = batch_size
        self.shard, self.shards = shard, shards
        self.eval_batch_size = eval_batch_size
        self.channels_last = channels_last
        self.augment = self._chain.pieces
        self._classes = splits.classes
        is_image = first_input.dtype == torch.uint8
        targets, test_targets = splits.targets["train"], splits.targets["test"]
        self.train = DatasetSplit(rows, targets[rows], is_image)
        self.val = DatasetSplit(held, targets[held], is_image)
        self.test = DatasetSplit(
            torch.arange(len(test_targets)) + items.n_train, test_targets, is_image
        )
        self.n_train, self.n_val, self.n_test = len(self.train), len(self.val), len(self.test)
        self.steps_per_epoch = self.n_train // batch_size
        self._reader = _Reader(items, splits.workers, device)
        self._drawn: list[EpochPlan] = []  # plans not yet read from
        self._group: tuple[EpochPlan, ...] = ()  # the plans whose batches are read in turn
        self._group_batches: list[Tensor] = []

    def epoch_plan(self, generator: torch.Generator, epoch: int = 0, seed: int = 0) -> EpochPlan:
        """DeviceData's plan: the same draws from `generator`, shipped to the device."""
        plan = super().epoch_plan(generator, epoch, seed)
        self._drawn.append(plan)
        return plan

    def train_batch(self, plan: EpochPlan, index: int) -> tuple[Tensor, Tensor]:
        """The `index`-th augmented training batch of `plan`: DeviceData's batch, read by the
        workers (the batches of the plans drawn together read in turn, as lanes train)."""
        if not 0 <= index < self.steps_per_epoch:
            raise IndexError(f"batch {index} is outside 0..{self.steps_per_epoch - 1}")
        if plan not in self._group:
            self._group = tuple(self._drawn) if plan in self._drawn else (plan,)
            self._group_batches = self._batches_of(self._group)
            self._drawn = []
        position = index * len(self._group) + self._group.index(plan)
        x, y = self._reader.read(self._group, self._group_batches, position)
        rows = self._shard_rows(index)
        draws = [{name: t[rows] for name, t in d.items()} for d in plan.draws]
        return self._model_input(self._chain.apply(x, None, draws)), y

    def eval_batches(self, split: str, whole: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """DeviceData's evaluation batches of `split` ("test", "val" or "train"), read by the
        workers."""
        rows = self.split(split).rows
        first, step = self._eval_slices(whole)
        starts = range(first, len(rows), step)
        batches = [rows[start : start + self.eval_batch_size] for start in starts]
        no_draws = ({},) * len(self._eval_chain.pieces)
        for position in range(len(batches)):
            x, y = self._reader.read(split, batches, position)
            yield self._model_input(self._eval_chain.apply(x, None, no_draws)), y

    def _batches_of(self, plans: tuple[EpochPlan, ...]) -> list[Tensor]:
        """This process's item indices of every batch of `plans`, batch 0 of each plan in turn,
        then batch 1, ...: the order the loop asks for them in."""
        orders = [self.train.rows[plan.order.cpu()] for plan in plans]
        return [
            order[self._shard_rows(index)]
            for index in range(self.steps_per_epoch)
            for order in orders
        ]

    def _shard_rows(self, index: int) -> slice:
        """Where this process's part of batch `index` lies in an epoch's order."""
        size = self.batch_size // self.shards
        start = index * self.batch_size + self.shard * size
        return slice(start, start + size)
