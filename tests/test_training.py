"""Whole runs: learning on real images, exact resume, a separately installed plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hooktrain.cli import main
from hooktrain.config.overrides import apply_overrides
from hooktrain.config.registry import load_recipe
from hooktrain.run.checkpoints import load_checkpoint
from hooktrain.run.loop import train

EXAMPLE_PLUGIN = Path(__file__).parent / "example_plugin"
TINY = ["model.width=4", "batch_size=40", "eval_batch_size=100"]


def invoke(*args: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_learns_real_cifar10_through_the_cli(cifar_dir: Path, tmp_path: Path) -> None:
    """A width-16 ResNet-9 on 5,000 real training images for 250 steps: far above chance."""
    out = tmp_path / "run"
    sets = ["model.width=16", "epochs=5", "train_limit=5000", "batch_size=100"]
    sets += ["metrics.log_every=10"]
    output = invoke(
        "run", "resnet9_cifar10", "--data-dir", cifar_dir, "--out", out, "--device", "cpu",
        *(arg for s in sets for arg in ("--set", s)),
    )  # fmt: skip
    summary = json.loads((out / "metrics.json").read_text())
    epochs = summary["epochs"]
    print(output)
    assert summary["finished"] and len(epochs) == 5
    # All 10,000 test images, 10 classes: chance is 10%.
    assert summary["final_test_accuracy"] >= 0.45
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"] - 0.5
    assert f"{summary['final_test_accuracy']:.2%}" in output

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "test/accuracy", "test/loss"} <= scalars
    assert "train/augmented_batch" in events.Tags()["images"]
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert max(lrs) == pytest.approx(0.01, rel=0.05)  # one-cycle peak reaches max_lr
    assert lrs[-1] < 1e-4  # and anneals to nearly nothing
    accuracy = [e.value for e in events.Scalars("test/accuracy")]
    assert accuracy[-1] == pytest.approx(summary["final_test_accuracy"])
    assert any("hparams" in tag for tag in events.summary_metadata)


def test_resume_after_one_epoch_equals_an_uninterrupted_run(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    """2 epochs straight == 1 epoch, stop, `hooktrain resume`, 1 more; bit for bit on the CPU.

    The flagship recipe keeps dropout 0.2, so the global RNG state must be restored too.
    """
    recipe = apply_overrides(load_recipe("resnet9_cifar10"), [*TINY, "epochs=2"])
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(recipe, out_dir=straight, data_dir=tiny_cifar, device="cpu")
    train(recipe, out_dir=split, data_dir=tiny_cifar, device="cpu", stop_after_epoch=1)
    assert load_checkpoint(split / "checkpoints" / "last.pt")["state"]["epoch"] == 1
    assert "resuming" in invoke("resume", split)

    expected = load_checkpoint(straight / "checkpoints" / "last.pt")
    resumed = load_checkpoint(split / "checkpoints" / "last.pt")
    assert resumed["state"]["step"] == expected["state"]["step"] == 2 * 240 // 40
    for part in ("params", "buffers"):
        for name, tensor in expected["state"][part].items():
            assert torch.equal(resumed["state"][part][name], tensor), f"{part} {name} differs"
    for key in ("exp_avg", "exp_avg_sq"):
        for ours, theirs in zip(
            resumed["state"]["opt_state"][key], expected["state"]["opt_state"][key], strict=True
        ):
            assert torch.equal(ours, theirs)

    def figures(run: Path) -> list[tuple]:
        history = json.loads((run / "metrics.json").read_text())["epochs"]
        return [(e["epoch"], e["step"], e["train_loss"], e["test_accuracy"]) for e in history]

    assert figures(split) == figures(straight)


def test_installed_third_party_plugin_is_listed_and_used(tiny_cifar: Path, tmp_path: Path) -> None:
    """The example package in tests/example_plugin, installed by pip, found by entry point."""
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(EXAMPLE_PLUGIN)],
        check=True,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}

    def hooktrain(*args: object) -> str:
        command = [sys.executable, "-m", "hooktrain", *map(str, args)]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout

    listing = hooktrain("list")
    assert "focal_loss" in listing and "the focal loss (Lin et al., 2017)" in listing
    assert "per_class_accuracy" in listing

    runs = {}
    with_plugin = ["--with", "focal_loss", "--set", "focal_loss.gamma=1.5"]
    with_plugin += ["--with", "per_class_accuracy"]
    for name, extra in (("plain", []), ("focal", with_plugin)):
        runs[name] = tmp_path / name
        hooktrain(
            "run", "resnet9_cifar10", "--data-dir", tiny_cifar, "--out", runs[name],
            "--device", "cpu", "--set", "epochs=1", *(a for s in TINY for a in ("--set", s)),
            *extra,
        )  # fmt: skip
    config = json.loads((runs["focal"] / "config.json").read_text())
    plugin = next(p for p in config["plugins"] if p["name"] == "focal_loss")
    assert plugin["settings"] == {"gamma": 1.5}

    def train_loss(run: Path) -> float:
        return json.loads((run / "metrics.json").read_text())["epochs"][0]["train_loss"]

    # Same seed, data and plugins otherwise: a different loss means the plugin's loss was used.
    assert abs(train_loss(runs["focal"]) - train_loss(runs["plain"])) > 1e-3
    # The per-class accuracies join the report; the overall accuracy is their weighted mean.
    epoch = json.loads((runs["focal"] / "metrics.json").read_text())["epochs"][0]
    per_class = [epoch[f"test_class_{c}_accuracy"] for c in range(10)]
    assert min(per_class) <= epoch["test_accuracy"] <= max(per_class)
    assert all(0 <= value <= 1 for value in per_class)
