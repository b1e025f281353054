"""Weight decay on chosen parameters: coupled (L2, the seed's Adam) or decoupled (AdamW)."""

from __future__ import annotations

import math
from fnmatch import fnmatchcase
from typing import Literal

import attrs

from hooktrain.core.context import BuildContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.pieces import DecayRule
from hooktrain.core.plugin import Plugin, patterns, setting


@attrs.define
class WeightDecay(Plugin):
    """Weight decay on conv and linear weights (not BatchNorm or biases), by name pattern.

    ``include`` and ``exclude`` are shell-style patterns over parameter names as
    ``model.named_parameters()`` gives them (``6.0.block.0.0.weight``). With no ``include``, every
    parameter of two or more dimensions decays: convolution and linear weights, but not
    BatchNorm scales or any bias. ``mode=auto`` is decoupled for AdamW, coupled otherwise.
    """

    default_name = "weight_decay"
    rate: float = setting(1e-4, lambda v: 0 <= v < math.inf, "0 or a positive number")
    mode: Literal["auto", "coupled", "decoupled"] = "auto"
    include: tuple[str, ...] = patterns(())
    exclude: tuple[str, ...] = patterns(())

    def decays(self, name: str, ndim: int) -> bool:
        """Whether the parameter ``name`` of ``ndim`` dimensions decays."""
        if any(fnmatchcase(name, pattern) for pattern in self.exclude):
            return False
        if self.include:
            return any(fnmatchcase(name, pattern) for pattern in self.include)
        return ndim >= 2

    @hookimpl
    def hooktrain_weight_decay(self, build: BuildContext) -> DecayRule:
        rates = {
            name: self.rate if self.decays(name, len(shape)) else 0.0
            for name, shape in build.param_shapes.items()
        }
        decoupled = (
            build.optimizer.decoupled_decay if self.mode == "auto" else self.mode == "decoupled"
        )
        return DecayRule(rate_of=rates.__getitem__, decoupled=decoupled)
