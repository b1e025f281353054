"""The built-in recipes that bring their own model or data learn on real images.

ResNet-18 (torchvision's, 32x32 stem) on CIFAR-10, ResNet-9 on a folder of photos of other
sizes and classes, and an MLP regressing colour statistics from a table made of CIFAR-10 in
the recipe's own module. Each small setting must beat its baseline by a margin measured
beforehand over seeds; the figures are in each test's docstring.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image
from torch import nn

import hooktrain.models.resnet18 as resnet18_module
from hooktrain.cli import main
from hooktrain.config.overrides import apply_overrides
from hooktrain.config.recipe import CIFAR10_MEAN, CIFAR10_STD, Recipe
from hooktrain.config.registry import load_recipe_module
from hooktrain.core.context import Trained
from hooktrain.data.sources import load_cifar10
from hooktrain.recipes.mlp_tabular import cifar10_colour, colour_table
from hooktrain.run.checkpoints import load_checkpoint
from hooktrain.run.loop import train, train_seeds

QUIET = ["metrics.progress=false", "metrics.tensorboard=false"]
PHOTO_CLASSES = ("airplane", "cat", "ship")
PHOTO_SIZES = (40, 48, 64)  # side lengths, in turn: the recipe resizes them all to 48x48


def sorted_jpegs(folder: Path, count: int) -> list[Path]:
    return sorted(folder.glob("*.jpg"))[:count]


def resized_copies(source: Path, target: Path, count: int, first: int) -> None:
    """The first ``count`` JPEGs of ``source`` into ``target``, upscaled to the sizes of
    PHOTO_SIZES in turn, starting at the ``first``-th."""
    target.mkdir(parents=True)
    for index, path in enumerate(sorted_jpegs(source, count)):
        side = PHOTO_SIZES[(first + index) % len(PHOTO_SIZES)]
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
        resized.save(target / f"{index:04d}.jpg", quality=95)


@pytest.fixture(scope="module")
def cifar_subset(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real CIFAR-10 as image folders: 200 training and 100 test images of each class."""
    root = tmp_path_factory.mktemp("cifar_subset")
    for split, count in (("train", 200), ("test", 100)):
        for folder in sorted((cifar_dir / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for path in sorted_jpegs(folder, count):
                shutil.copyfile(path, root / split / folder.name / path.name)
    return root


@pytest.fixture(scope="module")
def photo_folder(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of real photos (CIFAR-10's airplanes, cats and ships upscaled to 40, 48 and
    64 pixels in turn): 300 training and 100 test images each."""
    root = tmp_path_factory.mktemp("photos")
    for split, count in (("train", 300), ("test", 100)):
        for offset, name in enumerate(PHOTO_CLASSES):
            resized_copies(cifar_dir / split / name, root / split / name, count, offset)
    return root


def recipe_with(name: str, *settings: str) -> Recipe:
    base, module = load_recipe_module(name)
    return apply_overrides(base, [*settings, *QUIET], recipe_module=module)


def run_recipe(name: str, data_dir: Path, out: Path, *settings: str) -> Trained:
    recipe = recipe_with(name, *settings)
    return train(recipe, out_dir=out, data_dir=data_dir, device="cpu", echo=lambda line: None)


def model_facts(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())["run"]["model_facts"]


# --------------------------------------------------------------------------------------------
# ResNet-18 on CIFAR-10
# --------------------------------------------------------------------------------------------


def lightning_resnet18() -> nn.Module:
    """The reference: the Lightning CIFAR-10 baseline's ``create_model``, on torchvision."""
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def test_resnet18_at_width_64_is_torchvisions_with_a_small_image_stem(cifar_subset: Path) -> None:
    """Same parameters and buffers by name and shape, and with the same weights the same outputs
    and BatchNorm statistics as torchvision's resnet18 adapted as the Lightning baseline adapts
    it. Float64: both run the same layers in the same order, so they agree to rounding."""
    torch.manual_seed(0)
    ours = resnet18_module.resnet18(num_classes=10).double()
    theirs = lightning_resnet18().double()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in theirs.state_dict().items()
    ]
    theirs.load_state_dict(ours.state_dict())
    images = load_cifar10(cifar_subset, echo=lambda line: None).test.inputs[::250]
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    x = ((images / 255 - mean) / std).permute(0, 3, 1, 2).double()
    for mode in (True, False):  # train mode first: the batch updates the running statistics
        ours.train(mode)
        theirs.train(mode)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-12)
    mine = ours.state_dict()
    for name, reference in theirs.state_dict().items():
        torch.testing.assert_close(mine[name], reference, rtol=0, atol=1e-12, msg=name)
    assert ours.state_dict()["layer4.1.bn2.num_batches_tracked"] == 1

    small = resnet18_module.resnet18(num_classes=3, in_channels=1, width=8, zero_init_residual=True)
    assert small(torch.zeros(2, 1, 32, 32)).shape == (2, 3)
    assert small.fc.in_features == 64 and all(small.layer2[1].bn2.weight == 0)


def test_resnet18_recipe_learns_cifar10(cifar_subset: Path, tmp_path: Path) -> None:
    """Width 8, 2,000 real training images, 3 epochs (93 steps): test accuracy on 1,000 images
    measured 0.30-0.36 over seeds 0-5 (mean 0.33, std 0.02); chance is 0.10."""
    trained = run_recipe(
        "resnet18_cifar10", cifar_subset, tmp_path / "run", "model.width=8", "epochs=3"
    )
    assert trained.report is not None and trained.report.step == 93
    assert trained.report["test_accuracy"] >= 0.20
    assert model_facts(tmp_path / "run")["num_classes"] == 10


@pytest.mark.usefixtures("float64_training")
def test_resnet18_seeds_train_together_as_they_train_alone(
    tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two seeds in one vmapped step (what --parallel-seeds runs) end where each seed trained
    alone ends, BatchNorm's running statistics and num_batches_tracked included. Float64:
    measured agreement 4e-16, so 1e-9 leaves room for other CPUs and nothing for a bug."""
    factory = resnet18_module.resnet18

    @functools.wraps(factory)  # the same signature: the run passes it the facts it declares
    def double_resnet18(**args: object) -> nn.Module:
        return factory(**args).double()

    monkeypatch.setattr(resnet18_module, "resnet18", double_resnet18)
    settings = ["model.width=4", "epochs=1", "batch_size=40", "train_limit=160"]
    quiet = {"data_dir": tiny_cifar, "device": "cpu", "echo": lambda line: None}
    together = [tmp_path / "seed0", tmp_path / "seed1"]
    train_seeds(recipe_with("resnet18_cifar10", *settings), [0, 1], out_dirs=together, **quiet)
    finals = []
    for seed, out in enumerate(together):
        alone = tmp_path / f"alone{seed}"
        train(recipe_with("resnet18_cifar10", *settings, f"seed={seed}"), out_dir=alone, **quiet)
        ours = load_checkpoint(out / "checkpoints" / "last.pt")["state"]
        reference = load_checkpoint(alone / "checkpoints" / "last.pt")["state"]
        counts = [v for k, v in ours["buffers"].items() if k.endswith("num_batches_tracked")]
        assert len(counts) == 20 and all(count == 4 for count in counts)  # 4 steps of 40
        for part in ("params", "buffers"):
            for name, tensor in reference[part].items():
                torch.testing.assert_close(ours[part][name], tensor, rtol=0, atol=1e-9, msg=name)
        finals.append(ours["params"]["fc.weight"])
    assert not torch.allclose(*finals)  # the seeds did train apart


# --------------------------------------------------------------------------------------------
# ResNet-9 on a folder of photos
# --------------------------------------------------------------------------------------------


def test_image_folder_recipe_learns_three_classes_at_48_pixels(
    photo_folder: Path, tmp_path: Path
) -> None:
    """Width 8, 900 photos of 40, 48 and 64 pixels resized to 48, 4 epochs (56 steps): test
    accuracy on 300 photos measured 0.65-0.73 over seeds 0-5 (mean 0.70, std 0.03); chance is
    0.33."""
    trained = run_recipe(
        "resnet9_image_folder", photo_folder, tmp_path / "run", "model.width=8", "epochs=4"
    )
    assert trained.report is not None and trained.report["test_accuracy"] >= 0.55
    facts = model_facts(tmp_path / "run")
    assert facts["num_classes"] == 3 and facts["input_shape"] == [3, 48, 48]


# --------------------------------------------------------------------------------------------
# An MLP on a table made in the recipe's module
# --------------------------------------------------------------------------------------------


def test_colour_table_is_the_thumbnail_and_each_channels_mean_and_std(cifar_subset: Path) -> None:
    """Against numpy on the loader's images, both in float64 then rounded to float32: they may
    differ by one float32 rounding step (6e-8 below 1)."""
    images = load_cifar10(cifar_subset, echo=lambda line: None).test.inputs
    features, targets = colour_table(images)
    pixels = images.numpy().astype(np.float64) / 255
    thumbnail = pixels.reshape(-1, 4, 8, 4, 8, 3).mean(axis=(2, 4)).transpose(0, 3, 1, 2)
    flat = pixels.reshape(len(pixels), -1, 3)
    expected = np.concatenate([flat.mean(axis=1), flat.std(axis=1)], axis=1)
    assert features.shape == (1000, 48) and targets.shape == (1000, 6)
    torch.testing.assert_close(features, torch.from_numpy(thumbnail.reshape(-1, 48)).float(),
                               rtol=0, atol=6e-8)  # fmt: skip
    torch.testing.assert_close(targets, torch.from_numpy(expected).float(), rtol=0, atol=6e-8)


def test_mlp_recipe_learns_the_colour_statistics(cifar_subset: Path, tmp_path: Path) -> None:
    """2,000 rows, 30 epochs of 100 (600 steps). Predicting the training mean scores a test MSE
    of 0.0112 (the targets' variance); the MLP measured 0.00061-0.00067 over seeds 0-3. On the
    three standard deviations, which the thumbnail does not determine, a least-squares linear
    fit scores 0.0031-0.0033 each and the MLP measured 0.0010-0.0014."""
    settings = ["epochs=30", "batch_size=100"]
    trained = run_recipe("mlp_tabular", cifar_subset, tmp_path / "run", *settings)
    table = cifar10_colour(cifar_subset, echo=lambda line: None)
    x, y = table.train.inputs, table.train.targets
    x_test, y_test = table.test.inputs, table.test.targets
    variance = (y_test - y.mean(dim=0)).square().mean()
    assert trained.report is not None and trained.report["test_mse"] < 0.1 * variance

    with torch.no_grad():
        errors = (trained.model(x_test) - y_test).square().mean(dim=0)
    torch.testing.assert_close(errors.mean(), torch.tensor(trained.report["test_mse"]),
                               rtol=1e-4, atol=0)  # fmt: skip
    ones = torch.ones(len(x), 1, dtype=torch.float64)
    weights = torch.linalg.lstsq(torch.cat([x.double(), ones], 1), y.double()).solution
    linear = torch.cat([x_test.double(), ones[: len(x_test)]], 1) @ weights
    linear_errors = (linear - y_test.double()).square().mean(dim=0)
    assert (errors[3:] < 0.6 * linear_errors[3:]).all(), (errors, linear_errors)


def test_mlp_recipe_resumes_its_own_data_source(cifar_subset: Path, tmp_path: Path) -> None:
    """config.json names the recipe module's function; `hooktrain resume` finds it through the
    registered recipe of that name and ends bit for bit where an uninterrupted run ends."""
    recipe = recipe_with("mlp_tabular", "epochs=3", "batch_size=100")
    straight, split = tmp_path / "straight", tmp_path / "split"
    quiet = {"data_dir": cifar_subset, "device": "cpu", "echo": lambda line: None}
    train(recipe, out_dir=straight, **quiet)
    train(recipe, out_dir=split, stop_after_epoch=1, **quiet)
    saved = json.loads((split / "config.json").read_text())["recipe"]["data"]
    assert saved["factory"] == "hooktrain.recipes.mlp_tabular:cifar10_colour"

    result = CliRunner().invoke(main, ["resume", str(split)], catch_exceptions=False)
    assert result.exit_code == 0 and "resuming" in result.output, result.output
    expected = load_checkpoint(straight / "checkpoints" / "last.pt")["state"]
    resumed = load_checkpoint(split / "checkpoints" / "last.pt")["state"]
    assert resumed["step"] == expected["step"] == 60
    for name, tensor in expected["params"].items():
        assert torch.equal(resumed["params"][name], tensor), name


# --------------------------------------------------------------------------------------------
# Through the command line
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "settings", "factories", "facts"),
    [
        ("resnet18_cifar10", "cifar", ["model.width=4", "epochs=1", "train_limit=256"],
         ("resnet18", "cifar10"), (10, [3, 32, 32])),
        ("resnet9_image_folder", "photos", ["model.width=4", "epochs=1"],
         ("resnet9", "image_folder"), (3, [3, 48, 48])),
        ("mlp_tabular", "cifar", ["epochs=1", "batch_size=100"],
         ("mlp", "hooktrain.recipes.mlp_tabular:cifar10_colour"), (None, [48])),
    ],
)  # fmt: skip
def test_each_recipe_runs_through_the_cli(
    name: str,
    data: str,
    settings: list[str],
    factories: tuple[str, str],
    facts: tuple[int | None, list[int]],
    cifar_subset: Path,
    photo_folder: Path,
    tmp_path: Path,
) -> None:
    data_dir = {"cifar": cifar_subset, "photos": photo_folder}[data]
    out = tmp_path / "run"
    sets = [arg for setting in [*settings, *QUIET] for arg in ("--set", setting)]
    command = ["run", name, "--data-dir", str(data_dir), "--out", str(out), "--device", "cpu"]
    result = CliRunner().invoke(main, [*command, *sets], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"]["name"] == name
    assert (config["recipe"]["model"]["factory"], config["recipe"]["data"]["factory"]) == factories
    run_facts = config["run"]["model_facts"]
    assert (run_facts["num_classes"], run_facts["input_shape"]) == facts
    assert json.loads((out / "metrics.json").read_text())["finished"]
    assert name in CliRunner().invoke(main, ["list"]).output
