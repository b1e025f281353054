"""hooktrain: a functional, plugin-driven training engine for PyTorch.

The names below are what plugins and recipes need. They load on first use, so the command
line answers ``--help`` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The one place the version is written: pyproject.toml reads it from here (setuptools' dynamic
# version), so a checkout on PYTHONPATH and an installed copy say the same.
__version__ = "0.1.0"

if TYPE_CHECKING:
    from hooktrain.engine.ablation import Ablation
    from hooktrain.engine.ablation_runner import run_ablation
    from hooktrain.engine.context import BuildContext, EpochReport, RunContext
    from hooktrain.engine.hookspecs import hookimpl
    from hooktrain.engine.loop import train, train_seeds
    from hooktrain.engine.pieces import DecayRule, GradientTransform, LossFn, LRSchedule, Replicas
    from hooktrain.engine.plugin import Plugin
    from hooktrain.engine.recipe import Recipe
    from hooktrain.engine.state import TrainState
    from hooktrain.errors import HooktrainError

_EXPORTS = {
    "Ablation": "hooktrain.engine.ablation",
    "run_ablation": "hooktrain.engine.ablation_runner",
    "BuildContext": "hooktrain.engine.context",
    "EpochReport": "hooktrain.engine.context",
    "RunContext": "hooktrain.engine.context",
    "hookimpl": "hooktrain.engine.hookspecs",
    "train": "hooktrain.engine.loop",
    "train_seeds": "hooktrain.engine.loop",
    "DecayRule": "hooktrain.engine.pieces",
    "GradientTransform": "hooktrain.engine.pieces",
    "LossFn": "hooktrain.engine.pieces",
    "LRSchedule": "hooktrain.engine.pieces",
    "Replicas": "hooktrain.engine.pieces",
    "Plugin": "hooktrain.engine.plugin",
    "Recipe": "hooktrain.engine.recipe",
    "TrainState": "hooktrain.engine.state",
    "HooktrainError": "hooktrain.errors",
}
__all__ = [  # noqa: RUF022 - grouped as _EXPORTS is
    "Ablation",
    "run_ablation",
    "BuildContext",
    "EpochReport",
    "RunContext",
    "hookimpl",
    "train",
    "train_seeds",
    "DecayRule",
    "GradientTransform",
    "LossFn",
    "LRSchedule",
    "Replicas",
    "Plugin",
    "Recipe",
    "TrainState",
    "HooktrainError",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hooktrain' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
