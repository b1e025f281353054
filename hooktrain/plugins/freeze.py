"""Stop training chosen parameters after some epochs (airbench's ``whiten_bias_epochs``)."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

import attrs
import torch

from hooktrain.core.context import BuildContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.pieces import GradientTransform, Tensors
from hooktrain.core.plugin import Plugin, patterns, setting
from hooktrain.errors import HooktrainError


def freeze_after(
    name: str, frozen: list[int], after_steps: int, ramp_from: float | None = None
) -> GradientTransform:
    """A chain member after the optimizer that zeroes the updates of the parameters at the
    indices ``frozen`` from step ``after_steps + 1`` on; its state counts the steps.

    With ``ramp_from`` (the schedule's ``max_lr``) their learning rate, until then, is not the
    schedule's but falls linearly from ``ramp_from`` to 0 at the freeze: their updates are
    rescaled by ``ramp_from * (1 - t / after_steps) / lr`` at step index ``t``.
    """

    def init(params: Tensors) -> dict[str, Any]:
        return {"count": torch.zeros((), dtype=torch.int64, device=params[0].device)}

    def update(
        updates: Tensors, state: dict[str, Any], params: Tensors, lr: torch.Tensor
    ) -> tuple[Tensors, dict[str, Any], dict[str, torch.Tensor]]:
        count = state["count"] + 1
        training = count <= after_steps
        factor = torch.where(training, 1.0, 0.0)
        if ramp_from is not None:
            ramped = ramp_from * (1 - (count - 1).to(lr.dtype) / after_steps) / lr
            # Where the schedule's rate is 0 the update is 0: the parameter stays, not NaN.
            factor = torch.where(training & (lr > 0), ramped, 0.0)
        new_updates = list(updates)
        for index in frozen:
            new_updates[index] = updates[index] * factor.to(updates[index].dtype)
        return new_updates, {"count": count}, {}

    return GradientTransform(name, init, update, after_optimizer=True)


@attrs.define
class Freeze(Plugin):
    """Train the parameters matching ``include`` for the first ``epochs`` epochs only.

    airbench94 trains the whitening layer's bias for 3 epochs, then freezes it; with ``ramp``
    its learning rate falls linearly from ``max_lr`` to 0 over those epochs, in place of the
    run's schedule (airbench94_muon). The frozen
    parameters stop moving from the optimizer; members after this one in the chain (lookahead)
    still move them, as airbench's Lookahead moves its frozen bias. Patterns are shell-style
    over parameter names.
    """

    default_name = "freeze"
    include: tuple[str, ...] = patterns(("whiten.bias",))
    epochs: int = setting(3, lambda v: isinstance(v, int) and v >= 0, "a whole number, 0 or more")
    ramp: bool = False

    @hookimpl
    def hooktrain_gradient_transform(self, build: BuildContext) -> GradientTransform:
        names = build.param_names
        frozen = [i for i, n in enumerate(names) if any(fnmatchcase(n, p) for p in self.include)]
        if not frozen:
            raise HooktrainError(
                f"{self.name}.include {list(self.include)} matches no parameter of the model "
                f"(its names start {', '.join(names[:3])}); fix the patterns or drop the plugin."
            )
        ramp_from = build.recipe.max_lr if self.ramp else None
        return freeze_after(self.name, frozen, self.epochs * build.steps_per_epoch, ramp_from)
