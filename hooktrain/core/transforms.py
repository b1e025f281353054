"""The chain from gradients to parameters: gradient transforms, the optimizer, and the members
after it, composed in an explicit order that every run prints.

Synopsis::

    chain = Chain(members, optimizer)        # e.g. nan_guard -> grad_clip -> adam -> lookahead
    states = chain.init(params)              # {member name: its state}, kept in TrainState
    params, states, metrics = chain.update(grads, states, params, lr)

Members before the optimizer rewrite the gradients; the optimizer turns them into parameter
changes (updates); members after it rewrite those; the parameters move by the final updates.
Weight decay and parameter groups are members the engine adds from their hooks' answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch

from hooktrain.core.optim import Optimizer, OptState
from hooktrain.core.pieces import DecayRule, GradientTransform, ParamGroups, Tensors
from hooktrain.errors import HooktrainError

OPTIMIZER_STATE = "optimizer"
"""The optimizer's place in :attr:`TrainState.transforms`-style listings (its state is
``TrainState.opt_state``)."""


def _group_indices(
    values: Sequence[float], skip: float
) -> tuple[tuple[float, tuple[int, ...]], ...]:
    """Indices grouped by value, leaving out those equal to ``skip``: one foreach call each."""
    groups: dict[float, list[int]] = {}
    for index, value in enumerate(values):
        if value != skip:
            groups.setdefault(value, []).append(index)
    return tuple((value, tuple(indices)) for value, indices in groups.items())


def _rewrite(tensors: Tensors, indices: tuple[int, ...], new: Tensors) -> Tensors:
    tensors = list(tensors)
    for index, tensor in zip(indices, new, strict=True):
        tensors[index] = tensor
    return tensors


def weight_decay_member(rule: DecayRule, names: Sequence[str]) -> GradientTransform:
    """Coupled decay (``grad + rate * param``, before the optimizer) or decoupled decay (the
    update less ``lr * rate * param``, right after it, as torch.optim.AdamW shrinks weights)."""
    groups = _group_indices([rule.rate_of(name) for name in names], 0.0)

    def coupled(updates: Tensors, params: Tensors) -> tuple[Tensors, dict[str, torch.Tensor]]:
        for rate, indices in groups:
            decayed = torch._foreach_add(
                [updates[i] for i in indices], [params[i] for i in indices], alpha=rate
            )
            updates = _rewrite(updates, indices, decayed)
        return updates, {}

    def decoupled(
        updates: Tensors, state: Any, params: Tensors, lr: torch.Tensor
    ) -> tuple[Tensors, Any, dict[str, torch.Tensor]]:
        for rate, indices in groups:
            shrink = torch._foreach_mul([params[i] for i in indices], -lr * rate)
            updates = _rewrite(
                updates, indices, torch._foreach_add([updates[i] for i in indices], shrink)
            )
        return updates, state, {}

    if rule.decoupled:
        return GradientTransform("weight_decay", lambda params: {}, decoupled, after_optimizer=True)
    return GradientTransform.stateless("weight_decay", coupled)


def lr_scale_member(groups: ParamGroups, names: Sequence[str]) -> GradientTransform:
    """Each group's updates times its ``lr_scale``: the group's learning rate, scaled."""
    scales = _group_indices(
        [float(groups.lr_scale.get(groups.label_of(n), 1.0)) for n in names], 1.0
    )

    def scale(updates: Tensors, params: Tensors) -> tuple[Tensors, dict[str, torch.Tensor]]:
        for factor, indices in scales:
            scaled = torch._foreach_mul([updates[i] for i in indices], factor)
            updates = _rewrite(updates, indices, scaled)
        return updates, {}

    return GradientTransform.stateless("param_groups", scale, after_optimizer=True)


@attrs.frozen
class Chain:
    """Gradient transforms, the optimizer and the members after it, in the order they run."""

    before: tuple[GradientTransform, ...]
    optimizer: Optimizer
    after: tuple[GradientTransform, ...] = ()

    @classmethod
    def of(cls, members: Sequence[GradientTransform], optimizer: Optimizer) -> Chain:
        """The chain of ``members`` in their order, each on its side of the optimizer."""
        names = [member.name for member in members]
        for name in names:
            if names.count(name) > 1 or name == OPTIMIZER_STATE:
                raise HooktrainError(
                    f"Two members of the gradient chain are named {name!r} (or one is named "
                    f"like the optimizer's state); give each GradientTransform its own name."
                )
        return cls(
            tuple(m for m in members if not m.after_optimizer),
            optimizer,
            tuple(m for m in members if m.after_optimizer),
        )

    @property
    def members(self) -> tuple[GradientTransform, ...]:
        return (*self.before, *self.after)

    def describe(self) -> str:
        """The chain in order, as runs print it: ``nan_guard -> grad_clip -> adam``."""
        names = [m.name for m in self.before] + [self.optimizer.name] + [m.name for m in self.after]
        return " -> ".join(names)

    def init(self, params: Tensors) -> tuple[OptState, dict[str, Any]]:
        """The optimizer's state and every member's, before the first step."""
        return self.optimizer.init(params), {m.name: m.init(params) for m in self.members}

    def update(
        self,
        grads: Tensors,
        opt_state: OptState,
        states: dict[str, Any],
        params: Tensors,
        lr: torch.Tensor,
    ) -> tuple[Tensors, OptState, dict[str, Any], dict[str, torch.Tensor]]:
        """New parameters, optimizer state, members' states and the members' metrics."""
        metrics: dict[str, torch.Tensor] = {}
        new_states = dict(states)
        updates = grads
        for member in self.before:
            updates, new_states[member.name], member_metrics = member.update(
                updates, states[member.name], params, lr
            )
            metrics.update(member_metrics)
        updates, new_opt_state = self.optimizer.update(updates, opt_state, params, lr)
        for member in self.after:
            updates, new_states[member.name], member_metrics = member.update(
                updates, states[member.name], params, lr
            )
            metrics.update(member_metrics)
        return torch._foreach_add(params, updates), new_opt_state, new_states, metrics
