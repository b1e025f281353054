"""Bring your own model and data: a recipe file's model through run, resume and eval, and a
regression on tensors with an MLP, end to end on the public API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hooktrain import Recipe, Ref, from_tensors, load_checkpoint, train
from hooktrain.config.overrides import apply_overrides
from hooktrain.config.registry import load_recipe_module
from hooktrain.data.image_folders import load_image_folder
from hooktrain.errors import HooktrainError
from hooktrain.plugins.checkpoint import Checkpoint
from hooktrain.plugins.metrics import Metrics

SMALL_CNN = """
import attrs
from torch import nn

from hooktrain import Ref, load_recipe


def small_cnn(num_classes: int, in_channels: int, width: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
    )


recipe = attrs.evolve(load_recipe("resnet9_cifar10"), name="small_cnn", model=Ref(small_cnn))
"""


def _hooktrain(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "hooktrain", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_a_recipe_files_own_model_runs_resumes_and_evaluates(
    tmp_path: Path, tiny_cifar: Path
) -> None:
    path = tmp_path / "small_cnn.py"
    path.write_text(SMALL_CNN)
    base, module = load_recipe_module(str(path))
    sets = ["model.width=4", "epochs=2", "batch_size=40", "metrics.progress=false"]
    recipe = apply_overrides(base, sets, recipe_module=module)
    out = tmp_path / "run"
    train(recipe, out_dir=out, data_dir=tiny_cifar, device="cpu", stop_after_epoch=1)
    assert load_checkpoint(out / "checkpoints" / "last.pt")["state"]["epoch"] == 1

    refused = _hooktrain("resume", str(out))
    assert refused.returncode == 2 and "--recipe" in refused.stderr
    resumed = _hooktrain("resume", str(out), "--recipe", str(path))
    assert resumed.returncode == 0, resumed.stderr
    assert "epoch 2/2" in resumed.stdout
    evaluated = _hooktrain("eval", str(out / "checkpoints" / "last.pt"), "--recipe", str(path))
    assert evaluated.returncode == 0, evaluated.stderr
    assert "test accuracy" in evaluated.stdout
    payload = load_checkpoint(out / "checkpoints" / "last.pt")
    assert payload["config"]["recipe"]["model"]["factory"].endswith(":small_cnn")
    assert payload["state"]["params"]["0.weight"].shape == (4, 3, 3, 3)


def test_a_regression_on_tensors_learns_with_an_mlp(tmp_path: Path) -> None:
    """A linear target with noise 0.1: the MLP's test MSE falls from about the targets'
    variance (2.9 here) to near the noise floor within five epochs."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 8, generator=generator)
    y = x @ torch.linspace(-1, 1, 8) + 0.1 * torch.randn(1200, generator=generator)
    splits = from_tensors((x[:1000], y[:1000]), (x[1000:], y[1000:]))
    recipe = Recipe(
        name="linear",
        model=Ref("mlp", hidden=(32,)),
        data=Ref(lambda: splits),
        task=Ref("regression"),
        epochs=5,
        batch_size=100,
        max_lr=0.01,
        plugins=(Metrics(tensorboard=False, progress=False), Checkpoint()),
    )
    trained = train(recipe, out_dir=tmp_path / "run", device="cpu", echo=lambda line: None)
    variance = float(y[1000:].var())
    assert trained.report["test_mse"] < variance / 10
    predictions = trained.model(x[1000:]).squeeze(1).detach()
    assert abs(float(((predictions - y[1000:]) ** 2).mean()) - trained.report["test_mse"]) < 1e-4
    assert set(trained.report.metrics) == {"test_loss", "test_mse", "test_mae"}


def test_a_validation_split_is_held_out_reported_and_chooses_best(
    tmp_path: Path, tiny_cifar: Path
) -> None:
    """With val_split, every epoch reports validation beside test, the held-out images never
    train (fewer steps an epoch), and best.pt holds the epoch with the best validation
    accuracy, not the best test accuracy."""
    sets = ["model.width=4", "epochs=3", "batch_size=40", "val_split=0.25"]
    recipe = apply_overrides(load_recipe_module("resnet9_cifar10")[0], sets)
    out = tmp_path / "run"
    trained = train(recipe, out_dir=out, data_dir=tiny_cifar, device="cpu", echo=lambda _: None)
    assert {"val_accuracy", "val_loss", "test_accuracy", "test_loss"} <= set(trained.report.metrics)
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["config"]["recipe"]["val_split"] == 0.25
    assert last["config"]["run"]["steps_per_epoch"] == 180 // 40  # 240 images, 60 held out
    history = last["plugins"]["metrics"]["history"]
    best_epoch = max(history, key=lambda epoch: epoch["val_accuracy"])["epoch"]
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert best["state"]["epoch"] == best_epoch
    assert best["plugins"]["checkpoint"]["best_score"] == max(e["val_accuracy"] for e in history)


def test_image_folder_data_without_a_folder_says_to_pass_one() -> None:
    with pytest.raises(HooktrainError, match="pass --data-dir pointing at a folder"):
        load_image_folder(None)
