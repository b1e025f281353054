"""Recipes: a run described as data.

A recipe names its model, data, augmentation chain and task as references (:class:`Ref`: a
factory and its arguments) and holds the hyperparameters and the plugins. Overriding it is
:mod:`hooktrain.config.overrides`; finding it by name is :mod:`hooktrain.config.registry`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import attrs

from hooktrain.config.ref import Ref
from hooktrain.core.plugin import Plugin
from hooktrain.errors import HooktrainError

# torch seeds are 64-bit; a run adds offsets to its seed (the data generator, an ablation's seeds).
SEED_LIMIT = 2**62

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and value <= 0:
        raise HooktrainError(f"{attribute.name} must be greater than 0, not {value!r}.")
    if value is not None and not math.isfinite(value):
        raise HooktrainError(f"{attribute.name} must be a finite number, not {value!r}.")


def _unit_interval(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not 0 <= value < 1:
        raise HooktrainError(f"{attribute.name} must be at least 0 and below 1, not {value!r}.")


def _betas(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not all(0 <= beta < 1 for beta in value):
        raise HooktrainError(
            f"betas must be two numbers at least 0 and below 1 (e.g. 0.9,0.999), not {value!r}."
        )


def _name(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    # It names run folders (runs/NAME-TIME): no path separators, no leading dot.
    if not isinstance(value, str) or not re.fullmatch(r"[\w+=,-][\w.+=,-]{0,99}", value):
        raise HooktrainError(
            f"A recipe's name must be 1 to 100 letters, digits and . _ - + = , (no slashes, "
            f"not starting with a dot), not {value!r}."
        )


def _seed(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not -SEED_LIMIT <= value <= SEED_LIMIT:
        raise HooktrainError(f"seed must be between {-SEED_LIMIT} and {SEED_LIMIT}, not {value!r}.")


def _ref(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, Ref):
        raise HooktrainError(
            f'{attribute.name} must be a Ref (e.g. {attribute.name}=Ref("name", ...)), not '
            f"{value!r}."
        )


def _chain(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not all(isinstance(piece, Ref) for piece in value):
        raise HooktrainError(f"augment must be a tuple of Refs, not {value!r}.")
    labels = [piece.label for piece in value]
    for label in labels:
        if labels.count(label) > 1:
            raise HooktrainError(
                f"Two augmentation pieces are labelled {label!r}; give one another label with "
                f"Ref(...).named({label + '_2'!r}), so --set augment.LABEL.FIELD can tell "
                "them apart."
            )


@attrs.frozen(kw_only=True)
class Recipe:
    """A training run: model, data, augmentation, task, optimizer, hyperparameters and plugins.

    ``model``, ``data`` and ``task`` are references to factories (``Ref("resnet9", width=64)``),
    ``augment`` a chain of them applied in order; their arguments are set with dotted keys
    (``--set model.width=16``, ``--set augment.crop.pad=2``). Choice fields are typed with
    ``Literal`` so overrides are checked against them; ``auto`` precision and memory format mean
    bf16 autocast and channels_last on CUDA, fp32 and contiguous on CPU.
    """

    name: str = attrs.field(validator=_name)
    model: Ref = attrs.field(default=Ref("resnet9"), validator=_ref)
    data: Ref = attrs.field(default=Ref("cifar10"), validator=_ref)
    augment: tuple[Ref, ...] = attrs.field(default=(), converter=tuple, validator=_chain)
    task: Ref = attrs.field(default=Ref("classification"), validator=_ref)
    tta_flip: bool = False
    epochs: int = attrs.field(default=8, validator=_positive)
    batch_size: int = attrs.field(default=400, validator=_positive)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    max_lr: float = attrs.field(default=0.01, validator=_positive)
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.999), validator=_betas)
    eps: float = attrs.field(default=1e-8, validator=_positive)
    momentum: float = attrs.field(default=0.9, validator=_unit_interval)
    nesterov: bool = True
    train_limit: int | None = attrs.field(default=None, validator=_positive)
    val_split: float = attrs.field(default=0.0, validator=_unit_interval)
    """The fraction of the training images held out for validation (the same images whatever
    the seed); with it, choices made during the run (``best.pt``) use validation, not test."""
    eval_batch_size: int = attrs.field(default=1000, validator=_positive)
    eval_every: int = attrs.field(default=1, validator=_positive)
    """Evaluate after every ``eval_every``-th epoch and after the last (airbench94 evaluates once,
    at the end); the other epochs' reports carry no metrics."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    compile: bool = False
    # No CUDA-graph modes (reduce-overhead, max-autotune): a replay overwrites the outputs of
    # the previous one, and the step's outputs are the next step's state (seen on an H100).
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    seed: int = attrs.field(default=0, validator=_seed)
    plugins: tuple[Plugin, ...] = ()
    source: str | None = None
    """The recipe file this recipe came from (absolute path), None for a registered recipe:
    a run of it resumes only when the user names that file again."""

    def plugin(self, name: str) -> Plugin | None:
        """The plugin instance with this name, if the recipe has one."""
        return next((p for p in self.plugins if p.name == name), None)

    def piece(self, label: str) -> Ref | None:
        """The augmentation piece with this label, if the chain has one."""
        return next((p for p in self.augment if p.label == label), None)


def field_names(cls: type) -> list[str]:
    """The fields a user may set on an attrs class."""
    return [
        f.name for f in attrs.fields(cls) if f.init and f.name not in ("plugins", "name", "source")
    ]
