"""Data sets already in memory: tensors, or a map-style Dataset of (input, target) items.

A Dataset is read into tensors (:func:`from_datasets`) or, where it should stay where it is,
kept as :class:`DatasetSplits`, which DataLoader workers read batch by batch
(:class:`hooktrain.data.loader.LoaderData`).

Inputs are images, uint8 (N, H, W, C) with C = 1 or 3, or features, floating point (N, F).
The targets' dtype decides the task: integer targets are class labels (classification, kept as
int64), floating-point ones are regression values, (N,) or (N, K), kept in their dtype.
``classes`` names the labels (label i is the i-th name); without it the classes are "0", "1",
... up to the largest label. A classifier needs at least two classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from hooktrain.data.device import Split, Splits
from hooktrain.data.items import (
    INTEGER_DTYPES,
    check_item_like,
    described,
    dtype_name,
    item_arrays,
    words,
)
from hooktrain.errors import HooktrainError, shown

__all__ = ["DatasetSplits", "from_datasets", "from_tensors", "stack_items"]

_MIN_CLASSES = 2


def from_tensors(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    classes: Sequence[str] | None = None,
) -> Splits:
    """Splits of (inputs, targets) tensors, checked: images uint8 (N, H, W, C), features float
    (N, F); integer targets (N,) are class labels named by ``classes``, float ones (N,) or
    (N, K) regression values (then ``classes`` must be None). Tensors move to the CPU."""
    pairs = {"train": _pair(train, "train"), "test": _pair(test, "test")}
    for split, (inputs, targets) in pairs.items():
        _check_inputs(split, inputs)
        _check_targets(split, inputs, targets)
    _check_alike(pairs)
    (train_inputs, train_targets), (test_inputs, test_targets) = pairs.values()
    if not train_targets.is_floating_point():
        train_targets, test_targets = train_targets.long(), test_targets.long()
    names = _names(classes, {"train": train_targets, "test": test_targets})
    return Splits(Split(train_inputs, train_targets), Split(test_inputs, test_targets), names)


def from_datasets(
    train: Dataset[Any],
    test: Dataset[Any],
    classes: Sequence[str] | None = None,
    *,
    materialise: bool = True,
    workers: int = 4,
) -> Splits | DatasetSplits:
    """Splits of two map-style Datasets whose items are (input, target): the input a PIL image
    (mode L or 1 gives one channel, any other RGB), a uint8 tensor (C, H, W) or (H, W), a uint8
    array (H, W, C) or (H, W), or 1-D float features; the target an int label, a float or a 1-D
    float tensor. Every item is read once; then as :func:`from_tensors`.

    ``materialise=False`` keeps the Datasets where they are, for data too large for the device:
    :class:`DatasetSplits`, read batch by batch by ``workers`` DataLoader worker processes.
    """
    if not materialise:
        return DatasetSplits(train, test, classes, workers)
    return from_tensors(stack_items(train, "train"), stack_items(test, "test"), classes)


def stack_items(dataset: Dataset[Any], split: str) -> tuple[Tensor, Tensor]:
    """(inputs, targets) of every item of ``dataset``, stacked; ``split`` names it in errors."""
    count = _map_style_length(dataset, split)
    first = item_arrays(dataset[0], 0, split)
    inputs = torch.empty((count, *first[0].shape), dtype=first[0].dtype)
    targets = torch.empty((count, *first[1].shape), dtype=first[1].dtype)
    inputs[0], targets[0] = first
    for index in range(1, count):
        item = item_arrays(dataset[index], index, split)
        check_item_like(item, first, index, split)
        inputs[index], targets[index] = item
    return inputs, targets


# --- Datasets kept where they are --------------------------------------------------------------


@attrs.frozen(eq=False)
class DatasetSplits:
    """A train and a test map-style Dataset kept where they are (on disk, say) and read batch by
    batch by ``workers`` DataLoader worker processes (:class:`hooktrain.data.loader.LoaderData`),
    not stacked in memory: a data source's answer for data too large for the device.

    Items are as :func:`from_datasets` takes them, each of item 0's kind and size (checked as it
    is read). ``classes`` names integer labels, None naming them "0", "1", ... up to the largest
    (after construction it holds the names); it stays None for regression (float targets). The
    targets come from a Dataset's ``targets`` attribute where it lists one per item (as
    torchvision's ImageFolder, CIFAR10 and MNIST do), else from reading every item once.
    ``workers`` 0 reads the items in the training process.
    """

    train: Dataset[Any]
    test: Dataset[Any]
    classes: Sequence[str] | None = None
    workers: int = 4
    first_items: dict[str, tuple[Tensor, Tensor]] = attrs.field(init=False, repr=False)
    """Item 0 of each split ("train", "test") as :func:`item_arrays` gives it."""
    targets: dict[str, Tensor] = attrs.field(init=False, repr=False)
    """Each split's targets, one per item: int64 labels or floating-point values."""

    def __attrs_post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise HooktrainError(
                f"workers is a number of DataLoader worker processes, 0 or more, got "
                f"{self.workers!r}; pass e.g. workers=4 (0 reads items in the training process)."
            )
        first_items, targets = {}, {}
        for split, dataset in {"train": self.train, "test": self.test}.items():
            count = _map_style_length(dataset, split)
            first_input, first_target = first_items[split] = item_arrays(dataset[0], 0, split)
            _check_inputs(split, first_input[None])
            targets[split] = _dataset_targets(dataset, split, count, first_target)
        _check_alike({split: (first_items[split][0][None], targets[split]) for split in targets})
        object.__setattr__(self, "first_items", first_items)
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "classes", _names(self.classes, targets))


def _map_style_length(dataset: Dataset[Any], split: str) -> int:
    """The number of items of a map-style, non-empty ``dataset``; a sentence for any other."""
    if isinstance(dataset, IterableDataset) or not (
        hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
    ):
        raise HooktrainError(
            f"The {split} dataset is a {type(dataset).__name__}, not a map-style Dataset (with "
            "__len__ and __getitem__); wrap its items in one, or stack them and use from_tensors."
        )
    count = len(dataset)  # type: ignore[arg-type]
    if count == 0:
        raise HooktrainError(f"The {split} dataset has no items; give it at least one.")
    return count


def _dataset_targets(dataset: Dataset[Any], split: str, count: int, first: Tensor) -> Tensor:
    """Every item's target: the Dataset's ``targets`` where it lists one per item (checked
    against item 0's target, `first`), else each item's, read once."""
    listed = getattr(dataset, "targets", None)
    try:
        listed = None if listed is None else torch.as_tensor(listed)
    except (TypeError, ValueError, RuntimeError):
        listed = None
    if listed is None or listed.ndim == 0 or len(listed) != count:
        targets = torch.stack([item_arrays(dataset[i], i, split)[1] for i in range(count)])
    else:
        targets = listed.long() if listed.dtype in INTEGER_DTYPES else listed
        if (targets.shape[1:], targets.is_floating_point()) != (
            first.shape,
            first.is_floating_point(),
        ):
            raise HooktrainError(
                f"The {split} dataset's targets attribute holds {words(targets[0])} per item "
                f"but item 0's target is {words(first)}; make the two agree."
            )
    _check_targets(split, targets, targets)
    return targets


# --- items ---------------------------------------------------------------------------------


# --- whole splits ----------------------------------------------------------------------------


def _pair(value: object, split: str) -> tuple[Tensor, Tensor]:
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise HooktrainError(
            f"The {split} split is {described(value)}, not an (inputs, targets) pair of tensors; "
            "pass one."
        )
    for what, tensor in zip(("inputs", "targets"), value, strict=True):
        if not isinstance(tensor, Tensor):
            raise HooktrainError(
                f"The {split} {what} are {described(tensor)}, not a torch.Tensor; convert them "
                "with torch.as_tensor."
            )
    return value[0].detach().cpu(), value[1].detach().cpu()


def _check_inputs(split: str, inputs: Tensor) -> None:
    if inputs.dtype == torch.uint8:
        if inputs.ndim != 4 or inputs.shape[3] not in (1, 3) or 0 in inputs.shape[1:3]:
            raise HooktrainError(
                f"The {split} inputs are uint8 of shape {tuple(inputs.shape)}, but images must "
                "be (N, height, width, 1 or 3); permute CHW images with .permute(0, 2, 3, 1)."
            )
    elif inputs.is_floating_point():
        if inputs.ndim != 2 or inputs.shape[1] == 0:
            raise HooktrainError(
                f"The {split} inputs are {dtype_name(inputs)} of shape {tuple(inputs.shape)}, but "
                "features must be (N, F) and images uint8 (N, height, width, channels); pass one."
            )
        _check_finite(split, "inputs", inputs)
    else:
        raise HooktrainError(
            f"The {split} inputs are {dtype_name(inputs)}; pass uint8 images (N, height, width, "
            "channels) or floating-point features (N, F)."
        )
    if len(inputs) == 0:
        raise HooktrainError(f"The {split} split has no samples; give it at least one.")


def _check_targets(split: str, inputs: Tensor, targets: Tensor) -> None:
    if targets.ndim == 0 or targets.shape[0] != inputs.shape[0]:
        raise HooktrainError(
            f"The {split} split has {inputs.shape[0]} inputs but targets of shape "
            f"{tuple(targets.shape)}; pass one target per input."
        )
    if targets.is_floating_point():
        if targets.ndim > 2:
            raise HooktrainError(
                f"The {split} targets are of shape {tuple(targets.shape)}; regression targets "
                "must be (N,) or (N, K)."
            )
        _check_finite(split, "targets", targets)
    elif targets.dtype not in INTEGER_DTYPES or targets.ndim != 1:
        raise HooktrainError(
            f"The {split} targets are {dtype_name(targets)} of shape {tuple(targets.shape)}; pass "
            "integer class labels (N,) or floating-point regression values (N,) or (N, K)."
        )


def _check_finite(split: str, what: str, values: Tensor) -> None:
    bad = ~torch.isfinite(values.reshape(len(values), -1)).all(dim=1)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise HooktrainError(
            f"The {split} {what} hold NaN or infinite values (first in row {row}); drop or fill "
            "those rows."
        )


def _check_alike(pairs: dict[str, tuple[Tensor, Tensor]]) -> None:
    (train_x, train_y), (test_x, test_y) = pairs["train"], pairs["test"]
    if (train_x.dtype, train_x.shape[1:]) != (test_x.dtype, test_x.shape[1:]):
        raise HooktrainError(
            f"The train inputs are {words(train_x[0])} per sample but the test inputs are "
            f"{words(test_x[0])}; give both splits inputs of one kind and size."
        )
    kinds = [(y.is_floating_point(), y.shape[1:]) for y in (train_y, test_y)]
    if kinds[0] != kinds[1]:
        raise HooktrainError(
            f"The train targets are {words(train_y[0])} per sample but the test targets are "
            f"{words(test_y[0])}; give both splits targets of one kind."
        )


def _names(classes: Sequence[str] | None, targets: dict[str, Tensor]) -> tuple[str, ...] | None:
    """The class names of integer labels; None for regression values (where classes is None)."""
    if not targets["train"].is_floating_point():
        return _class_names(classes, targets)
    if classes is not None:
        raise HooktrainError(
            f"classes name class labels, but the targets are {dtype_name(targets['train'])} "
            "regression values; pass integer labels, or classes=None for regression."
        )
    return None


def _class_names(classes: Sequence[str] | None, labels: dict[str, Tensor]) -> tuple[str, ...]:
    for split, split_labels in labels.items():
        if split_labels.min() < 0:
            raise HooktrainError(
                f"The {split} targets hold label {int(split_labels.min())}; class labels count "
                "from 0."
            )
    highest = max(int(split_labels.max()) for split_labels in labels.values())
    if classes is None:
        names = tuple(str(label) for label in range(highest + 1))
    elif isinstance(classes, str) or not isinstance(classes, Sequence):
        raise HooktrainError(
            f"classes must be a list of class names, got {described(classes)}; pass e.g. "
            "['cat', 'dog']."
        )
    else:
        names = tuple(classes)
        if not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
            raise HooktrainError(
                f"classes must be distinct names (str), got {shown(names)}; name each class once."
            )
        for split, split_labels in labels.items():
            if int(split_labels.max()) >= len(names):
                raise HooktrainError(
                    f"The {split} targets hold label {int(split_labels.max())}, but only "
                    f"{len(names)} classes are named (labels 0 to {len(names) - 1}); name every "
                    "class or fix the labels."
                )
    if len(names) < _MIN_CLASSES:
        raise HooktrainError(
            f"A classifier needs at least {_MIN_CLASSES} classes, but there is {len(names)} "
            f"({shown(', '.join(names))}); give labels of at least two classes."
        )
    return names
