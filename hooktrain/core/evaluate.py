"""Evaluation: a task's metrics over a split, summed on the device with one host sync.

Each batch's metric sums go up to float64 on the device and add up there; the totals (and the
example count) are read back once per split. Seeds trained together are evaluated as one
``torch.func.vmap`` over their stacked weights, and data-parallel processes each evaluate their
share of the batches and add their totals in one collective.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from hooktrain.core.pieces import EvalViews, NamedTensors
from hooktrain.core.state import TrainState
from hooktrain.core.step import Batch, _at_least_float32, _autocast, _stack
from hooktrain.core.task import Task
from hooktrain.errors import HooktrainError

Metrics = dict[str, float]
Observer = Callable[[int, torch.Tensor, torch.Tensor], None]
"""``observe(lane, outputs, targets)``: called with every evaluated batch's outputs."""
EvaluateFn = Callable[..., Metrics]
"""``evaluate(state, batches, observe=None) -> metrics``."""
LaneEvaluateFn = Callable[..., list[Metrics]]
"""``evaluate(states, batches, observe=None) -> [metrics, ...]``, one per state."""
SumOverProcesses = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over the data-parallel processes (each evaluated its share of the batches)."""


def flip_views(x: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
    """The image and its mirror image, weighed equally (the recipe's ``tta_flip``)."""
    return [(x, 0.5), (x.flip(-1), 0.5)]


def _batch_sums(
    eval_model: nn.Module, task: Task, autocast_dtype: torch.dtype | None, views: EvalViews | None
) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``sums(params, buffers, x, y)``: the batch's metric sums as one float64 vector, in the
    order of ``task.metric_names``, and the outputs they come from."""
    names = task.metric_names

    def outputs_of(params: NamedTensors, buffers: NamedTensors, x: torch.Tensor) -> torch.Tensor:
        with _autocast(x.device, autocast_dtype):
            return _at_least_float32(functional_call(eval_model, (params, buffers), (x,)))

    def batch_sums(
        params: NamedTensors, buffers: NamedTensors, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        if views is None:
            outputs = outputs_of(params, buffers, x)
        else:  # test-time augmentation: the weighted sum over the views' outputs
            weighted = [weight * outputs_of(params, buffers, view) for view, weight in views(x)]
            outputs = torch.stack(weighted).sum(0)
        sums = task.metric_sums(outputs, y)
        if set(sums) != set(names):
            raise HooktrainError(
                f"The {type(task).__name__} task's metric_sums gave the sums "
                f"{', '.join(sums) or 'none'} but it reports {', '.join(names)}; make "
                "metric_sums return one sum per name in metric_names."
            )
        return torch.stack([sums[name].to(torch.float64) for name in names]), outputs

    return batch_sums


@torch.no_grad()
def _evaluations(
    core: Callable[..., torch.Tensor],
    task: Task,
    params: NamedTensors,
    buffers: NamedTensors,
    batches: Iterable[Batch],
    lanes: int,
    sum_over_processes: SumOverProcesses | None = None,
    observe: Observer | None = None,
    batched: bool = False,
) -> list[Metrics]:
    """Sum over the batches on the device, then one host sync; a list of one per lane."""
    names = task.metric_names
    device = next(iter(params.values())).device
    totals = torch.zeros(lanes, len(names), dtype=torch.float64, device=device)
    count = 0
    for x, y in batches:
        sums, outputs = core(params, buffers, x, y)
        totals += sums.reshape(lanes, len(names))
        count += len(y)
        if observe is not None:
            # Lanes evaluated together come vmapped, lanes first; a single run's unbatched.
            lane_outputs = outputs if batched else outputs.unsqueeze(0)
            for lane in range(lanes):
                observe(lane, lane_outputs[lane], y)
    flat = totals.reshape(-1)
    if sum_over_processes is not None:  # called by every process, even one with no batch
        counted = torch.tensor([count], dtype=torch.float64, device=device)
        *values, total_count = sum_over_processes(torch.cat([flat, counted])).tolist()
        count = int(total_count)
    else:
        values = flat.tolist()
    if count == 0:
        return [dict.fromkeys(names, float("nan")) for _ in range(lanes)]
    rows = [values[lane * len(names) : (lane + 1) * len(names)] for lane in range(lanes)]
    return [task.metrics(dict(zip(names, row, strict=True)), count) for row in rows]


def build_evaluate(
    eval_model: nn.Module,
    task: Task,
    autocast_dtype: torch.dtype | None,
    compile: bool = False,
    views: EvalViews | None = None,
    sum_over_processes: SumOverProcesses | None = None,
) -> EvaluateFn:
    """``evaluate(state, batches, observe=None) -> {metric: value}`` with the model in eval
    mode, the task's metrics over the batches (NaN for each when there is none). ``views``
    scores each batch by the weighted sum of the outputs on its views; ``observe`` sees every
    batch's outputs. Data-parallel processes each pass their share of the batches and
    ``sum_over_processes``; all get the whole split's figures."""
    batch_sums = _batch_sums(eval_model, task, autocast_dtype, views)
    core = torch.compile(batch_sums) if compile else batch_sums

    def evaluate(
        state: TrainState, batches: Iterable[Batch], observe: Observer | None = None
    ) -> Metrics:
        return _evaluations(
            core, task, state.params, state.buffers, batches, 1, sum_over_processes, observe
        )[0]

    return evaluate


def build_lane_evaluate(
    eval_model: nn.Module,
    task: Task,
    autocast_dtype: torch.dtype | None,
    compile: bool = False,
    views: EvalViews | None = None,
) -> LaneEvaluateFn:
    """``evaluate(states, batches, observe=None) -> [{metric: value}, ...]``, one per state:
    all lanes vmapped over each batch."""
    batch_sums = _batch_sums(eval_model, task, autocast_dtype, views)
    lane_sums = vmap(batch_sums, in_dims=(0, 0, None, None))
    core = torch.compile(lane_sums) if compile else lane_sums

    def evaluate(
        states: Sequence[TrainState], batches: Iterable[Batch], observe: Observer | None = None
    ) -> list[Metrics]:
        params = _stack([s.params for s in states])
        buffers = _stack([s.buffers for s in states])
        return _evaluations(
            core, task, params, buffers, batches, len(states), None, observe, batched=True
        )

    return evaluate
