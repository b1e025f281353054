"""What the airbench tests share: real images normalised as airbench does, airbench's network
put together from its own classes on the CPU, and a copy of its weights in hooktrain's model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from airbench.lib_airbench94 import Conv, ConvGroup, Flatten, Mul, hyp
from torch import Tensor, nn
from torchvision.io import decode_jpeg, read_file

from hooktrain.config.overrides import apply_overrides
from hooktrain.config.registry import load_recipe
from hooktrain.core.plugin import make_plugin_manager
from hooktrain.core.state import TrainState
from hooktrain.core.step import StepFn, build_step
from hooktrain.core.task import Classification
from hooktrain.models.airbench import airbench_net
from hooktrain.recipes.airbench94 import AIRBENCH_MEAN, AIRBENCH_STD
from hooktrain.run.build import build_context, compose_pieces

WIDTH = 4  # groups of 4, 16 and 16 channels
BATCH, STEPS_PER_EPOCH, EPOCHS = 32, 3, 4
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS  # Lookahead pulls at steps 5 and 10, ends on 12
WHITEN_BIAS_EPOCHS = 1  # the whitening bias trains for 3 steps, then freezes
SEQUENTIAL_NAMES = {"0": "whiten", "2": "block1", "3": "block2", "4": "block3", "7": "head"}


def load_normalized_images(cifar_dir: Path) -> tuple[Tensor, Tensor]:
    """The first 40 training images of each class, normalised as airbench does, with labels."""
    classes = sorted(folder.name for folder in (cifar_dir / "train").iterdir())
    pixels, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((cifar_dir / "train" / name).iterdir())[:40]:
            pixels.append(decode_jpeg(read_file(str(path))))
            labels.append(label)
    images = torch.stack(pixels).float() / 255
    mean, std = torch.tensor(AIRBENCH_MEAN), torch.tensor(AIRBENCH_STD)
    return (images - mean[:, None, None]) / std[:, None, None], torch.tensor(labels)


def airbench_network(
    dtype: torch.dtype, logit_scale: float = hyp["net"]["scaling_factor"]
) -> nn.Sequential:
    """``make_net94``'s layers, airbench's own classes, on the CPU in ``dtype``."""
    momentum = hyp["net"]["batchnorm_momentum"]
    widths = (WIDTH, 4 * WIDTH, 4 * WIDTH)
    torch.manual_seed(0)
    net = nn.Sequential(
        Conv(3, 24, 2, padding=0, bias=True),
        nn.GELU(),
        ConvGroup(24, widths[0], momentum),
        ConvGroup(widths[0], widths[1], momentum),
        ConvGroup(widths[1], widths[2], momentum),
        nn.MaxPool2d(3),
        Flatten(),
        nn.Linear(widths[2], 10, bias=False),
        Mul(logit_scale),
    )
    net[0].weight.requires_grad = False
    return net.to(dtype)


def ours_from(reference: nn.Sequential, **model_args: Any) -> nn.Module:
    """hooktrain's ``airbench_net`` holding the reference's weights and statistics."""
    model = airbench_net(width=WIDTH, **model_args).to(next(reference.parameters()).dtype)
    loaded = {}
    for key, value in reference.state_dict().items():
        index, _, rest = key.partition(".")
        if "norm" in rest and rest.endswith("weight"):
            assert bool((value == 1).all()), "airbench's BatchNorm scales are frozen at 1"
            continue
        loaded[f"{SEQUENTIAL_NAMES[index]}.{rest}"] = value
    model.load_state_dict(loaded)  # strict: every tensor of ours comes from airbench's
    return model


def batches_of(images: tuple[Tensor, Tensor], dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    x, y = images
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order].to(dtype), y[order]
    return [
        (x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]) for i in range(TOTAL_STEPS)
    ]


def recipe_step(name: str, model: nn.Module, *settings: str) -> tuple[TrainState, StepFn, str]:
    """The recipe's step for ``model``, built from its plugins as a run builds it, at the
    tests' batch size and length; its first state and its chain, described."""
    recipe = apply_overrides(
        load_recipe(name),
        [
            f"batch_size={BATCH}",
            f"epochs={EPOCHS}",
            f"freeze.epochs={WHITEN_BIAS_EPOCHS}",
            *settings,
        ],
    )
    manager = make_plugin_manager(recipe.plugins)
    build = build_context(recipe, model, STEPS_PER_EPOCH, Classification(), {}, manager)
    pieces = compose_pieces(manager, build, model, None)
    return (
        TrainState.create(model, pieces.chain, seed=0),
        build_step(pieces),
        pieces.chain.describe(),
    )
