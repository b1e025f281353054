"""The training step, one pure function composed from the plugins' pieces, and evaluation."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import attrs
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value

from hooktrain.engine.optim import (
    Optimizer,
    OptState,
    add_coupled_decay,
    apply_decoupled_decay,
    group_by_rate,
)
from hooktrain.engine.pieces import DecayRule, GradientTransform, LossFn, LRSchedule
from hooktrain.engine.state import TrainState

Batch = tuple[torch.Tensor, torch.Tensor]
NamedTensors = dict[str, torch.Tensor]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, torch.Tensor]]]


def constant_schedule(lr: float) -> LRSchedule:
    """The learning rate ``lr`` at every step."""
    return lambda step: torch.full_like(step, lr, dtype=torch.float32)


@attrs.frozen
class StepPieces:
    """Everything the step is composed of; plugins contribute all but the model and optimizer."""

    model: nn.Module
    optimizer: Optimizer
    param_names: tuple[str, ...]
    schedule: LRSchedule
    transforms: Sequence[GradientTransform] = ()
    decay: DecayRule | None = None
    loss: LossFn = F.cross_entropy
    autocast_dtype: torch.dtype | None = None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def build_step(pieces: StepPieces, compile: bool = False) -> StepFn:
    """``step(state, (x, y)) -> (state, metrics)``: forward, backward, transforms, update.

    The step never writes to the state it receives. Metrics are 0-d device tensors (``loss``,
    ``lr`` and the transforms' own); nothing in the step waits for the device.
    """
    names = pieces.param_names
    decay_rates = [pieces.decay.rate_of(n) if pieces.decay else 0.0 for n in names]
    decay_groups = group_by_rate(decay_rates)
    decoupled = pieces.decay is not None and pieces.decay.decoupled

    def loss_and_buffers(
        params: NamedTensors, buffers: NamedTensors, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, NamedTensors]:
        with _autocast(x.device, pieces.autocast_dtype):
            logits = functional_call(pieces.model, (params, buffers), (x,))
        return pieces.loss(logits.float(), y), buffers

    value_and_grads = grad_and_value(loss_and_buffers, has_aux=True)

    def pure_step(
        params: NamedTensors,
        buffers: NamedTensors,
        opt_state: OptState,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> tuple[NamedTensors, NamedTensors, OptState, dict[str, torch.Tensor]]:
        lr = pieces.schedule(opt_state["count"])
        # BatchNorm updates running statistics in place: give it copies, keep the input intact.
        fresh_buffers = {name: b.clone() for name, b in buffers.items()}
        grads, (loss, new_buffers) = value_and_grads(params, fresh_buffers, x, y)
        param_list = [params[n] for n in names]
        grad_list = [grads[n] for n in names]
        metrics = {"loss": loss.detach(), "lr": lr}
        for transform in pieces.transforms:
            grad_list, transform_metrics = transform(grad_list, param_list)
            metrics.update(transform_metrics)
        if decoupled:
            param_list = apply_decoupled_decay(param_list, lr, decay_groups)
        else:
            grad_list = add_coupled_decay(grad_list, param_list, decay_groups)
        new_params, new_opt_state = pieces.optimizer.update(grad_list, opt_state, param_list, lr)
        return dict(zip(names, new_params, strict=True)), new_buffers, new_opt_state, metrics

    core = torch.compile(pure_step) if compile else pure_step

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, torch.Tensor]]:
        x, y = batch
        params, buffers, opt_state, metrics = core(
            state.params, state.buffers, state.opt_state, x, y
        )
        new_state = state.replace(
            step=state.step + 1, params=params, buffers=buffers, opt_state=opt_state
        )
        return new_state, metrics

    return step


@attrs.frozen
class Evaluation:
    """Mean cross-entropy and accuracy over a split."""

    loss: float
    accuracy: float


def build_evaluate(
    eval_model: nn.Module, autocast_dtype: torch.dtype | None, compile: bool = False
) -> Callable[[TrainState, Iterable[Batch]], Evaluation]:
    """``evaluate(state, batches) -> Evaluation`` with the model in eval mode.

    Sums stay on the device until the last batch: one host sync per evaluation.
    """

    def batch_sums(
        params: NamedTensors, buffers: NamedTensors, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with _autocast(x.device, autocast_dtype):
            logits = functional_call(eval_model, (params, buffers), (x,)).float()
        loss_sum = F.cross_entropy(logits, y, reduction="sum")
        correct = (logits.argmax(dim=1) == y).sum()
        return loss_sum, correct

    core = torch.compile(batch_sums) if compile else batch_sums

    @torch.no_grad()
    def evaluate(state: TrainState, batches: Iterable[Batch]) -> Evaluation:
        loss_sum = correct = count = 0
        for x, y in batches:
            batch_loss, batch_correct = core(state.params, state.buffers, x, y)
            loss_sum = loss_sum + batch_loss
            correct = correct + batch_correct
            count += len(y)
        if count == 0:
            return Evaluation(float("nan"), float("nan"))
        return Evaluation(float(loss_sum) / count, float(correct) / count)

    return evaluate
