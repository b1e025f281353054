"""Data sets of ``torchvision.datasets``, named by class, as uint8 NHWC splits.

A name is looked up among the dataset classes torchvision.datasets exports, never imported
from a path. The train and test splits come from the constructor's ``train`` flag or its
``split`` argument, whichever it has; FakeData has neither and generates its images from a
seed, so its test split is the next ``size`` images after the train split's (disjoint seeds).
Any other dataset without a train/test split is refused.

torchvision's own readers read the files (CIFAR10's unpickles them): point this only at files
you trust, or read CIFAR-10 with :func:`hooktrain.data.sources.load_cifar10`, which does not
run what a file asks for.
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.datasets
from torch import Tensor
from torch.utils.data import Dataset

from hooktrain.data.cache import default_cache_dir
from hooktrain.data.device import Splits
from hooktrain.data.in_memory import from_tensors, stack_items
from hooktrain.data.items import item_arrays
from hooktrain.errors import HooktrainError, short_reason, shown

__all__ = ["dataset_names", "load_torchvision"]


def dataset_names() -> tuple[str, ...]:
    """The dataset classes of torchvision.datasets, by name: what :func:`load_torchvision` takes."""

    def is_dataset(name: str) -> bool:
        found = getattr(torchvision.datasets, name, None)
        return (
            isinstance(found, type)
            and issubclass(found, Dataset)
            and found is not torchvision.datasets.VisionDataset
        )

    return tuple(sorted(name for name in torchvision.datasets.__all__ if is_dataset(name)))


def load_torchvision(
    name: str, data_dir: Path | None = None, download: bool = False, **options: Any
) -> Splits:
    """The train and test splits of the torchvision dataset class ``name`` as uint8 NHWC images
    (C = 1 for grayscale ones) and int64 labels, classes from its ``classes``.

    ``data_dir`` (the run's ``--data-dir``) is the root it lives in (default:
    ``default_cache_dir()/torchvision``), ``download`` fetches it there; ``options`` go to its
    constructor (not train or split: both splits are loaded). Arrays it keeps (``.data`` and
    ``.targets`` or ``.labels``) are taken as they are when its first and last items show they
    hold what the items give; else every item is read.
    """
    dataset_class = _dataset_class(name)
    arguments, chooser = _arguments(dataset_class, name, data_dir, download, options)
    splits: dict[str, Dataset[Any]] = {}
    for split in ("train", "test"):
        if chooser == "train":
            arguments["train"] = split == "train"
        elif chooser == "split":
            arguments["split"] = split
        elif split == "test":  # FakeData: the test images are those of the next seeds
            arguments["random_offset"] = arguments.get("random_offset", 0) + len(splits["train"])
        splits[split] = _instance(dataset_class, name, split, arguments)
    arrays = {split: _arrays(dataset, split) for split, dataset in splits.items()}
    return from_tensors(arrays["train"], arrays["test"], _class_names(splits["train"]))


def _arguments(
    dataset_class: type, name: str, root: Path | None, download: bool, options: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """The constructor's arguments but the split, and which parameter chooses the split."""
    parameters = inspect.signature(dataset_class).parameters
    arguments = dict(options)
    for parameter, value, default in (("root", root, None), ("download", download, False)):
        if parameter in parameters:
            arguments[parameter] = value
        elif value != default:
            raise HooktrainError(
                f"torchvision's {name} takes no {parameter} argument; pass {parameter}={default}."
            )
    if "root" in parameters:
        folder = default_cache_dir() / "torchvision" if root is None else Path(root).expanduser()
        arguments["root"] = str(folder)
    chooser = next((p for p in ("train", "split", "random_offset") if p in parameters), None)
    if chooser is None:
        raise HooktrainError(
            f"torchvision's {name} has no train/test split (its constructor takes neither train "
            "nor split); build the two splits as datasets and pass them to from_datasets."
        )
    if chooser in options and chooser != "random_offset":
        raise HooktrainError(
            f"load_torchvision loads both splits of {name} itself; drop the {chooser} option."
        )
    return arguments, chooser


def _dataset_class(name: object) -> type:
    names = dataset_names()
    if isinstance(name, str) and name in names:
        return getattr(torchvision.datasets, name)
    by_lower = {known.lower(): known for known in names}
    typed = str(name).rsplit(".", 1)[-1].lower()
    close = [by_lower[m] for m in difflib.get_close_matches(typed, by_lower, n=3, cutoff=0.6)]
    raise HooktrainError(
        f"torchvision.datasets has no dataset class named {shown(name)} (close matches: "
        f"{', '.join(close) or 'none'}); pass the name of one of its dataset classes (not an "
        "import path), such as CIFAR10 or MNIST."
    )


def _instance(
    dataset_class: type, name: str, split: str, arguments: dict[str, Any]
) -> Dataset[Any]:
    where = f" from {shown(arguments['root'])}" if "root" in arguments else ""
    try:
        return dataset_class(**arguments)
    except Exception as exc:  # missing files, a wrong option, a failed download: all "cannot"
        fetch = "pass download=True to fetch it, or " if arguments.get("download") is False else ""
        raise HooktrainError(
            f"Cannot load the {split} split of torchvision's {name}{where} "
            f"({short_reason(exc)}); {fetch}check the root and the options."
        ) from exc


def _arrays(dataset: Dataset[Any], split: str) -> tuple[Tensor, Tensor]:
    """(images, labels) of ``dataset``: its stored arrays when they match its items, else its
    items one by one."""
    stored = _stored_arrays(dataset)
    if stored is not None and all(
        _matches(dataset, stored, index, split) for index in (0, len(stored[1]) - 1)
    ):
        return stored
    return stack_items(dataset, split)


def _stored_arrays(dataset: Dataset[Any]) -> tuple[Tensor, Tensor] | None:
    """The dataset's ``.data`` as uint8 NHWC and ``.targets`` (or ``.labels``) as int64, when it
    keeps them in that form or in NHW or NCHW; None otherwise."""
    data = getattr(dataset, "data", None)
    targets = getattr(dataset, "targets", getattr(dataset, "labels", None))
    try:
        images = torch.as_tensor(data)
        labels = torch.as_tensor(np.asarray(targets))
    except (TypeError, ValueError, RuntimeError):
        return None
    count = len(dataset)  # type: ignore[arg-type]
    if images.dtype != torch.uint8 or labels.ndim != 1 or not count:
        return None
    if labels.is_floating_point() or labels.dtype == torch.bool or len(labels) != count:
        return None
    if images.ndim == 3:
        images = images[..., None]
    elif images.ndim == 4 and images.shape[3] not in (1, 3) and images.shape[1] in (1, 3):
        images = images.permute(0, 2, 3, 1)
    if images.ndim != 4 or images.shape[3] not in (1, 3) or len(images) != count:
        return None
    return images.contiguous(), labels.long()


def _matches(dataset: Dataset[Any], stored: tuple[Tensor, Tensor], index: int, split: str) -> bool:
    image, label = item_arrays(dataset[index], index, split)
    return torch.equal(image, stored[0][index]) and torch.equal(label, stored[1][index])


def _class_names(dataset: Dataset[Any]) -> tuple[str, ...] | None:
    """Its ``classes``, else as many names as its ``num_classes`` (FakeData), else None."""
    names = getattr(dataset, "classes", None)
    count = getattr(dataset, "num_classes", None)
    if names is None and isinstance(count, int):
        names = [str(label) for label in range(count)]
    return None if names is None else tuple(names)
