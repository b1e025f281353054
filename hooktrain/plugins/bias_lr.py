"""A larger learning rate for BatchNorm biases (airbench's ``bias_scaler``)."""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import attrs

from hooktrain.core.context import BuildContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.pieces import ParamGroups
from hooktrain.core.plugin import Plugin, patterns, setting
from hooktrain.errors import HooktrainError

SCALED, OTHER = "scaled", "other"


@attrs.define
class BiasLR(Plugin):
    """Train the parameters matching ``include`` (BatchNorm biases) ``scale`` times faster.

    airbench94 scales its BatchNorm biases' learning rate by 64 (their scales are fixed at 1,
    so the shifts are all BatchNorm learns) and divides their coupled weight decay rate by as
    much, so the decay step is the other parameters' (``keep_decay``). Patterns are
    shell-style over parameter names; the groups are ``scaled`` and ``other``.
    """

    default_name = "bias_lr"
    scale: float = setting(64.0, lambda v: 0 < v < math.inf, "a positive number")
    include: tuple[str, ...] = patterns(("*norm*.bias",))
    keep_decay: bool = True

    @hookimpl
    def hooktrain_param_groups(self, build: BuildContext) -> ParamGroups:
        def label_of(name: str) -> str:
            return SCALED if any(fnmatchcase(name, p) for p in self.include) else OTHER

        names = build.param_names
        if not any(label_of(name) == SCALED for name in names):
            raise HooktrainError(
                f"{self.name}.include {list(self.include)} matches no parameter of the model "
                f"(its names start {', '.join(names[:3])}); fix the patterns or drop the plugin."
            )

        return ParamGroups(
            label_of,
            lr_scale={SCALED: self.scale},
            decay_scale={SCALED: 1 / self.scale} if self.keep_decay else {},
        )
