"""Stop a run whose loss or gradients turn NaN or infinite, naming the first bad step."""

from __future__ import annotations

import attrs
import torch

from hooktrain.core.context import BuildContext, RunContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.pieces import GradientTransform
from hooktrain.core.plugin import Plugin, setting
from hooktrain.core.state import TrainState
from hooktrain.errors import TrainingDiverged
from hooktrain.plugins.checkpoint import CHECKPOINT_FOLDER, LAST

Tensors = list[torch.Tensor]


def _flag_nonfinite(grads: Tensors, params: Tensors) -> tuple[Tensors, dict[str, torch.Tensor]]:
    # Per-tensor norms: a sum of huge finite gradients must not read as an overflow.
    norms = torch.stack(torch._foreach_norm(grads))
    return grads, {"nonfinite_grads": (~torch.isfinite(norms)).any().float()}


@attrs.define
class NanGuard(Plugin):
    """Stop the run when the loss or a gradient is NaN or infinite, before it is saved.

    Every step's verdict stays on the device; it is read every ``check_every`` steps and at
    each epoch's end, so the guard costs no extra host sync per step. The ``checkpoint`` plugin
    never saves parameters that are not finite, so the last checkpoint stays the last good one.
    Its gradient check runs before every other gradient transform (clipping would hide an
    infinite gradient).
    """

    default_name = "nan_guard"
    check_every: int = setting(25, lambda v: v >= 1, "at least 1")
    _pending: list[tuple[int, torch.Tensor, torch.Tensor]] = attrs.field(factory=list, init=False)

    @hookimpl(tryfirst=True)
    def hooktrain_gradient_transform(self, build: BuildContext) -> GradientTransform:
        return GradientTransform.stateless(self.name, _flag_nonfinite)

    @hookimpl(tryfirst=True)
    def hooktrain_step_end(
        self, run: RunContext, state: TrainState, metrics: dict[str, torch.Tensor]
    ) -> None:
        self._pending.append((state.step, metrics["loss"], metrics["nonfinite_grads"]))
        if state.step % self.check_every == 0:
            self._check(run)

    @hookimpl(tryfirst=True)
    def hooktrain_epoch_end(self, run: RunContext) -> None:
        self._check(run)

    def _check(self, run: RunContext) -> None:
        """Read the pending steps' verdicts (one host sync); stop at the first bad one."""
        if not self._pending:
            return
        steps, losses, grads_bad = zip(*self._pending, strict=True)
        self._pending = []
        losses_bad = ~torch.isfinite(torch.stack(losses).float())
        bad = (losses_bad | torch.stack(grads_bad).bool()).tolist()
        if not any(bad):
            return
        first = bad.index(True)
        what = "loss" if bool(losses_bad[first]) else "gradient norm"
        value = float(losses[first]) if what == "loss" else None
        seed = f" (seed {run.recipe.seed})" if run.lanes > 1 else ""
        last = run.out_dir / CHECKPOINT_FOLDER / LAST
        kept = f"{last} holds the last good state" if last.is_file() else "no checkpoint was saved"
        raise TrainingDiverged(
            f"Training diverged{seed}: the {what} became "
            f"{value if value is not None else 'NaN or infinite'} at step {steps[first]} "
            f"(epoch {(steps[first] - 1) // run.steps_per_epoch + 1}), so the run was stopped "
            f"and {kept}; lower max_lr or clip the gradients, then start a new run."
        )
