"""The pure pieces that build hooks contribute and the engine composes into the step."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from hooktrain.models.layers import hashed_uniform

Tensors = list[torch.Tensor]
NamedTensors = dict[str, torch.Tensor]

LRSchedule = Callable[[torch.Tensor], torch.Tensor]
"""``schedule(step) -> lr``: 0-d int64 step index in, 0-d float learning rate out."""

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(logits, targets) -> 0-d loss``."""

GradientFn = Callable[
    [NamedTensors, NamedTensors, torch.Tensor, torch.Tensor],
    tuple[NamedTensors, torch.Tensor, NamedTensors],
]
"""``gradients(params, buffers, x, y) -> (grads, loss, new_buffers)``: the training loss of a
batch, its gradients by parameter name and the buffers (BatchNorm statistics) after it."""

EvalViews = Callable[[torch.Tensor], Sequence[tuple[torch.Tensor, float]]]
"""``views(x) -> [(view, weight), ...]``: evaluation scores the weighted sum of the model's
outputs over the views of a batch (test-time augmentation)."""


@attrs.frozen
class GradientTransform:
    """One member of the chain between the gradients and the parameters: an (init, update)
    pair of pure functions, as an optax gradient transformation.

    ``init(params) -> state`` gives the member's state before the first step (tensors in
    dicts and lists; ``{}`` for a stateless member); the state lives in
    :attr:`TrainState.transforms <hooktrain.core.state.TrainState>` under ``name``, so it is
    checkpointed, resumed and kept per seed. ``update(updates, state, params, lr) -> (updates,
    state, metrics)`` rewrites what flows down the chain: the gradients for a member before the
    optimizer, the parameter changes it returned (new params = params + updates) for one with
    ``after_optimizer``. ``metrics`` are 0-d tensors that join the step's metrics. All lists
    are in parameter-name order (``build.param_names``).
    """

    name: str
    init: Callable[[Tensors], Any]
    update: Callable[
        [Tensors, Any, Tensors, torch.Tensor], tuple[Tensors, Any, dict[str, torch.Tensor]]
    ]
    after_optimizer: bool = False

    @classmethod
    def stateless(
        cls,
        name: str,
        function: Callable[[Tensors, Tensors], tuple[Tensors, dict[str, torch.Tensor]]],
        after_optimizer: bool = False,
    ) -> GradientTransform:
        """A member without state from ``function(updates, params) -> (updates, metrics)``."""

        def update(
            updates: Tensors, state: Any, params: Tensors, lr: torch.Tensor
        ) -> tuple[Tensors, Any, dict[str, torch.Tensor]]:
            new_updates, metrics = function(updates, params)
            return new_updates, state, metrics

        return cls(name, lambda params: {}, update, after_optimizer)


@attrs.frozen
class DecayRule:
    """Weight decay as a function of the parameter's name.

    ``rate_of(name)`` gives the decay rate of one parameter (0 for none); ``decoupled`` picks
    AdamW-style decay (shrink parameters by ``lr * rate``, a chain member right after the
    optimizer) over L2 added to the gradient (the last member before the optimizer).
    """

    rate_of: Callable[[str], float]
    decoupled: bool = False


@attrs.frozen
class ParamGroups:
    """Parameters grouped by name, as torch.optim's param groups but as functions of the name.

    ``label_of(name)`` names a parameter's group; ``lr_scale`` multiplies the learning rate of
    a group's parameters (groups it leaves out keep 1), decoupled weight decay included, as a
    param group's own ``lr`` does in torch.optim; ``decay_scale`` multiplies a group's weight
    decay rate, as a param group's own ``weight_decay`` does (airbench gives BatchNorm biases
    64 times the learning rate and 1/64 of the coupled decay rate, so their decay step stays
    that of the other parameters). Optimizers see the labels in ``build.groups`` and may treat
    groups differently.
    """

    label_of: Callable[[str], str]
    lr_scale: Mapping[str, float] = attrs.field(factory=dict)
    decay_scale: Mapping[str, float] = attrs.field(factory=dict)

    def decay_rule(self, rule: DecayRule) -> DecayRule:
        """``rule`` with each parameter's rate times its group's ``decay_scale``."""
        if not self.decay_scale:
            return rule

        def rate_of(name: str) -> float:
            return rule.rate_of(name) * float(self.decay_scale.get(self.label_of(name), 1.0))

        return attrs.evolve(rule, rate_of=rate_of)


@attrs.frozen
class Replicas:
    """How the step keeps data-parallel replicas (one per torchrun process) in agreement.

    ``average(tensors)`` returns the tensors' means over the replicas; the step calls it on the
    gradients, the loss and, when ``average_buffers``, the floating-point buffers (BatchNorm's
    running statistics), so every replica takes the same update and holds the same state.
    ``train_model(model)`` returns the module the step calls in training (same parameter and
    buffer names), e.g. one whose BatchNorm layers use the statistics of the global batch.
    """

    average: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    average_buffers: bool = True
    train_model: Callable[[nn.Module], nn.Module] = lambda model: model


_INT64 = 2**64


def _wrapped(value: int) -> int:
    """``value`` as a signed 64-bit integer (wrapping around, as int64 tensors do)."""
    return (value + 2**63) % _INT64 - 2**63


_STREAM_STRIDE = -4658895280553007687  # an odd 64-bit constant: streams far apart


class Draws:
    """The randomness of one training step: uniform numbers that are a pure function of the
    state's key (its seed and step count), so the step stays pure, a resumed run draws the same
    numbers and every seed trained in lockstep draws its own.

    Each call of :meth:`uniform` in a step draws from a stream of its own.
    """

    def __init__(self, key: torch.Tensor) -> None:
        self._seed, self._counter = key[0], key[1]
        self._calls = 0

    def uniform(self, *shape: int) -> torch.Tensor:
        """Float32 numbers in [0, 1) of ``shape``, on the key's device."""
        seed = self._seed + _wrapped(self._calls * _STREAM_STRIDE)
        self._calls += 1
        return hashed_uniform(seed, self._counter, torch.Size(shape))

    def permutation(self, n: int) -> torch.Tensor:
        """A random ordering of ``0 .. n-1`` (int64)."""
        return self.uniform(n).argsort()


BatchTransform = Callable[[torch.Tensor, torch.Tensor, Draws], tuple[torch.Tensor, torch.Tensor]]
"""``transform(x, y, draws) -> (x, y)``: rewrites an augmented training batch inside the step
(mixup, cutmix), drawing its randomness from ``draws``."""
