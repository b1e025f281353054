"""Models, used by the engine only as shapes for ``torch.func.functional_call``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from hooktrain.errors import HooktrainError
from hooktrain.models.layers import Dropout, hashed_uniform, shard_randomness
from hooktrain.models.resnet9 import resnet9

if TYPE_CHECKING:
    from hooktrain.config.recipe import Recipe

__all__ = [
    "MODELS",
    "Dropout",
    "build_model",
    "hashed_uniform",
    "recipe_model",
    "resnet9",
    "shard_randomness",
]


MODELS: dict[str, Callable[..., nn.Module]] = {"resnet9": resnet9}


def build_model(name: str, num_classes: int, **options: Any) -> nn.Module:
    """The model a recipe names; ``options`` are the recipe's model fields (width, dropout,
    conv_bias, logit_scale), which every model in :data:`MODELS` accepts."""
    if name not in MODELS:
        raise HooktrainError(
            f"Unknown model {name!r}; set model to one of {', '.join(sorted(MODELS))}."
        )
    return MODELS[name](num_classes=num_classes, **options)


def recipe_model(recipe: Recipe, num_classes: int) -> nn.Module:
    """The model a recipe names, built with the recipe's model fields."""
    return build_model(
        recipe.model,
        num_classes,
        width=recipe.width,
        dropout=recipe.dropout,
        conv_bias=recipe.conv_bias,
        logit_scale=recipe.logit_scale,
    )
