"""One item of a user's map-style Dataset, read as tensors: an (input, target) pair whose
input is a PIL image, a uint8 tensor (C, H, W) or (H, W), a uint8 array (H, W, C) or floating
point features, and whose target is a class label or regression values. Every way an item can
be wrong ends in a sentence naming its index and split."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from hooktrain.errors import HooktrainError

__all__ = [
    "INTEGER_DTYPES",
    "check_item_like",
    "described",
    "dtype_name",
    "item_arrays",
    "words",
]

INTEGER_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})
_ITEM_KINDS = (
    "a PIL image, a uint8 tensor (C, H, W), a uint8 array (H, W, C) or a 1-D floating-point "
    "tensor or array of features"
)


def check_item_like(
    item: tuple[Tensor, Tensor], first: tuple[Tensor, Tensor], index: int, split: str
) -> None:
    """Refuse in a sentence an (input, target) item of another kind or size than item 0's."""
    for what, got, like in zip(("input", "target"), item, first, strict=True):
        if (got.shape, got.is_floating_point()) != (like.shape, like.is_floating_point()):
            raise HooktrainError(
                f"Item {index} of the {split} dataset has {words(got)} as its {what} but "
                f"item 0 has {words(like)}; give every item one kind and size (resize "
                "images in the dataset's transform)."
            )


def item_arrays(item: object, index: int, split: str) -> tuple[Tensor, Tensor]:
    """One (input, target) item as tensors: an HWC uint8 image or float features, and an int64
    label (0-d) or float target (0-d or (K,)). ``index`` and ``split`` name it in errors."""
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise HooktrainError(
            f"Item {index} of the {split} dataset is {described(item)}, not an (input, target) "
            "pair; make its __getitem__ return one."
        )
    return _input(item[0], index, split), _target(item[1], index, split)


def _input(value: object, index: int, split: str) -> Tensor:
    if isinstance(value, Image.Image):
        value = np.array(value.convert("L" if value.mode in ("L", "1") else "RGB"))
    if isinstance(value, np.ndarray | Tensor):
        x = torch.as_tensor(value)
        if x.dtype == torch.uint8 and x.ndim == 2:
            return x[..., None]
        if x.dtype == torch.uint8 and x.ndim == 3:
            # Arrays (and PIL images) are HWC, tensors CHW as torchvision makes them.
            hwc = x if isinstance(value, np.ndarray) else x.permute(1, 2, 0)
            if hwc.shape[2] in (1, 3):
                return hwc
        if x.is_floating_point() and x.ndim == 1 and len(x):
            return x
        if x.is_floating_point() and x.ndim == 3:
            raise HooktrainError(
                f"Item {index} of the {split} dataset has {described(value)} as its input, but "
                "images must be uint8; drop ToTensor and Normalize from its transform "
                "(normalizing happens on the device)."
            )
    raise HooktrainError(
        f"Item {index} of the {split} dataset has {described(value)} as its input; use "
        f"{_ITEM_KINDS}."
    )


def _target(value: object, index: int, split: str) -> Tensor:
    if not isinstance(value, bool | np.bool_ | str | bytes):
        try:
            y = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            y = None
        if y is not None and y.dtype in INTEGER_DTYPES and y.ndim == 0:
            return y.long()
        if y is not None and y.is_floating_point() and y.ndim <= 1:
            return y
    raise HooktrainError(
        f"Item {index} of the {split} dataset has {described(value)} as its target; use an int "
        "class label, or a float or 1-D float tensor of regression values."
    )


def described(value: object) -> str:
    """What a value is, for a sentence: 'a float32 tensor of shape (3, 32, 32)', 'a str'."""
    if isinstance(value, np.ndarray | Tensor):
        kind = "array" if isinstance(value, np.ndarray) else "tensor"
        return f"a {str(value.dtype).removeprefix('torch.')} {kind} of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def words(sample: Tensor) -> str:
    """One sample's input or target in words: '48x40 RGB pixels', '3 float32 values'."""
    if sample.dtype == torch.uint8 and sample.ndim == 3:
        height, width, channels = sample.shape
        return f"{width}x{height} {'grayscale' if channels == 1 else 'RGB'} pixels"
    if not sample.is_floating_point():
        return "a class label"
    count = sample.shape[0] if sample.ndim else 1
    return f"{count} {dtype_name(sample)} {'value' if sample.ndim == 0 else 'values'}"


def dtype_name(tensor: Tensor) -> str:
    """``float32`` for a float32 tensor (torch's name without its ``torch.``)."""
    return str(tensor.dtype).removeprefix("torch.")
