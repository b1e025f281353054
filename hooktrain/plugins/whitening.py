"""Whitening initialisation of the first convolution from training patches (airbench)."""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F

from hooktrain.core.context import BuildContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.plugin import Plugin, setting
from hooktrain.data.device import DeviceData
from hooktrain.errors import HooktrainError


def whitening_filters(images: torch.Tensor, kernel: int, eps: float) -> torch.Tensor:
    """Filters that whiten the ``kernel`` x ``kernel`` patches of ``images`` (N, C, H, W), and
    their negatives: ``2 * C * kernel**2`` filters of shape (C, kernel, kernel).

    The patches' second-moment matrix (no mean removed, as airbench) is diagonalised; filter
    ``i`` is the eigenvector of the ``i``-th largest eigenvalue divided by
    ``sqrt(eigenvalue + eps)``, so every filter's response has unit variance over the patches.
    The sums run in float64: in float32 the 5,000 images' 4.8 million patches leave the
    small-eigenvalue filters a few percent off (airbench's own function, measured on CIFAR-10).
    """
    channels = images.shape[1]
    patches = F.unfold(images.double(), kernel).transpose(1, 2).reshape(-1, channels * kernel**2)
    moments = patches.T @ patches / patches.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(moments)
    # eigh sorts ascending: the largest eigenvalue's filter comes first, as in airbench.
    order = torch.arange(len(eigenvalues) - 1, -1, -1, device=eigenvalues.device)
    vectors = eigenvectors.T[order]
    # An eigenvector's sign is arbitrary (LAPACK and cuSOLVER may differ): fix it so that each
    # one's largest component is positive, which makes the filters the same on every device.
    largest = vectors.gather(1, vectors.abs().argmax(1, keepdim=True))
    scaled = vectors * largest.sign() / torch.sqrt(eigenvalues[order, None] + eps)
    filters = scaled.reshape(-1, channels, kernel, kernel)
    return torch.cat([filters, -filters])


def spread_images(data: DeviceData, count: int) -> torch.Tensor:
    """``count`` training images as evaluation feeds them to the model (normalised, not
    augmented): every k-th of the split, ``k = n // count``, so a copy listed class by class
    (image folders) gives every class its share, and a shuffled one a random sample (as the
    first 5,000 of CIFAR-10's official order are for airbench). Every process of a torchrun
    reads the whole split, so all compute the filters a single process would.
    """
    stride = max(1, data.n_train // count)
    taken, seen = [], 0
    for x, _ in data.eval_batches("train", whole=True):
        taken.append(x[(-seen) % stride :: stride])
        seen += len(x)
    return torch.cat(taken)[:count]


@attrs.define
class Whitening(Plugin):
    """Set the frozen first convolution ``layer`` to whiten the training images' patches.

    airbench94 computes it from 5,000 training images before training (``spread_images``):
    the network starts from decorrelated, unit-variance inputs, which it would otherwise spend
    its first steps learning. The layer's weight must have ``2 * channels * kernel**2`` filters (the
    ``airbench_net`` model's ``whiten``).
    """

    default_name = "whitening"
    layer: str = "whiten"
    images: int = setting(
        5000, lambda v: isinstance(v, int) and v >= 1, "a whole number, 1 or more"
    )
    eps: float = setting(5e-4, lambda v: 0 < v < math.inf, "a positive number")

    @hookimpl
    def hooktrain_initial_params(
        self,
        build: BuildContext,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        data: DeviceData,
    ) -> dict[str, torch.Tensor]:
        name = f"{self.layer}.weight"
        weight = params.get(name, buffers.get(name))
        if weight is None or weight.ndim != 4:
            raise HooktrainError(
                f"{self.name}.layer is {self.layer!r}, but the model has no convolution weight "
                f"{name!r}; name the first convolution (airbench_net's is 'whiten')."
            )
        channels, kernel = weight.shape[1], weight.shape[2]
        if weight.shape[0] != 2 * channels * kernel**2 or weight.shape[3] != kernel:
            raise HooktrainError(
                f"{name} has shape {tuple(weight.shape)}; whitening fills 2 * channels * "
                f"kernel**2 = {2 * channels * kernel**2} square filters, so give the layer that "
                "many outputs."
            )
        filters = whitening_filters(spread_images(data, self.images), kernel, self.eps)
        return {name: filters.to(weight.dtype)}
