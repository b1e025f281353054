"""The training state: one frozen record holding everything a run needs to continue.

Synopsis::

    state = TrainState.create(model, chain, seed=0)
    for batch in batches:
        state, metrics = step(state, batch)       # a pure function: old state in, new state out
    save(state.to_dict())                          # a checkpoint is this record written out
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import nn

from hooktrain.core.optim import OptState
from hooktrain.errors import HooktrainError

if TYPE_CHECKING:
    from hooktrain.core.transforms import Chain


def data_generator(seed: int) -> torch.Generator:
    """The CPU generator that draws data order and augmentation for a run with this seed."""
    # Offset from the model-init seed so data order is not correlated with initial weights.
    return torch.Generator().manual_seed(seed + 1_000_003)


def step_key(seed: int, device: torch.device) -> torch.Tensor:
    """``[seed, 0]``: the key of the randomness drawn inside the step, before the first step."""
    # Its own offset from the run's seed, so in-step draws are not correlated with the others.
    generator = torch.Generator().manual_seed(seed + 2_000_003)
    drawn = torch.randint(0, 2**62, (), generator=generator, device="cpu")
    return torch.tensor([int(drawn), 0], dtype=torch.int64, device=device)


def capture_global_rng(device: torch.device) -> dict[str, torch.Tensor]:
    """The global RNG states that model code (dropout) draws from, as tensors."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _map_tensors(function: Callable[[torch.Tensor], torch.Tensor], value: Any) -> Any:
    """``value`` with ``function`` applied to every tensor in its dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, dict):
        return {k: _map_tensors(function, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_map_tensors(function, v) for v in value]
    return value


def as_created(value: Any) -> Any:
    """``value`` with its tuples as lists, as a state's containers are created: a compiled step
    hands lists back as tuples, and a container of another type would recompile the next step."""
    return _map_tensors(lambda tensor: tensor, value)


@attrs.frozen
class TrainState:
    """Step and epoch counters, parameters, buffers, the gradient chain's states and RNG states.

    ``params`` and ``buffers`` map the model's names to tensors; ``opt_state`` is whatever the
    optimizer's ``init`` returned and ``transforms`` the state of every other member of the
    gradient chain, by name; ``key`` is ``[seed, steps taken]`` on the device, which the
    randomness drawn inside the step (:class:`~hooktrain.core.pieces.Draws`) and the learning
    rate schedule read; ``rng`` holds ``data`` (the data generator's state at the
    start of the current epoch) and the global ``torch`` (and ``cuda``) RNG states as captured
    at the last epoch boundary.
    """

    step: int
    epoch: int
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    opt_state: OptState
    rng: dict[str, torch.Tensor]
    transforms: dict[str, Any]
    key: torch.Tensor

    @classmethod
    def create(cls, model: nn.Module, chain: Chain, seed: int) -> TrainState:
        """The state before the first step, taking the model's current weights."""
        params = {name: p.detach() for name, p in model.named_parameters()}
        buffers = {name: b.detach() for name, b in model.named_buffers()}
        device = next(iter(params.values())).device
        rng = {"data": data_generator(seed).get_state(), **capture_global_rng(device)}
        opt_state, transforms = chain.init(list(params.values()))
        return cls(0, 0, params, buffers, opt_state, rng, transforms, step_key(seed, device))

    def replace(self, **changes: Any) -> TrainState:
        """A copy with some fields changed (the record itself never changes)."""
        return attrs.evolve(self, **changes)

    def with_tensors(self, named: dict[str, torch.Tensor]) -> TrainState:
        """A copy whose parameters and buffers of these names take these values; a name that
        is neither is refused (a plugin answering ``hooktrain_eval_params`` with another
        model's names)."""
        unknown = named.keys() - self.params.keys() - self.buffers.keys()
        if unknown:
            raise HooktrainError(
                f"The tensors {', '.join(sorted(unknown))} are not parameters or buffers of this "
                "model; a plugin must answer with the names model.named_parameters() and "
                "named_buffers() give."
            )
        return self.replace(
            params={n: named.get(n, p) for n, p in self.params.items()},
            buffers={n: named.get(n, b) for n, b in self.buffers.items()},
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain containers of tensors and numbers, loadable with ``weights_only=True``.

        A tensor that views a larger one (a seed's slice of a group's stacked buffers) is
        copied: ``torch.save`` would otherwise write the whole storage it views.
        """
        return {
            key: _map_tensors(lambda t: t.clone() if t._is_view() else t, value)
            for key, value in attrs.asdict(self, recurse=False).items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], device: torch.device) -> TrainState:
        """Rebuild a state written by :meth:`to_dict`, moving tensors to ``device``."""

        def to_device(value: Any) -> Any:
            return _map_tensors(lambda t: t.to(device), value)

        # RNG states stay on the CPU: torch's setters take CPU byte tensors.
        return cls(
            step=int(data["step"]),
            epoch=int(data["epoch"]),
            params=to_device(data["params"]),
            buffers=to_device(data["buffers"]),
            opt_state=to_device(data["opt_state"]),
            rng=dict(data["rng"]),
            transforms=to_device(data["transforms"]),
            key=to_device(data["key"]),
        )
