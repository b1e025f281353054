"""The training step, one pure function composed from the plugins' pieces.

Evaluation, which shares its autocast and float32 outputs, is in :mod:`hooktrain.core.evaluate`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from hooktrain.core.optim import OptState
from hooktrain.core.pieces import (
    BatchTransform,
    Draws,
    GradientFn,
    LossFn,
    LRSchedule,
    NamedTensors,
    Replicas,
)
from hooktrain.core.state import TrainState, as_created
from hooktrain.core.transforms import Chain

Batch = tuple[torch.Tensor, torch.Tensor]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, torch.Tensor]]]
LaneStepFn = Callable[
    [Sequence[TrainState], Sequence[Batch]],
    tuple[list[TrainState], list[dict[str, torch.Tensor]]],
]
GradientWrapper = Callable[[GradientFn], GradientFn]
"""``wrap(gradients) -> gradients``: a new way to get gradients from (params, batch), built on
the one it wraps (SAM's two passes, accumulation over micro-batches)."""
GradientsFn = Callable[..., tuple[NamedTensors, torch.Tensor, NamedTensors]]
UpdateFn = Callable[..., tuple[NamedTensors, OptState, dict, dict[str, torch.Tensor]]]


def constant_schedule(lr: float) -> LRSchedule:
    """The learning rate ``lr`` at every step."""
    return lambda step: torch.full_like(step, lr, dtype=torch.float32)


@attrs.frozen
class StepPieces:
    """Everything the step is composed of; plugins contribute all but the model.

    The step runs, in order: the batch transforms (in the order given), the gradients (the
    wrappers applied in order, the first innermost), the replicas' averaging, the chain.
    """

    model: nn.Module
    chain: Chain
    param_names: tuple[str, ...]
    schedule: LRSchedule
    loss: LossFn = F.cross_entropy
    autocast_dtype: torch.dtype | None = None
    replicas: Replicas | None = None
    batch_transforms: Sequence[BatchTransform] = ()
    gradient_wrappers: Sequence[GradientWrapper] = ()


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _autograd_grad_and_value(
    loss_fn: Callable[..., tuple[torch.Tensor, NamedTensors]],
) -> Callable[..., tuple[NamedTensors, tuple[torch.Tensor, NamedTensors]]]:
    """``grad_and_value(loss_fn, has_aux=True)`` computed by ``torch.autograd.grad``.

    The same gradients, bit for bit, and the step stays pure (the parameters are fresh leaves,
    the module is only called through ``functional_call``); eager, the backward runs about 20%
    faster than under torch.func's transform (measured on the CPU: its convolution backward is
    slower there). Neither vmap nor torch.compile can take it, so those use torch.func.
    """

    def value_and_grads(
        params: NamedTensors, *args: torch.Tensor | NamedTensors
    ) -> tuple[NamedTensors, tuple[torch.Tensor, NamedTensors]]:
        leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
        loss, aux = loss_fn(leaves, *args)
        grads = torch.autograd.grad(
            loss, list(leaves.values()), allow_unused=True, materialize_grads=True
        )
        return dict(zip(leaves, grads, strict=True)), (loss.detach(), aux)

    return value_and_grads


def _step_halves(pieces: StepPieces, traced: bool) -> tuple[GradientsFn, UpdateFn]:
    """The step in two halves: gradients (model work, vmappable) and update (list work).

    The update half is written with ``torch._foreach_*`` ops, which have no vmap batching
    rules; a group of seeds therefore vmaps only the gradients and updates seed by seed.
    ``traced``: the gradients will run under vmap or torch.compile, so torch.func computes them.
    """
    names = pieces.param_names

    def loss_and_buffers(
        params: NamedTensors, buffers: NamedTensors, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, NamedTensors]:
        with _autocast(x.device, pieces.autocast_dtype):
            logits = functional_call(pieces.model, (params, buffers), (x,))
        return pieces.loss(_at_least_float32(logits), y), buffers

    if traced:
        value_and_grads = grad_and_value(loss_and_buffers, has_aux=True)
    else:
        value_and_grads = _autograd_grad_and_value(loss_and_buffers)

    def model_gradients(
        params: NamedTensors, buffers: NamedTensors, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[NamedTensors, torch.Tensor, NamedTensors]:
        # Modules update running statistics in place: they get copies, the input stays intact.
        fresh_buffers = {name: b.clone() for name, b in buffers.items()}
        grads, (loss, new_buffers) = value_and_grads(params, fresh_buffers, x, y)
        return grads, loss.detach(), new_buffers

    batch_gradients: GradientFn = model_gradients
    for wrap in pieces.gradient_wrappers:
        batch_gradients = wrap(batch_gradients)

    def gradients(
        params: NamedTensors,
        buffers: NamedTensors,
        key: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> tuple[NamedTensors, torch.Tensor, NamedTensors]:
        draws = Draws(key)
        for transform in pieces.batch_transforms:
            x, y = transform(x, y, draws)
        return batch_gradients(params, buffers, x, y)

    def update(
        params: NamedTensors,
        grads: NamedTensors,
        opt_state: OptState,
        transform_states: dict[str, Any],
        key: torch.Tensor,
        loss: torch.Tensor,
    ) -> tuple[NamedTensors, OptState, dict[str, Any], dict[str, torch.Tensor]]:
        lr = pieces.schedule(key[1])
        new_params, new_opt_state, new_states, chain_metrics = pieces.chain.update(
            [grads[n] for n in names], opt_state, transform_states, [params[n] for n in names], lr
        )
        metrics = {"loss": loss, "lr": lr, **chain_metrics}
        return dict(zip(names, new_params, strict=True)), new_opt_state, new_states, metrics

    return gradients, update


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Logits for the loss: half-precision autocast output goes up to float32, float64 stays."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def build_step(pieces: StepPieces, compile: bool = False, compile_mode: str = "default") -> StepFn:
    """``step(state, (x, y)) -> (state, metrics)``: forward, backward, transforms, update.

    The step never writes to the state it receives. Metrics are 0-d device tensors (``loss``,
    ``lr`` and the transforms' own); nothing in the step waits for the device.
    """
    gradients, update = _step_halves(pieces, traced=compile)

    def pure_step(
        params: NamedTensors,
        buffers: NamedTensors,
        opt_state: OptState,
        transform_states: dict[str, Any],
        key: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> tuple[NamedTensors, NamedTensors, OptState, dict[str, Any], torch.Tensor, dict]:
        grads, loss, new_buffers = gradients(params, buffers, key, x, y)
        if pieces.replicas is not None:
            grads, loss, new_buffers = _average_replicas(
                pieces.replicas, grads, loss, buffers, new_buffers
            )
        new_params, new_opt_state, new_states, metrics = update(
            params, grads, opt_state, transform_states, key, loss
        )
        return new_params, new_buffers, new_opt_state, new_states, _tick(key), metrics

    core = torch.compile(pure_step, mode=compile_mode) if compile else pure_step

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, torch.Tensor]]:
        x, y = batch
        params, buffers, opt_state, transforms, key, metrics = core(
            state.params, state.buffers, state.opt_state, state.transforms, state.key, x, y
        )
        return _stepped(state, params, buffers, opt_state, transforms, key), metrics

    return step


def _stepped(
    state: TrainState,
    params: NamedTensors,
    buffers: NamedTensors,
    opt_state: OptState,
    transforms: dict[str, Any],
    key: torch.Tensor,
) -> TrainState:
    """``state`` one step on, holding what the step computed."""
    return state.replace(
        step=state.step + 1,
        params=params,
        buffers=buffers,
        opt_state=as_created(opt_state),
        transforms=as_created(transforms),
        key=key,
    )


def _tick(key: torch.Tensor) -> torch.Tensor:
    """The key after one more step: the same seed, the step count one higher (built on the
    device: a tensor made from Python numbers would be a host-to-device copy every step)."""
    return torch.cat([key[:1], key[1:] + 1])


def _average_replicas(
    replicas: Replicas,
    grads: NamedTensors,
    loss: torch.Tensor,
    old_buffers: NamedTensors,
    buffers: NamedTensors,
) -> tuple[NamedTensors, torch.Tensor, NamedTensors]:
    """Gradients, loss and floating buffers averaged over the data-parallel replicas, in one
    call so they share the all-reduce buckets.

    Buffers average their change in this step (the replicas start it equal): a buffer no layer
    updates (airbench's frozen whitening weight) stays bit for bit, where the mean of equal
    values divided by 3 would round.
    """
    averaged = [
        name for name, b in buffers.items() if replicas.average_buffers and b.is_floating_point()
    ]
    changes = [buffers[name] - old_buffers[name] for name in averaged]
    means = replicas.average([*grads.values(), loss, *changes])
    count = len(grads)
    new_grads = dict(zip(grads, means[:count], strict=True))
    changed = zip(averaged, means[count + 1 :], strict=True)
    moved = [old_buffers[name] + change for name, change in changed]
    new_buffers = {**buffers, **dict(zip(averaged, moved, strict=True))}
    return new_grads, means[count], new_buffers


def build_lane_step(
    pieces: StepPieces, compile: bool = False, compile_mode: str = "default"
) -> LaneStepFn:
    """``step(states, batches) -> (states, metrics)`` for seeds trained in lockstep.

    Each lane (one seed) has its own state and batch. Forward and backward of all lanes run as
    one ``torch.func.vmap`` over their stacked parameters and buffers; the update then runs per
    lane, exactly as :func:`build_step` does it, so a lane follows the same arithmetic as the
    seed trained alone (up to the float rounding of batched kernels).
    """
    gradients, update = _step_halves(pieces, traced=True)
    lane_gradients = vmap(gradients)

    def pure_lane_step(
        params: list[NamedTensors],
        buffers: list[NamedTensors],
        opt_states: list[OptState],
        transform_states: list[dict[str, Any]],
        keys: list[torch.Tensor],
        xs: list[torch.Tensor],
        ys: list[torch.Tensor],
    ) -> tuple[list, list, list, list, list, list]:
        grads, losses, new_buffers = lane_gradients(
            _stack(params), _stack(buffers), torch.stack(keys), torch.stack(xs), torch.stack(ys)
        )
        lanes = range(len(params))
        updates = [
            update(
                params[i],
                {n: g[i] for n, g in grads.items()},
                opt_states[i],
                transform_states[i],
                keys[i],
                losses[i],
            )
            for i in lanes
        ]
        lane_buffers = [{n: b[i] for n, b in new_buffers.items()} for i in lanes]
        new_params, new_opt_states, new_states, metrics = (
            list(column) for column in zip(*updates, strict=True)
        )
        new_keys = [_tick(key) for key in keys]
        return new_params, lane_buffers, new_opt_states, new_states, new_keys, metrics

    core = torch.compile(pure_lane_step, mode=compile_mode) if compile else pure_lane_step

    def step(
        states: Sequence[TrainState], batches: Sequence[Batch]
    ) -> tuple[list[TrainState], list[dict[str, torch.Tensor]]]:
        params, buffers, opt_states, transforms, keys, metrics = core(
            [s.params for s in states],
            [s.buffers for s in states],
            [s.opt_state for s in states],
            [s.transforms for s in states],
            [s.key for s in states],
            [x for x, _ in batches],
            [y for _, y in batches],
        )
        new_states = [
            _stepped(*lane)
            for lane in zip(states, params, buffers, opt_states, transforms, keys, strict=True)
        ]
        return new_states, metrics

    return step


def _stack(lanes: list[NamedTensors]) -> NamedTensors:
    """One tensor per name, the lanes stacked along a new first dimension."""
    return {name: torch.stack([lane[name] for lane in lanes]) for name in lanes[0]}
