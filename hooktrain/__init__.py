"""hooktrain: a functional, plugin-driven training engine for PyTorch.

The names below are what recipes, plugins and notebooks need. They load on first use, so the
command line answers ``--help`` without importing torch.
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
    from hooktrain.config.overrides import apply_overrides
    from hooktrain.config.recipe import Recipe
    from hooktrain.config.ref import Ref
    from hooktrain.config.registry import load_recipe
    from hooktrain.core.context import BuildContext, EpochReport, RunContext, Trained
    from hooktrain.core.hookspecs import hookimpl
    from hooktrain.core.optim import Optimizer
    from hooktrain.core.pieces import (
        BatchTransform,
        DecayRule,
        Draws,
        EvalViews,
        GradientFn,
        GradientTransform,
        LossFn,
        LRSchedule,
        ParamGroups,
        Replicas,
    )
    from hooktrain.core.plugin import Plugin
    from hooktrain.core.state import TrainState
    from hooktrain.core.step import GradientWrapper
    from hooktrain.core.task import Classification, Regression
    from hooktrain.data.device import Split, Splits
    from hooktrain.data.in_memory import DatasetSplits, from_datasets, from_tensors
    from hooktrain.errors import HooktrainError
    from hooktrain.run.checkpoints import load_checkpoint
    from hooktrain.run.evaluation import evaluate_checkpoint
    from hooktrain.run.loop import train, train_seeds

_EXPORTS = {
    "Ablation": "hooktrain.ablation.spec",
    "run_ablation": "hooktrain.ablation.runner",
    "apply_overrides": "hooktrain.config.overrides",
    "Recipe": "hooktrain.config.recipe",
    "Ref": "hooktrain.config.ref",
    "load_recipe": "hooktrain.config.registry",
    "BuildContext": "hooktrain.core.context",
    "EpochReport": "hooktrain.core.context",
    "RunContext": "hooktrain.core.context",
    "Trained": "hooktrain.core.context",
    "hookimpl": "hooktrain.core.hookspecs",
    "Optimizer": "hooktrain.core.optim",
    "BatchTransform": "hooktrain.core.pieces",
    "DecayRule": "hooktrain.core.pieces",
    "Draws": "hooktrain.core.pieces",
    "EvalViews": "hooktrain.core.pieces",
    "GradientFn": "hooktrain.core.pieces",
    "GradientTransform": "hooktrain.core.pieces",
    "LossFn": "hooktrain.core.pieces",
    "LRSchedule": "hooktrain.core.pieces",
    "ParamGroups": "hooktrain.core.pieces",
    "Replicas": "hooktrain.core.pieces",
    "GradientWrapper": "hooktrain.core.step",
    "Plugin": "hooktrain.core.plugin",
    "TrainState": "hooktrain.core.state",
    "Classification": "hooktrain.core.task",
    "Regression": "hooktrain.core.task",
    "Split": "hooktrain.data.device",
    "Splits": "hooktrain.data.device",
    "DatasetSplits": "hooktrain.data.in_memory",
    "from_datasets": "hooktrain.data.in_memory",
    "from_tensors": "hooktrain.data.in_memory",
    "HooktrainError": "hooktrain.errors",
    "load_checkpoint": "hooktrain.run.checkpoints",
    "evaluate_checkpoint": "hooktrain.run.evaluation",
    "train": "hooktrain.run.loop",
    "train_seeds": "hooktrain.run.loop",
}
__all__ = [  # noqa: RUF022 - grouped as _EXPORTS is
    "Ablation",
    "run_ablation",
    "apply_overrides",
    "Recipe",
    "Ref",
    "load_recipe",
    "BuildContext",
    "EpochReport",
    "RunContext",
    "Trained",
    "hookimpl",
    "Optimizer",
    "BatchTransform",
    "DecayRule",
    "Draws",
    "EvalViews",
    "GradientFn",
    "GradientTransform",
    "LossFn",
    "LRSchedule",
    "ParamGroups",
    "Replicas",
    "GradientWrapper",
    "Plugin",
    "TrainState",
    "Classification",
    "Regression",
    "Split",
    "Splits",
    "DatasetSplits",
    "from_datasets",
    "from_tensors",
    "HooktrainError",
    "load_checkpoint",
    "evaluate_checkpoint",
    "train",
    "train_seeds",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hooktrain' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
