"""An exponential moving average of the weights, evaluated in place of the weights themselves."""

from __future__ import annotations

from typing import Any

import attrs
import torch

from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.plugin import Plugin, check_saved_tensors, setting
from hooktrain.core.state import TrainState


@attrs.define
class EMA(Plugin):
    """Evaluate an exponential moving average of the weights (updated every ``every`` steps).

    ``average = decay * average + (1 - decay) * params``, on the device, without a host sync;
    the average starts at the first weights and is kept in checkpoints. BatchNorm statistics
    are the training state's.
    """

    default_name = "ema"
    decay: float = setting(0.99, lambda v: 0 <= v < 1, "at least 0 and below 1")
    every: int = setting(5, lambda v: v >= 1, "at least 1")
    _average: dict[str, torch.Tensor] | None = attrs.field(default=None, init=False)

    def state_dict(self) -> dict[str, Any]:
        return {} if self._average is None else {"average": self._average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        average = state.get("average")
        if average is not None and not (
            isinstance(average, dict) and all(isinstance(t, torch.Tensor) for t in average.values())
        ):
            raise TypeError("its average must map parameter names to tensors")
        self._average = average

    @hookimpl
    def hooktrain_fit_start(self, state: TrainState) -> None:
        if self._average is None:
            self._average = {name: p.detach().clone() for name, p in state.params.items()}
        else:  # resumed: the checkpoint's tensors come back on the CPU
            self._check_fits(state)
            self._average = {
                name: self._average[name].to(p.device) for name, p in state.params.items()
            }

    @hookimpl
    def hooktrain_step_end(self, state: TrainState) -> None:
        if state.step % self.every == 0 and self._average is not None:
            names = list(self._average)
            torch._foreach_lerp_(
                [self._average[n] for n in names],
                [state.params[n] for n in names],
                1 - self.decay,
            )

    @hookimpl
    def hooktrain_eval_params(self, state: TrainState) -> dict[str, torch.Tensor] | None:
        if self._average is not None:
            self._check_fits(state)
        return self._average

    def _check_fits(self, state: TrainState) -> None:
        """Refuse a saved average that is not one of this model's parameters."""
        check_saved_tensors(self, self._average or {}, state.params)
