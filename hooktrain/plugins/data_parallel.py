"""Data parallelism across torchrun's processes: averaged gradients, synchronised BatchNorm.

Under ``torchrun --nproc-per-node N`` each process computes the gradients of its shard of the
global batch; this plugin's step piece averages them across the processes with all-reduces of
flat buckets (``torch.distributed``'s functional collectives, which ``torch.compile`` traces into
the step's graph), so every replica takes the update the whole batch gives. The loss and the
BatchNorm running statistics are averaged in the same buckets, so the replicas stay equal and
report the same figures. In a single process the plugin does nothing.

BatchNorm normalises each shard with its own statistics by default (as DDP does; cheapest).
``sync_batchnorm=true`` normalises with the statistics of the whole global batch, which makes
N processes compute what one process computes on the global batch (up to float rounding), at
the price of one small all-reduce per BatchNorm layer, forward and backward.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import attrs
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from hooktrain.core.context import BuildContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.pieces import Replicas
from hooktrain.core.plugin import Plugin, setting

MEGABYTE = 2**20


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's elements in memory order as one dimension (a view, no copy)."""
    if tensor.dim() == 4 and not tensor.is_contiguous():
        return tensor.permute(0, 2, 3, 1).reshape(-1)  # channels_last
    return tensor.reshape(-1)


def _unflat(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``flat`` shaped and laid out in memory as ``like`` (the inverse of :func:`_flat`)."""
    if like.dim() == 4 and not like.is_contiguous():
        n, c, h, w = like.shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(like.shape)


def buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``tensors`` grouped into buckets of one dtype and device, each at most
    ``bucket_bytes`` large unless a single tensor is larger, in the tensors' order."""
    open_buckets: dict[tuple[torch.dtype, torch.device], tuple[list[int], int]] = {}
    done: list[list[int]] = []
    for index, tensor in enumerate(tensors):
        key = (tensor.dtype, tensor.device)
        size = tensor.numel() * tensor.element_size()
        members, filled = open_buckets.get(key, ([], 0))
        if members and filled + size > bucket_bytes:
            done.append(members)
            members, filled = [], 0
        open_buckets[key] = ([*members, index], filled + size)
    return done + [members for members, _ in open_buckets.values()]


def replica_mean(
    group: dist.ProcessGroup, bucket_bytes: int
) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """``average(tensors)``: each tensor's mean over the group's processes, bucket by bucket."""
    scale = 1.0 / dist.get_world_size(group)

    def average(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        groups = buckets(tensors, bucket_bytes)
        # Every bucket's all-reduce is issued before the first result is used, so they overlap.
        sums = [
            funcol.all_reduce(torch.cat([_flat(tensors[i]) for i in members]), "sum", group)
            for members in groups
        ]
        means: list[torch.Tensor] = list(tensors)
        for members, total in zip(groups, sums, strict=True):
            parts = (total * scale).split([tensors[i].numel() for i in members])
            for index, part in zip(members, parts, strict=True):
                means[index] = _unflat(part, tensors[index])
        return means

    return average


class _SumOverReplicas(torch.autograd.Function):
    """All-reduce (sum) that gradients flow through: the backward sums the gradients too.

    Written as a Function with ``setup_context`` so torch.func's ``grad`` accepts it; the
    collective itself runs with autograd off (torch 2.14 registers an autograd formula for it
    that torch.func cannot take).
    """

    @staticmethod
    def forward(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        return funcol.all_reduce(tensor, "sum", group)

    @staticmethod
    def setup_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
        ctx.group = inputs[1]  # type: ignore[attr-defined]

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        with torch.no_grad():
            return funcol.all_reduce(grad, "sum", ctx.group), None  # type: ignore[attr-defined]


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm that normalises with the statistics of the global batch, in training.

    Each process sums its shard's values and squares per channel (shifted by the running mean,
    which every replica holds equal, so the variance keeps its precision) and one all-reduce
    gives the global batch's mean and variance. Evaluation uses the running statistics, as
    ``nn.BatchNorm2d`` does. The parameter and buffer names are BatchNorm's, so checkpoints of
    either load into the other.
    """

    group: dist.ProcessGroup

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(input)
        channels = input.shape[1]
        reduced = [0, *range(2, input.dim())]
        stat_shape = (1, channels) + (1,) * (input.dim() - 2)
        x = input.float()
        shift = (
            self.running_mean.detach().float()
            if self.running_mean is not None
            else x.new_zeros(channels)
        )
        centered = x - shift.view(stat_shape)
        count = x.new_full((1,), input.numel() // channels)
        local = torch.cat([centered.sum(reduced), centered.square().sum(reduced), count])
        total = _SumOverReplicas.apply(local, self.group)
        n = total[-1]
        shifted_mean = total[:channels] / n
        variance = (total[channels : 2 * channels] / n - shifted_mean.square()).clamp_min(0)
        mean = shift + shifted_mean
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean.detach(), variance.detach(), n.detach())
        out = (x - mean.view(stat_shape)) * torch.rsqrt(variance + self.eps).view(stat_shape)
        # Whatever scale and shift the layer has (airbench's BatchNorm has a shift alone).
        if self.weight is not None:
            out = out * self.weight.view(stat_shape)
        if self.bias is not None:
            out = out + self.bias.view(stat_shape)
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(
        self, mean: torch.Tensor, variance: torch.Tensor, count: torch.Tensor
    ) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # a cumulative average, as BatchNorm's momentum=None
            factor = 1.0 / self.num_batches_tracked.float()
        else:
            factor = torch.tensor(self.momentum, device=mean.device)
        unbiased = variance * count / (count - 1).clamp_min(1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def with_sync_batchnorm(model: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """A copy of ``model`` whose BatchNorm layers are :class:`SyncBatchNorm` (same names)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            # The same object with the same tensors, so names and state stay BatchNorm's.
            module.__class__ = SyncBatchNorm
            module.group = group
    return model


@attrs.define
class DataParallel(Plugin):
    """Averages gradients, loss and BatchNorm statistics across torchrun's processes.

    ``bucket_mb`` caps the size of one all-reduce; ``sync_batchnorm`` normalises with the global
    batch's statistics instead of each shard's. Nothing happens in a single process.
    """

    default_name = "data_parallel"
    bucket_mb: float = setting(25.0, lambda v: 0 < v <= 2**20, "above 0 and at most 1048576")
    sync_batchnorm: bool = False

    @hookimpl
    def hooktrain_replicas(self, build: BuildContext) -> Replicas | None:
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
            return None
        group = dist.group.WORLD
        average = replica_mean(group, int(self.bucket_mb * MEGABYTE))
        if not self.sync_batchnorm:
            return Replicas(average)
        return Replicas(
            average,
            average_buffers=False,  # synchronised statistics are equal everywhere already
            train_model=lambda model: with_sync_batchnorm(model, group),
        )
