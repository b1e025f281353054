"""Event plugins: early stopping and stochastic weight averaging, against hand-worked figures
and torch.optim.swa_utils, in tiny real runs (real CIFAR-10 images) through the API, the
command line, seeds in lockstep, an ablation and resume."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from click.testing import CliRunner, Result
from conftest import assert_user_error
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

from hooktrain import load_checkpoint, train, train_seeds
from hooktrain.ablation.runner import run_ablation
from hooktrain.ablation.spec import Ablation
from hooktrain.cli import main
from hooktrain.config.overrides import apply_overrides
from hooktrain.config.recipe import Recipe
from hooktrain.config.registry import load_recipe
from hooktrain.core.context import EpochReport, RunContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.state import TrainState
from hooktrain.core.task import Classification, Regression
from hooktrain.data.device import CIFAR10_CLASSES
from hooktrain.errors import HooktrainError
from hooktrain.plugins.early_stopping import EarlyStopping
from hooktrain.plugins.swa import SWA, recompute_batchnorm
from hooktrain.run.build import device_data, load_splits, recipe_model
from hooktrain.run.evaluation import evaluate_checkpoint

FLAGSHIP = "resnet9_cifar10"
# 25 of the 100 training images in a batch: 1 step an epoch; the 50 test images in one batch.
TINY = [
    "model.width=8",
    "batch_size=25",
    "train_limit=25",
    "eval_batch_size=50",
    "metrics.progress=false",
]
# No accuracy beats another by more than 1: the first epoch is the best, every later one
# fails to improve on it, whatever the run learns.
NEVER_IMPROVES = ["early_stopping.min_delta=1"]


@pytest.fixture(scope="module")
def real_images(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real CIFAR-10 JPEGs: 10 per class for training and 5 per class for testing."""
    folder = tmp_path_factory.mktemp("real_images")
    for split, count in (("train", 10), ("test", 5)):
        for name in CIFAR10_CLASSES:
            (folder / split / name).mkdir(parents=True)
            for image in sorted((cifar_dir / split / name).iterdir())[:count]:
                shutil.copyfile(image, folder / split / name / image.name)
    return folder


def tiny_recipe(*sets: str, with_plugins: tuple[str, ...] = ("early_stopping",)) -> Recipe:
    """The flagship recipe, tiny, at a constant learning rate (one-cycle wants more steps)."""
    return apply_overrides(
        load_recipe(FLAGSHIP), [*TINY, *sets], with_plugins, without_plugins=("onecycle",)
    )


def quiet(line: str) -> None:
    """Echo nothing: the runs' lines are not what these tests read."""


def run_files(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run folder's config.json and metrics.json."""
    config = json.loads((folder / "config.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    return config, metrics


def same_history(one: Path, other: Path) -> bool:
    """Whether two runs' metrics.json hold the same epochs, wall times aside."""
    histories = [run_files(folder)[1]["epochs"] for folder in (one, other)]
    untimed = [[{**e, "seconds": 0} for e in history] for history in histories]
    return untimed[0] == untimed[1]


def never_improved_reason(metrics: dict[str, Any]) -> str:
    """What early stopping says after epoch 2 of a NEVER_IMPROVES run with patience 1."""
    first = metrics["epochs"][0]["test_accuracy"]
    return f"test_accuracy did not improve on {first:.4f} by more than 1 for 1 epoch"


def run_context(recipe: Recipe, task: Any = None, **fields: Any) -> RunContext:
    """The context events see, for driving a plugin's hooks by hand."""
    fields = {
        "out_dir": Path("unused"),
        "device": torch.device("cpu"),
        "data": None,
        "task": task or Classification(),
        "steps_per_epoch": 1,
        "config": {},
        "checkpoint_payload": lambda state: {},
        "echo": quiet,
        **fields,
    }
    return RunContext(recipe=recipe, **fields)


# --------------------------------------------------------------------------------------------
# early_stopping: the rule, worked by hand
# --------------------------------------------------------------------------------------------


def stops(plugin: EarlyStopping, run: RunContext, figures: list[dict[str, float]]) -> list:
    """The plugin's answer to should_stop after each epoch of ``figures``, as the loop asks."""
    plugin.hooktrain_fit_start(run=run)
    answers = []
    for epoch, metrics in enumerate(figures, start=1):
        report = EpochReport(epoch=epoch, step=epoch, train_loss=0.0, metrics=metrics, seconds=0)
        plugin.hooktrain_epoch_end(run=run, report=report)
        answers.append(plugin.hooktrain_should_stop(run=run))
    return answers


NAN = math.nan
# (settings, val_split, task, the chosen metric's value each epoch, should_stop's answers);
# worked by hand: an epoch improves when it beats the best so far by more than min_delta.
RULE_CASES = [
    pytest.param(
        {"patience": 2},
        0.0,
        Classification(),
        [0.1, 0.2, 0.2, 0.15],
        [None, None, None, "test_accuracy did not improve on 0.2000 for 2 epochs"],
        id="accuracy-ties-do-not-improve",
    ),
    pytest.param(
        {"patience": 2, "metric": "test_loss"},
        0.0,
        Classification(),
        [1.0, 0.9, 0.95, 0.85, 0.9],
        [None, None, None, None, None],
        id="loss-lower-is-better",
    ),
    pytest.param(
        {"patience": 1, "metric": "test_loss"},
        0.0,
        Classification(),
        [1.0, 1.1],
        [None, "test_loss did not improve on 1.0000 for 1 epoch"],
        id="loss-rising",
    ),
    pytest.param(
        {"patience": 2, "min_delta": 0.05},
        0.0,
        Classification(),
        # 0.54 is within min_delta of 0.5; 0.56 beats it by more; 0.57 and 0.6 do not
        [0.5, 0.54, 0.56, 0.57, 0.6],
        [
            None,
            None,
            None,
            None,
            "test_accuracy did not improve on 0.5600 by more than 0.05 for 2 epochs",
        ],
        id="min-delta",
    ),
    pytest.param(
        {"patience": 1},
        0.25,
        Classification(),
        [0.3, 0.3],
        [None, "val_accuracy did not improve on 0.3000 for 1 epoch"],
        id="auto-is-validation-with-a-val-split",
    ),
    pytest.param(
        {"patience": 1, "metric": "test_top5"},
        0.0,
        Classification(),
        [0.5, 0.6, 0.55],
        [None, None, "test_top5 did not improve on 0.6000 for 1 epoch"],
        id="top5-higher-is-better",
    ),
    pytest.param(
        {"patience": 3},
        0.0,
        Regression(),
        [2.0, 1.5, 1.6, 1.5, 1.4999],
        [None, None, None, None, None],
        id="regression-mse-lower-is-better",
    ),
    pytest.param(
        {"patience": 1},
        0.0,
        Classification(),
        [0.3, NAN],
        [None, "test_accuracy did not improve on 0.3000 for 1 epoch"],
        id="nan-never-improves",
    ),
    pytest.param(
        {"patience": 2},
        0.0,
        Classification(),
        [NAN, NAN],
        [None, "test_accuracy was not a number for 2 epochs"],
        id="nan-from-the-start",
    ),
]


@pytest.mark.parametrize(("settings", "val_split", "task", "values", "expected"), RULE_CASES)
def test_early_stopping_stops_after_patience_epochs_without_improvement(
    settings: dict[str, Any], val_split: float, task: Any, values: list[float], expected: list
) -> None:
    run = run_context(Recipe(name="t", val_split=val_split), task)
    plugin = EarlyStopping(**settings)
    chosen = settings.get("metric", run.chosen_by)
    # Other metrics move the opposite way: only the chosen one counts.
    figures = [{chosen: value, "test_other": -float(i)} for i, value in enumerate(values)]
    assert stops(plugin, run, figures) == expected


def test_early_stopping_refuses_a_metric_the_run_does_not_report() -> None:
    run = run_context(Recipe(name="t"))
    with pytest.raises(HooktrainError) as error:
        EarlyStopping(metric="val_accuracy").hooktrain_fit_start(run=run)
    message = str(error.value)
    assert "early_stopping.metric is 'val_accuracy'" in message
    assert "test_loss, test_accuracy, test_top5" in message
    assert message.endswith(".") and message.count(". ") == 0


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"patience": 0}, "early_stopping.patience must be at least 1, not 0"),
        ({"min_delta": -0.1}, "early_stopping.min_delta must be at least 0"),
        ({"metric": ""}, "early_stopping.metric must be auto or a metric name"),
    ],
)
def test_early_stopping_settings_are_checked(settings: dict[str, Any], fragment: str) -> None:
    with pytest.raises(HooktrainError, match=re.escape(fragment)):
        EarlyStopping(**settings)


def test_early_stopping_state_round_trips_and_refuses_malformed_state() -> None:
    run = run_context(Recipe(name="t"))
    figures = [{"test_accuracy": value} for value in (0.2, 0.4, 0.3, 0.35, 0.1)]
    straight = EarlyStopping(patience=3)
    straight_answers = stops(straight, run, figures)
    first, second = EarlyStopping(patience=3), EarlyStopping(patience=3)
    stops(first, run, figures[:3])
    second.load_state_dict(first.state_dict())
    assert second.state_dict() == {"best": 0.4, "epochs_without_improvement": 1}
    assert stops(second, run, figures[3:]) == straight_answers[3:]
    assert straight_answers[-1] == "test_accuracy did not improve on 0.4000 for 3 epochs"
    for malformed in (
        {"best": "0.4"},
        {"best": True},
        {"epochs_without_improvement": -1},
        {"epochs_without_improvement": 1.5},
    ):
        with pytest.raises(TypeError):
            EarlyStopping().load_state_dict(malformed)


# --------------------------------------------------------------------------------------------
# early_stopping: whole runs on real images
# --------------------------------------------------------------------------------------------


def run_stopping_cli(data_dir: Path, out: Path, sets: list[str]) -> Result:
    """``hooktrain run`` of the tiny flagship with early stopping, at a constant rate."""
    return CliRunner().invoke(
        main,
        ["run", FLAGSHIP, "--with", "early_stopping", "--without", "onecycle", "--device", "cpu"]
        + ["--data-dir", str(data_dir), "--out", str(out)]
        + [arg for s in sets for arg in ("--set", s)],
    )


def test_a_stopped_run_ends_finished_through_the_command_line(
    real_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    sets = [*TINY, "epochs=3", "early_stopping.patience=1", *NEVER_IMPROVES]
    result = run_stopping_cli(real_images, out, sets)
    assert result.exit_code == 0, result.output
    config, metrics = run_files(out)
    reason = never_improved_reason(metrics)
    assert f"stopped after epoch 2: {reason}" in result.output
    assert config["run"]["finished"] is True
    assert config["run"]["stop_reason"] == reason
    assert metrics["finished"] is True and metrics["stop_reason"] == reason
    assert [epoch["epoch"] for epoch in metrics["epochs"]] == [1, 2]
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["state"]["epoch"] == 2
    assert last["plugins"]["early_stopping"]["epochs_without_improvement"] == 1
    assert_user_error(CliRunner().invoke(main, ["resume", str(out)]), "has finished")


def test_eval_every_evaluates_every_nth_epoch_and_the_last_and_stopping_counts_only_those(
    real_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    sets = [*TINY, "epochs=5", "eval_every=2", "early_stopping.patience=1", *NEVER_IMPROVES]
    result = run_stopping_cli(real_images, out, sets)
    assert result.exit_code == 0, result.output
    _, metrics = run_files(out)
    evaluated = [epoch["epoch"] for epoch in metrics["epochs"] if "test_accuracy" in epoch]
    # Epochs 2 and 4 are evaluated; 4 does not improve on 2, so the run stops after it.
    assert [epoch["epoch"] for epoch in metrics["epochs"]] == [1, 2, 3, 4]
    assert evaluated == [2, 4]
    first = metrics["epochs"][1]["test_accuracy"]
    assert f"stopped after epoch 4: test_accuracy did not improve on {first:.4f}" in result.output
    assert "final epoch not evaluated" not in result.output
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert best["state"]["epoch"] == 2


def test_a_resumed_run_counts_on_from_its_checkpoint(real_images: Path, tmp_path: Path) -> None:
    """Patience 2 stops after epoch 3. Stopped after epoch 2 and resumed, the run must stop
    there too: a count of epochs without improvement that started over would train all 4."""
    recipe = tiny_recipe("epochs=4", "early_stopping.patience=2", *NEVER_IMPROVES)
    options = {"data_dir": real_images, "device": "cpu", "echo": quiet}
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(recipe, out_dir=straight, **options).report.epoch == 3
    train(recipe, out_dir=split, stop_after_epoch=2, **options)
    payload = load_checkpoint(split / "checkpoints" / "last.pt")
    resumed = train(recipe, out_dir=split, resume=payload, **options)
    assert resumed.report.epoch == 3
    assert run_files(split)[0]["run"]["stop_reason"] == run_files(straight)[0]["run"]["stop_reason"]
    assert same_history(straight, split)


@attrs.define
class FirstSeedEarlyStopping(EarlyStopping):
    """early_stopping for the first seed of a group only (seeds of a group share settings)."""

    @hookimpl
    def hooktrain_should_stop(self, run: RunContext) -> str | None:
        return super().hooktrain_should_stop(run) if run.lane == 0 else None


def test_a_seed_that_stops_leaves_its_group_and_the_other_trains_on(
    real_images: Path, tmp_path: Path
) -> None:
    recipe = tiny_recipe("epochs=3", with_plugins=())
    stopper = FirstSeedEarlyStopping(patience=1, min_delta=1.0)
    recipe = attrs.evolve(recipe, plugins=(*recipe.plugins, stopper))
    folders = [tmp_path / "seed-0", tmp_path / "seed-1"]
    trained = train_seeds(
        recipe, [0, 1], out_dirs=folders, data_dir=real_images, device="cpu", echo=quiet
    )
    assert [run.report.epoch for run in trained] == [2, 3]
    (stopped_config, stopped), (config, metrics) = run_files(folders[0]), run_files(folders[1])
    assert stopped_config["run"]["finished"] and config["run"]["finished"]
    assert stopped_config["run"]["stop_reason"] == never_improved_reason(stopped)
    assert "stop_reason" not in config["run"] and metrics["stop_reason"] is None
    assert [len(m["epochs"]) for m in (stopped, metrics)] == [2, 3]


def test_an_ablation_goes_on_past_stopped_runs(real_images: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe("epochs=3", "early_stopping.patience=1", *NEVER_IMPROVES)
    ablation = Ablation(vary={"max_lr": [0.01, 0.005]}, seeds=1)
    out = tmp_path / "ablation"
    result = run_ablation(
        recipe, ablation, out_dir=out, data_dir=real_images, device="cpu", echo=quiet
    )
    assert [len(runs) for runs in result.runs.values()] == [1, 1]
    folders = sorted(out.glob("cells/*/seed-0"))
    assert len(folders) == 2
    for folder in folders:
        config, metrics = run_files(folder)
        assert config["run"]["finished"] is True
        assert config["run"]["stop_reason"] == never_improved_reason(metrics)
        assert len(metrics["epochs"]) == 2


# --------------------------------------------------------------------------------------------
# swa: against torch.optim.swa_utils
# --------------------------------------------------------------------------------------------


def small_batchnorm_net() -> nn.Module:
    """BatchNorm in 2-d and 1-d, with and without affine weights and running statistics, after
    a dropout that draws from torch's generator (the pass runs in train mode)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4, momentum=0.3),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4, affine=False),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.BatchNorm1d(5, track_running_stats=False),
        nn.Linear(5, 3),
        nn.BatchNorm1d(3),
    ).double()


def test_recompute_batchnorm_equals_update_bn() -> None:
    torch.manual_seed(0)
    reference, shape = small_batchnorm_net(), small_batchnorm_net()  # other random weights
    with torch.no_grad():  # running statistics far from a fresh start's
        for buffer in shape.buffers():
            if buffer.is_floating_point():
                buffer.copy_(torch.randn_like(buffer).abs() + 3)
    batches = [(torch.randn(n, 3, 8, 8, dtype=torch.float64), torch.zeros(n)) for n in (7, 7, 3)]
    params = {name: p.detach().clone() for name, p in reference.named_parameters()}
    buffers = {name: b.clone() for name, b in shape.named_buffers()}
    before = {name: b.clone() for name, b in buffers.items()}

    torch.manual_seed(1)
    ours = recompute_batchnorm(shape, params, buffers, batches)
    torch.manual_seed(1)
    update_bn(batches, reference)

    expected = dict(reference.named_buffers())
    assert set(ours) == set(expected)  # every BatchNorm that keeps statistics, nothing else
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name
    assert int(ours["1.num_batches_tracked"]) == 3
    for name, tensor in before.items():  # the buffers given, and the shape module, untouched
        assert torch.equal(buffers[name], tensor) and torch.equal(
            dict(shape.named_buffers())[name], tensor
        )
    assert shape[1].momentum == 0.3
    assert recompute_batchnorm(nn.Linear(2, 2), {}, {}, batches) == {}


def training_state(step: int, params: dict[str, torch.Tensor]) -> TrainState:
    """A state holding what step_end and eval_params read."""
    return TrainState(step, 0, params, {}, None, {}, {}, torch.zeros(2, dtype=torch.int64))


def test_swa_average_equals_averaged_model_over_the_last_epochs() -> None:
    """start 0.5 of 4 epochs of 3 steps: the weights after steps 9 and 12 are averaged (the
    ends of epochs 3 and 4), as AveragedModel over those snapshots averages them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).double()
    run = run_context(Recipe(name="t", epochs=4), steps_per_epoch=3)
    plugin = SWA(start=0.5)
    averaged = AveragedModel(model)
    plugin.hooktrain_fit_start(state=training_state(0, dict(model.named_parameters())))
    answers = []
    for step in range(1, 13):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        state = training_state(step, {n: p.detach().clone() for n, p in model.named_parameters()})
        plugin.hooktrain_step_end(run=run, state=state)
        if step in (9, 12):
            averaged.update_parameters(model)
        answers.append(plugin.hooktrain_eval_params(run=None, state=state))
    assert answers[:8] == [None] * 8  # the weights themselves are evaluated until epoch 3 ends
    saved = plugin.state_dict()
    assert saved["count"] == 2 == int(averaged.n_averaged)
    expected = dict(averaged.module.named_parameters())
    assert saved["average"].keys() == expected.keys() == answers[-1].keys()
    for name, tensor in expected.items():
        assert torch.equal(saved["average"][name], tensor), name
        assert torch.equal(answers[-1][name], tensor), name


def test_swa_settings_and_state_are_checked() -> None:
    with pytest.raises(HooktrainError, match=r"swa\.start must be at least 0 and below 1, not 1"):
        SWA(start=1.0)
    average = {"w": torch.ones(2)}
    plugin = SWA()
    plugin.load_state_dict({"average": average, "count": 2, "statistics": {}})
    assert plugin.state_dict() == {"average": average, "count": 2, "statistics": {}}
    for malformed in (
        {"average": [torch.ones(2)], "count": 1},
        {"average": {"w": 1.0}, "count": 1},
        {"average": average, "count": 0},
        {"count": 3},
        {"average": average, "count": "2"},
        {"average": average, "count": 1, "statistics": {"b": "x"}},
    ):
        with pytest.raises(TypeError):
            SWA().load_state_dict(malformed)


def test_swa_run_evaluates_the_average_with_recomputed_batchnorm_and_resumes_exactly(
    real_images: Path, tmp_path: Path
) -> None:
    """2 epochs averaged from the first (start 0): the test figures reported are those of
    AveragedModel over the two epochs' weights with update_bn's statistics, by hand; the
    same 2 epochs as 1 + resume are bit for bit the same, and `hooktrain eval` agrees."""
    recipe = tiny_recipe("epochs=2", "swa.start=0", with_plugins=("swa",))
    options = {"data_dir": real_images, "device": "cpu", "echo": quiet}
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(recipe, out_dir=straight, **options)
    train(recipe, out_dir=split, stop_after_epoch=1, **options)
    first = load_checkpoint(split / "checkpoints" / "last.pt")
    train(recipe, out_dir=split, resume=first, **options)

    expected = load_checkpoint(straight / "checkpoints" / "last.pt")
    resumed = load_checkpoint(split / "checkpoints" / "last.pt")
    for part in ("params", "buffers"):
        for name, tensor in expected["state"][part].items():
            assert torch.equal(resumed["state"][part][name], tensor), f"{part} {name}"
    swa, resumed_swa = expected["plugins"]["swa"], resumed["plugins"]["swa"]
    assert swa["count"] == resumed_swa["count"] == 2
    for part in ("average", "statistics"):
        for name, tensor in swa[part].items():
            assert torch.equal(resumed_swa[part][name], tensor), f"{part} {name}"
    assert same_history(straight, split)

    # By hand: AveragedModel over the weights after epochs 1 and 2, then update_bn.
    facts = expected["config"]["run"]["model_facts"]
    model = recipe_model(recipe, facts)
    model.load_state_dict({**first["state"]["params"], **first["state"]["buffers"]})
    averaged = AveragedModel(model)
    averaged.update_parameters(model)
    model.load_state_dict({**expected["state"]["params"], **expected["state"]["buffers"]})
    averaged.update_parameters(model)
    for name, tensor in averaged.module.named_parameters():
        assert torch.equal(swa["average"][name], tensor), name
    data = device_data(recipe, load_splits(recipe, real_images, quiet), torch.device("cpu"))
    update_bn(data.eval_batches("train"), averaged.module)
    statistics = {
        n: b for n, b in averaged.module.named_buffers() if "running" in n or "tracked" in n
    }
    assert swa["statistics"].keys() == statistics.keys()
    for name, tensor in statistics.items():
        assert torch.equal(swa["statistics"][name], tensor), name

    def test_figures(module: nn.Module) -> tuple[float, float]:
        module.eval()
        with torch.no_grad():
            (x, y), *rest = list(data.eval_batches("test"))
            assert not rest  # the 50 test images in one batch
            logits = module(x)
        loss = float(nn.functional.cross_entropy(logits, y))
        return loss, float((logits.argmax(1) == y).double().mean())

    loss, accuracy = test_figures(averaged.module)
    reported = run_files(straight)[1]["final_test"]
    assert reported["test_accuracy"] == accuracy
    # Evaluation adds the examples' losses up in float64, the hand's mean is float32's.
    assert reported["test_loss"] == pytest.approx(loss, rel=1e-6)
    plain_loss, _ = test_figures(model)  # the last weights with the training's statistics
    assert abs(plain_loss - loss) > 1e-3

    # `hooktrain eval` asks the restored plugin with run=None: the saved average and statistics.
    evaluated = evaluate_checkpoint(expected, real_images, "cpu")
    assert evaluated["accuracy"] == accuracy
    assert evaluated["loss"] == pytest.approx(loss, rel=1e-6)
