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
    from hooktrain.ablation.runner import run_ablation
    from hooktrain.ablation.spec import Ablation
    from hooktrain.config.recipe import Recipe
    from hooktrain.core.context import BuildContext, EpochReport, RunContext
    from hooktrain.core.hookspecs import hookimpl
    from hooktrain.core.pieces import DecayRule, GradientTransform, LossFn, LRSchedule, Replicas
    from hooktrain.core.plugin import Plugin
    from hooktrain.core.state import TrainState
    from hooktrain.errors import HooktrainError
    from hooktrain.run.loop import train, train_seeds

_EXPORTS = {
    "Ablation": "hooktrain.ablation.spec",
    "run_ablation": "hooktrain.ablation.runner",
    "BuildContext": "hooktrain.core.context",
    "EpochReport": "hooktrain.core.context",
    "RunContext": "hooktrain.core.context",
    "hookimpl": "hooktrain.core.hookspecs",
    "train": "hooktrain.run.loop",
    "train_seeds": "hooktrain.run.loop",
    "DecayRule": "hooktrain.core.pieces",
    "GradientTransform": "hooktrain.core.pieces",
    "LossFn": "hooktrain.core.pieces",
    "LRSchedule": "hooktrain.core.pieces",
    "Replicas": "hooktrain.core.pieces",
    "Plugin": "hooktrain.core.plugin",
    "Recipe": "hooktrain.config.recipe",
    "TrainState": "hooktrain.core.state",
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
