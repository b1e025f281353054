"""A multilayer perceptron for tabular data (or flattened images)."""

from __future__ import annotations

import itertools
import math

from torch import nn

from hooktrain.errors import HooktrainError


def mlp(
    num_outputs: int,
    input_shape: tuple[int, ...],
    hidden: tuple[int, ...] = (64, 64),
) -> nn.Sequential:
    """Linear layers of ``hidden`` widths with ReLUs between them, from the flattened input to
    ``num_outputs`` (a regression's targets, or a classifier's logits)."""
    if not all(isinstance(width, int) and width >= 1 for width in hidden):
        raise HooktrainError(f"model.hidden must be widths of 1 or more, not {hidden!r}.")
    widths = [math.prod(input_shape), *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for width_in, width_out in itertools.pairwise(widths):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], num_outputs))
    return nn.Sequential(*layers)
