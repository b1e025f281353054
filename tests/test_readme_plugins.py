"""The README's "Write a plugin": every example runs as printed, each kind doing its job."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import attrs
import pytest
import torch

from hooktrain import Plugin, apply_overrides, load_recipe, train
from hooktrain.core.pieces import Draws

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = ["model.width=4", "batch_size=40", "eval_batch_size=100", "metrics.progress=false"]


@pytest.fixture
def readme_plugins(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The section's Python blocks run in order as one module (importable, as config.json
    names a plugin's class by its module)."""
    text = README.read_text()
    section = text[text.index("## Write a plugin") : text.index("## Write a recipe")]
    module = types.ModuleType("readme_plugins")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for block in re.findall(r"```python\n(.*?)```", section, re.S):
        exec(compile(block, str(README), "exec"), module.__dict__)
    return module


def test_every_kind_of_plugin_is_shown(readme_plugins: types.ModuleType) -> None:
    plugins = {
        name: value
        for name, value in vars(readme_plugins).items()
        if isinstance(value, type) and issubclass(value, Plugin) and value is not Plugin
    }
    hooks = {
        hook for cls in plugins.values() for hook in vars(cls) if hook.startswith("hooktrain_")
    }
    assert hooks >= {
        "hooktrain_loss",
        "hooktrain_gradient_transform",
        "hooktrain_optimizer",
        "hooktrain_batch_transform",
        "hooktrain_wrap_gradients",
        "hooktrain_initial_params",
        "hooktrain_eval_outputs",
        "hooktrain_eval_metrics",
        "hooktrain_should_stop",
    }


def test_the_readme_plugins_together_train_report_and_stop(
    readme_plugins: types.ModuleType, tiny_cifar: Path, tmp_path: Path
) -> None:
    m = readme_plugins
    extra = (
        m.FocalLoss(),
        m.AdaptiveClip(),
        m.Signum(),
        m.InputNoise(),
        m.MirrorAverage(),
        m.ZeroHead(),
        m.PerClassAccuracy(),
        m.StopAtAccuracy(target=0.0),  # reached at the first epoch's end
    )
    recipe = apply_overrides(load_recipe("resnet9_cifar10"), [*TINY, "epochs=3", "max_lr=0.001"])
    recipe = attrs.evolve(recipe, plugins=(*recipe.plugins, *extra))
    lines: list[str] = []
    trained = train(
        recipe, out_dir=tmp_path / "run", data_dir=tiny_cifar, device="cpu", echo=lines.append
    )

    assert any("adaptive_clip" in line and line.endswith("-> signum") for line in lines), lines
    assert trained.report.epoch == 1, "StopAtAccuracy ends the run after its first epoch"
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["finished"] and summary["stop_reason"] == "test accuracy reached 0%"
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["run"]["finished"] and config["run"]["stop_reason"] == summary["stop_reason"]
    per_class = [trained.report[f"test_class_{c}_accuracy"] for c in range(10)]
    assert min(per_class) <= trained.report["test_accuracy"] <= max(per_class)
    # AdaptiveClip's running mean norm is state: in the training state, positive after a step.
    assert float(trained.state.transforms["adaptive_clip"]["mean_norm"]) > 0
    assert torch.isfinite(torch.tensor(trained.report.train_loss))


def test_zero_head_zeroes_the_classifier_only(readme_plugins: types.ModuleType) -> None:
    params = {
        "conv.weight": torch.ones(4, 3, 3, 3),
        "fc.weight": torch.ones(10, 4),
        "fc.bias": torch.ones(10),
    }
    answer = readme_plugins.ZeroHead().hooktrain_initial_params(params=params)
    assert answer.keys() == {"fc.weight"} and not answer["fc.weight"].any()


def test_input_noise_is_bounded_and_differs_by_key(readme_plugins: types.ModuleType) -> None:
    noise = readme_plugins.InputNoise(amount=0.1).hooktrain_batch_transform(build=None)
    x, y = torch.zeros(8, 3, 4, 4), torch.arange(8)
    first, same_y = noise(x, y, Draws(torch.tensor([5, 0])))
    again, _ = noise(x, y, Draws(torch.tensor([5, 0])))
    later, _ = noise(x, y, Draws(torch.tensor([5, 1])))
    assert torch.equal(first, again) and not torch.equal(first, later)
    assert first.abs().max() <= 0.1 and first.abs().max() > 0.05 and same_y is y
