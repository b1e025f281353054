"""Gradient accumulation: the gradients of a big batch computed in micro-batches, so a batch
too big for the device's memory trains with the arithmetic of the big batch."""

from __future__ import annotations

import attrs
import torch

from hooktrain.core.context import BuildContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.pieces import GradientFn, NamedTensors
from hooktrain.core.plugin import Plugin, setting
from hooktrain.core.step import GradientWrapper
from hooktrain.errors import HooktrainError


def accumulate(micro_batches: int, name: str = "grad_accumulation") -> GradientWrapper:
    """The batch's gradients as the mean of those of ``micro_batches`` equal slices of it.

    The loss is the mean of the slices' losses: for a loss that averages over examples (the
    tasks' losses do), gradients and loss equal the whole batch's up to rounding. Buffers pass
    through the slices in order, so BatchNorm's running statistics take ``micro_batches``
    updates, as that many forward passes would give them; BatchNorm's batch statistics, and so
    the gradients of a model with BatchNorm, are each slice's own. ``name`` is the plugin's,
    for the error a batch that does not split raises.
    """

    def wrap(gradients: GradientFn) -> GradientFn:
        def accumulated(
            params: NamedTensors, buffers: NamedTensors, x: torch.Tensor, y: torch.Tensor
        ) -> tuple[NamedTensors, torch.Tensor, NamedTensors]:
            # A static shape: checked once when traced, and it catches a per-process batch
            # (batch_size / world_size under torchrun) that the recipe's check cannot see.
            if x.shape[0] % micro_batches:
                raise HooktrainError(
                    f"A training batch of {x.shape[0]} examples does not split into "
                    f"{micro_batches} equal micro-batches; choose {name}.micro_batches to "
                    f"divide the batch each process trains on."
                )
            size = x.shape[0] // micro_batches
            total, loss_total, buffers = gradients(params, buffers, x[:size], y[:size])
            for i in range(1, micro_batches):
                part = slice(i * size, (i + 1) * size)
                grads, loss, buffers = gradients(params, buffers, x[part], y[part])
                # A running sum holds one extra copy of the gradients, not one per micro-batch.
                total = {n: total[n] + g for n, g in grads.items()}
                loss_total = loss_total + loss
            mean = {n: g / micro_batches for n, g in total.items()}
            return mean, loss_total / micro_batches, buffers

        return accumulated

    return wrap


@attrs.define
class GradAccumulation(Plugin):
    """Split every training batch into ``micro_batches`` equal parts and average their gradients
    (gradient accumulation): the memory of one micro-batch with the arithmetic of the recipe's
    ``batch_size``, which stays the effective batch.

    One step is still one optimizer step over the whole batch, so learning-rate schedules and
    ``steps_per_epoch`` count optimizer steps and do not change with ``micro_batches``. With
    BatchNorm, each micro-batch is normalised by its own statistics (as on a device that holds
    only a micro-batch) and the running statistics are updated once per micro-batch.
    """

    default_name = "grad_accumulation"
    micro_batches: int = setting(
        2, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"
    )

    @hookimpl
    def hooktrain_wrap_gradients(self, build: BuildContext) -> GradientWrapper:
        batch_size = build.recipe.batch_size
        if batch_size % self.micro_batches:
            raise HooktrainError(
                f"batch_size {batch_size} does not split into {self.micro_batches} equal "
                f"micro-batches; set batch_size to a multiple of {self.name}.micro_batches or "
                f"{self.name}.micro_batches to a divisor of {batch_size}."
            )
        return accumulate(self.micro_batches, self.name)
