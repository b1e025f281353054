"""Multi-crop test-time augmentation (airbench's ``tta_level``)."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
import torch.nn.functional as F

from hooktrain.core.context import BuildContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.pieces import EvalViews
from hooktrain.core.plugin import Plugin, setting
from hooktrain.errors import HooktrainError

View = tuple[torch.Tensor, float]


def mirrored(x: torch.Tensor, weight: float) -> list[View]:
    """The batch and its mirror image, each with half of ``weight``."""
    return [(x, weight / 2), (x.flip(-1), weight / 2)]


def multi_crop_views(level: int, shift: int = 1) -> EvalViews:
    """Views of a batch of NCHW images whose weighted outputs airbench's ``infer`` averages:
    level 0 the batch; 1 it and its mirror image; 2 those (half the weight) and, for the other
    half, the mirrored pair of the image shifted ``shift`` pixels up-left and down-right
    (reflect-padded)."""

    def views(x: torch.Tensor) -> Sequence[View]:
        if level == 0:
            return [(x, 1.0)]
        if level == 1:
            return mirrored(x, 1.0)
        height, width = x.shape[-2:]
        padded = F.pad(x, (shift,) * 4, mode="reflect")
        up_left = padded[..., :height, :width]
        down_right = padded[..., 2 * shift :, 2 * shift :]
        return [*mirrored(x, 0.5), *mirrored(up_left, 0.25), *mirrored(down_right, 0.25)]

    return views


@attrs.define
class MultiCrop(Plugin):
    """Score test images by the mean output over flipped and shifted copies.

    ``level=2`` (airbench94's) evaluates six views per image, so evaluation costs six times
    as much as without. It replaces the recipe's ``tta_flip`` (level 1 is the same thing).
    """

    default_name = "multi_crop"
    level: int = setting(
        2, lambda v: v in (0, 1, 2), "0 (none), 1 (mirror) or 2 (mirror and shifts)"
    )
    shift: int = setting(1, lambda v: isinstance(v, int) and v >= 1, "a whole number, 1 or more")

    @hookimpl
    def hooktrain_eval_views(self, build: BuildContext) -> EvalViews:
        shape = build.facts.get("input_shape")
        if shape is not None and len(shape) != 3:
            raise HooktrainError(
                f"{self.name} mirrors and shifts images, but this run's inputs have the shape "
                f"{tuple(shape)}, not (channels, height, width); drop the plugin."
            )
        if shape is not None and self.level == 2 and self.shift >= min(shape[1:]):
            raise HooktrainError(
                f"{self.name}.shift is {self.shift}, but the images are {shape[1]}x{shape[2]}: "
                f"a shift must be below their size; set {self.name}.shift to 1 or so."
            )
        return multi_crop_views(self.level, self.shift)
