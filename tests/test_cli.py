"""The command line and what it stands on: overrides, saved configs, recipes, checkpoints.

User errors must reach the user as one sentence on stderr ("Error: ..."), exit code 2 and no
traceback; a tiny real run (width 4, one epoch of 240 images) checks what `run` writes and that
`eval` and `resume` read it back.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import attrs
import pytest
import torch
from click.testing import CliRunner, Result
from conftest import assert_user_error

from hooktrain.cli import main
from hooktrain.config.overrides import apply_overrides
from hooktrain.config.recipe import Recipe
from hooktrain.config.ref import Ref
from hooktrain.config.registry import load_recipe
from hooktrain.config.stored import recipe_from_config, recipe_to_config
from hooktrain.core.plugin import BUILTIN_PLUGINS, import_object
from hooktrain.errors import HooktrainError
from hooktrain.plugins.checkpoint import BEST, CHECKPOINT_FOLDER, LAST
from hooktrain.plugins.grad_clip import GradClip
from hooktrain.plugins.metrics import METRICS_FILE
from hooktrain.run.checkpoints import (
    FORMAT,
    STATE_KEYS,
    VERSION,
    atomic_write,
    copy_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from hooktrain.run.files import CONFIG_FILE

FLAGSHIP = "resnet9_cifar10"
PLUGIN_ORDER = (
    "data_parallel -> nan_guard -> onecycle -> weight_decay -> grad_clip -> metrics -> checkpoint"
)
TINY = [
    "--set",
    "model.width=4",
    "--set",
    "epochs=1",
    "--set",
    "batch_size=40",
    "--set",
    "eval_batch_size=100",
    "--device",
    "cpu",
]


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test from tmp_path, so a default `runs/` folder could only appear there."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def flagship() -> Recipe:
    return load_recipe(FLAGSHIP)


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args])


def override_error(recipe: Recipe, *assignments: str, **kwargs: Any) -> str:
    with pytest.raises(HooktrainError) as info:
        apply_overrides(recipe, assignments, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# 1. Overrides


def test_numbers_are_typed(flagship: Recipe) -> None:
    sets = ["epochs=3", "model.width=16", "max_lr=3e-3", "model.dropout=0.5"]
    recipe = apply_overrides(flagship, sets)
    assert (recipe.epochs, recipe.model.args["width"]) == (3, 16)
    assert type(recipe.epochs) is int and type(recipe.model.args["width"]) is int
    assert recipe.max_lr == pytest.approx(0.003)
    assert type(recipe.max_lr) is float
    assert recipe.model.args["dropout"] == 0.5


def test_later_assignment_wins(flagship: Recipe) -> None:
    assert apply_overrides(flagship, ["epochs=3", "epochs=5"]).epochs == 5


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("false", False), ("on", True), ("off", False), ("1", True), ("0", False)],
)
def test_booleans(flagship: Recipe, text: str, value: bool) -> None:
    recipe = apply_overrides(flagship, [f"model.conv_bias={text}", f"nesterov={text}"])
    assert recipe.model.args["conv_bias"] is value
    assert recipe.nesterov is value


def test_boolean_rejects_other_words(flagship: Recipe) -> None:
    error = override_error(flagship, "model.conv_bias=maybe")
    assert "model.conv_bias must be true or false, not 'maybe'" in error


@pytest.mark.parametrize(("text", "value"), [("none", None), ("None", None), ("120", 120)])
def test_optional_int(flagship: Recipe, text: str, value: int | None) -> None:
    with_limit = apply_overrides(flagship, ["train_limit=7"])
    assert apply_overrides(with_limit, [f"train_limit={text}"]).train_limit == value


@pytest.mark.parametrize("text", ["abc", "4.5", ""])
def test_int_rejects_non_integers(flagship: Recipe, text: str) -> None:
    assert "model.width must be a number (int)" in override_error(flagship, f"model.width={text}")


def test_tuple_of_two_floats(flagship: Recipe) -> None:
    recipe = apply_overrides(flagship, ["betas=0.9,0.99"])
    assert recipe.betas == (0.9, 0.99)
    assert isinstance(recipe.betas, tuple)


@pytest.mark.parametrize("text", ["0.9", "0.9,0.99,0.999"])
def test_tuple_of_wrong_length(flagship: Recipe, text: str) -> None:
    message = override_error(flagship, f"betas={text}")
    assert "betas must be 2 comma-separated values" in message


def test_tuple_item_must_be_a_number(flagship: Recipe) -> None:
    assert "betas must be a number (float)" in override_error(flagship, "betas=0.9,x")


def test_literal_choice(flagship: Recipe) -> None:
    assert apply_overrides(flagship, ["optimizer=sgd"]).optimizer == "sgd"
    message = override_error(flagship, "optimizer=rmsprop")
    assert "optimizer must be one of adam, adamw, sgd, not 'rmsprop'" in message


@pytest.mark.parametrize("assignment", ["epochs=0", "epochs=-2", "batch_size=0", "max_lr=0"])
def test_validators_run_on_overrides(flagship: Recipe, assignment: str) -> None:
    key, _, value = assignment.partition("=")
    message = override_error(flagship, assignment)
    assert f"{key} must be greater than 0, not {value}" in message


def test_optional_int_still_validated(flagship: Recipe) -> None:
    assert "train_limit must be greater than 0" in override_error(flagship, "train_limit=0")


def test_dotted_plugin_keys(flagship: Recipe) -> None:
    recipe = apply_overrides(
        flagship,
        ["grad_clip.max=0.05", "grad_clip.mode=norm", "weight_decay.include=*.weight,*.bias"],
    )
    clip = recipe.plugin("grad_clip")
    assert isinstance(clip, GradClip)
    assert clip.max == 0.05
    assert clip.mode == "norm"
    decay = recipe.plugin("weight_decay")
    assert decay is not None
    assert decay.include == ("*.weight", "*.bias")
    # The other plugins keep their settings.
    assert recipe.plugin("onecycle") == flagship.plugin("onecycle")


def test_plugin_literal_choice(flagship: Recipe) -> None:
    message = override_error(flagship, "grad_clip.mode=sideways")
    assert "grad_clip.mode must be one of value, norm, not 'sideways'" in message


def test_unknown_recipe_key_suggests(flagship: Recipe) -> None:
    message = override_error(flagship, "epoch=3")
    assert "The recipe has no setting 'epoch'." in message
    assert "Did you mean 'epochs'?" in message
    assert "Valid settings:" in message


def test_recipe_name_and_plugins_are_not_settings(flagship: Recipe) -> None:
    assert "no setting 'name'" in override_error(flagship, "name=other")
    assert "no setting 'plugins'" in override_error(flagship, "plugins=none")


def test_unknown_plugin_prefix(flagship: Recipe) -> None:
    message = override_error(flagship, "gradclip.max=1")
    assert "there is no plugin 'gradclip' in this run" in message
    assert "grad_clip" in message  # the plugins there are


def test_unknown_plugin_field_suggests(flagship: Recipe) -> None:
    message = override_error(flagship, "grad_clip.maximum=1")
    assert "The plugin 'grad_clip' has no setting 'grad_clip.maximum'." in message
    assert "Did you mean 'grad_clip.max'?" in message


def test_plugin_state_fields_are_not_settings(flagship: Recipe) -> None:
    message = override_error(flagship, "checkpoint.best_accuracy=1")
    assert "has no setting 'checkpoint.best_accuracy'" in message


def test_without_removes_a_plugin(flagship: Recipe) -> None:
    recipe = apply_overrides(flagship, without_plugins=["grad_clip"])
    assert recipe.plugin("grad_clip") is None
    names = [p.name for p in recipe.plugins]
    assert names == [
        "data_parallel",
        "nan_guard",
        "onecycle",
        "weight_decay",
        "metrics",
        "checkpoint",
    ]


def test_set_on_a_removed_plugin_errors(flagship: Recipe) -> None:
    message = override_error(flagship, "grad_clip.max=1", without_plugins=["grad_clip"])
    assert "there is no plugin 'grad_clip'" in message


def test_without_unknown_plugin(flagship: Recipe) -> None:
    message = override_error(flagship, without_plugins=["nope"])
    assert "--without nope" in message
    assert "has no plugin 'nope'" in message


def test_with_a_plugin_already_there(flagship: Recipe) -> None:
    message = override_error(flagship, with_plugins=["grad_clip"])
    assert "--with grad_clip: the recipe already has the plugin 'grad_clip'" in message


def test_with_unknown_plugin(flagship: Recipe) -> None:
    message = override_error(flagship, with_plugins=["nope"])
    assert "Unknown plugin 'nope'" in message


def test_without_then_with_gives_a_fresh_plugin(flagship: Recipe) -> None:
    recipe = apply_overrides(
        flagship,
        ["onecycle.pct_start=0.25"],
        with_plugins=["onecycle"],
        without_plugins=["onecycle"],
    )
    names = [p.name for p in recipe.plugins]
    assert sorted(names) == sorted(p.name for p in flagship.plugins)
    onecycle = recipe.plugin("onecycle")
    assert onecycle is not None
    assert onecycle.pct_start == 0.25


def test_with_adds_a_plugin(flagship: Recipe) -> None:
    bare = apply_overrides(flagship, without_plugins=["grad_clip"])
    recipe = apply_overrides(bare, ["grad_clip.max=0.5"], with_plugins=["grad_clip"])
    clip = recipe.plugin("grad_clip")
    assert isinstance(clip, GradClip)
    assert clip.max == 0.5
    assert clip.mode == "value"


@pytest.mark.parametrize("text", ["epochs", "=3", " =3"])
def test_set_needs_key_and_equals(flagship: Recipe, text: str) -> None:
    assert "--set takes KEY=VALUE" in override_error(flagship, text)


def test_original_recipe_is_unchanged(flagship: Recipe) -> None:
    before = recipe_to_config(flagship)
    clip_before = flagship.plugin("grad_clip")
    changed = apply_overrides(
        flagship,
        ["epochs=2", "grad_clip.max=0.05", "weight_decay.rate=0.1"],
        with_plugins=["onecycle"],
        without_plugins=["onecycle", "metrics"],
    )
    assert changed.epochs == 2
    assert recipe_to_config(flagship) == before
    assert flagship.plugin("grad_clip") is clip_before
    assert clip_before is not None
    assert clip_before.max == 0.1
    assert load_recipe(FLAGSHIP) is flagship
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        flagship.epochs = 2  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# 2. Saved configuration


def overridden_flagship() -> Recipe:
    return apply_overrides(
        load_recipe(FLAGSHIP),
        [
            "epochs=3",
            "betas=0.8,0.9",
            "train_limit=120",
            "optimizer=sgd",
            "augment=crop,normalize",
            "augment.crop.pad=2",
            "model.width=16",
            "grad_clip.mode=norm",
            "grad_clip.max=2",
            "weight_decay.include=*.weight,*.bias",
        ],
        without_plugins=["onecycle"],
    )


def test_config_round_trip_through_json() -> None:
    recipe = overridden_flagship()
    config = recipe_to_config(recipe)
    rebuilt = recipe_from_config(json.loads(json.dumps(config)))
    assert recipe_to_config(rebuilt) == config
    assert rebuilt == recipe
    assert isinstance(rebuilt.betas, tuple)
    decay = rebuilt.plugin("weight_decay")
    assert decay is not None
    assert decay.include == ("*.weight", "*.bias")
    assert [p.name for p in rebuilt.plugins] == [
        "data_parallel",
        "nan_guard",
        "weight_decay",
        "grad_clip",
        "metrics",
        "checkpoint",
    ]


@pytest.mark.parametrize(
    "class_path",
    ["no_such_package.plugins:Thing", "hooktrain.plugins.grad_clip:NoSuchClass"],
)
def test_config_with_unregistered_plugin(class_path: str) -> None:
    """A class path that is not a registered plugin's is refused without importing it."""
    config = json.loads(json.dumps(recipe_to_config(overridden_flagship())))
    config["plugins"][1]["class"] = class_path
    with pytest.raises(HooktrainError) as info:
        recipe_from_config(config)
    message = str(info.value)
    assert class_path in message
    assert "not a hooktrain plugin" in message and "not imported" in message


def _drop_recipe_name(config: dict[str, Any]) -> None:
    del config["recipe"]["name"]


def _drop_plugins(config: dict[str, Any]) -> None:
    del config["plugins"]


def _drop_plugin_settings(config: dict[str, Any]) -> None:
    del config["plugins"][0]["settings"]


def _plugins_not_a_list(config: dict[str, Any]) -> None:
    config["plugins"] = 3


@pytest.mark.parametrize(
    "damage", [_drop_recipe_name, _drop_plugins, _drop_plugin_settings, _plugins_not_a_list]
)
def test_malformed_config(damage: Any) -> None:
    config = json.loads(json.dumps(recipe_to_config(overridden_flagship())))
    damage(config)
    with pytest.raises(HooktrainError, match="saved configuration is incomplete"):
        recipe_from_config(config)


def test_config_with_unknown_setting() -> None:
    config = json.loads(json.dumps(recipe_to_config(overridden_flagship())))
    config["recipe"]["epocs"] = 3
    with pytest.raises(HooktrainError, match="no setting 'epocs'"):
        recipe_from_config(config)


# ---------------------------------------------------------------------------------------------
# 3. Finding recipes


def test_load_recipe_by_name() -> None:
    recipe = load_recipe(FLAGSHIP)
    assert recipe is import_object("hooktrain.recipes.resnet9_cifar10:recipe")
    assert recipe.name == FLAGSHIP
    assert recipe.epochs == 8


def test_unknown_recipe_name_suggests() -> None:
    with pytest.raises(HooktrainError) as info:
        load_recipe("resnet9_cifar")
    message = str(info.value)
    assert "Unknown recipe 'resnet9_cifar'." in message
    assert "Did you mean 'resnet9_cifar10'?" in message


def test_recipe_from_a_python_file(tmp_path: Path) -> None:
    path = tmp_path / "my_recipe.py"
    path.write_text(
        "from hooktrain import Recipe, Ref\n"
        "from hooktrain.plugins.grad_clip import GradClip\n"
        "\n"
        'recipe = Recipe(name="mine", epochs=2, model=Ref("resnet9", width=8), '
        "plugins=(GradClip(max=0.5),))\n"
    )
    recipe = load_recipe(str(path))
    assert isinstance(recipe, Recipe)
    assert (recipe.name, recipe.epochs, recipe.model) == ("mine", 2, Ref("resnet9", width=8))
    clip = recipe.plugin("grad_clip")
    assert isinstance(clip, GradClip)
    assert clip.max == 0.5
    # Overrides work on file recipes as on built-in ones.
    assert apply_overrides(recipe, ["grad_clip.max=0.2"]).plugin("grad_clip") == GradClip(max=0.2)


@pytest.mark.parametrize("body", ["x = 1\n", "recipe = 3\n"])
def test_python_file_without_recipe(tmp_path: Path, body: str) -> None:
    path = tmp_path / "not_a_recipe.py"
    path.write_text(body)
    with pytest.raises(HooktrainError, match="defines no `recipe = Recipe"):
        load_recipe(str(path))


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(HooktrainError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.py"))


# ---------------------------------------------------------------------------------------------
# 4. The command line


def test_list_shows_recipes_and_plugins() -> None:
    result = invoke("list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "recipes:"
    assert "plugins:" in lines
    split = lines.index("plugins:")
    recipes = {line.split()[0]: line.split(None, 1)[1] for line in lines[1:split]}
    plugins = {line.split()[0]: line.split(None, 1)[1] for line in lines[split + 1 :]}
    assert recipes[FLAGSHIP].startswith("The seed's run: ResNet-9 on CIFAR-10")
    assert recipes["resnet9_fast"].startswith("ResNet-9 with the known speed ideas")
    assert recipes["airbench94"].startswith("airbench94 (Keller Jordan's CIFAR-10 speedrun")
    assert set(BUILTIN_PLUGINS) == {
        "onecycle",
        "weight_decay",
        "grad_clip",
        "label_smoothing",
        "ema",
        "nan_guard",
        "data_parallel",
        "checkpoint",
        "metrics",
        "mixup",
        "cutmix",
        "lion",
        "lookahead",
        "sam",
        "grad_accumulation",
        "early_stopping",
        "swa",
        "whitening",
        "freeze",
        "bias_lr",
        "triangle",
        "multi_crop",
        "muon",
    }
    for name, path in BUILTIN_PLUGINS.items():
        doc = import_object(path).__doc__.strip().splitlines()[0]
        assert plugins[name] == doc


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["run", "resnet9_cifar"], ["Unknown recipe 'resnet9_cifar'", "Did you mean"]),
        (["run", FLAGSHIP, "--set", "epoch=2"], ["no setting 'epoch'", "'epochs'"]),
        (["run", FLAGSHIP, "--set", "epochs=abc"], ["epochs must be a number (int), not 'abc'"]),
        (["run", FLAGSHIP, "--set", "optimizer=rmsprop"], ["adam, adamw, sgd"]),
        (["run", FLAGSHIP, "--set", "epochs"], ["--set takes KEY=VALUE"]),
        (["run", FLAGSHIP, "--seed", "-1", "--set", "epochs=0"], ["epochs must be greater"]),
        (["run", FLAGSHIP, "--with", "nope"], ["Unknown plugin 'nope'"]),
        (["run", FLAGSHIP, "--with", "grad_clip"], ["already has the plugin 'grad_clip'"]),
        (["run", FLAGSHIP, "--without", "nope"], ["--without nope", "no plugin 'nope'"]),
        (["run", str(Path("missing.py"))], ["The recipe file missing.py does not exist"]),
    ],
)
def test_run_user_errors(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    assert_user_error(invoke(*args), *fragments)
    assert list(tmp_path.iterdir()) == []  # no run folder was started


def test_run_with_missing_data_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("run", FLAGSHIP, *TINY, "--data-dir", tmp_path / "absent", "--out", out)
    assert_user_error(result, "Data folder", "does not exist")
    assert not out.exists()


@pytest.mark.parametrize(
    ("layout", "fragment"),
    [([], "No CIFAR-10 found in"), (["train"], "has a train/ folder but no test/ folder")],
)
def test_run_with_wrong_data_layout(tmp_path: Path, layout: list[str], fragment: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in layout:
        (data / name).mkdir()
    out = tmp_path / "out"
    result = invoke("run", FLAGSHIP, *TINY, "--data-dir", data, "--out", out)
    assert_user_error(result, fragment)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_run_on_cuda_without_gpu(tiny_cifar: Path, tmp_path: Path) -> None:
    args = ["run", FLAGSHIP, "--device", "cuda", "--data-dir", tiny_cifar, "--out", tmp_path / "o"]
    assert_user_error(invoke(*args), "--device cuda", "no CUDA GPU")


def test_run_into_non_empty_folder(tiny_cifar: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    notes = out / "notes.txt"
    notes.write_text("keep me\n")
    result = invoke("run", FLAGSHIP, *TINY, "--data-dir", tiny_cifar, "--out", out)
    assert_user_error(result, "is not empty", f"hooktrain resume {out}")
    assert list(out.iterdir()) == [notes]
    assert notes.read_text() == "keep me\n"


@attrs.frozen
class FinishedRun:
    folder: Path
    output: str
    data_dir: Path


@pytest.fixture(scope="module")
def finished_run(tiny_cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """One tiny real run of the flagship recipe, shared by the tests that read it."""
    folder = tmp_path_factory.mktemp("runs") / "tiny"
    result = invoke(
        "run",
        FLAGSHIP,
        *TINY,
        "--set",
        "grad_clip.max=0.05",
        "--seed",
        "3",
        "--data-dir",
        tiny_cifar,
        "--out",
        folder,
    )
    assert result.exit_code == 0, result.output
    return FinishedRun(folder, result.output, tiny_cifar)


def copy_run(run: FinishedRun, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run.folder, tmp_path / "copy"))


def config_as_started(folder: Path) -> dict[str, Any]:
    """The run's config.json as written at its start, before it was marked finished."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    del config["run"]["finished"]
    return config


def unfinished_copy(run: FinishedRun, tmp_path: Path) -> Path:
    """A copy of the run as if it had been killed before its end was recorded."""
    folder = copy_run(run, tmp_path)
    (folder / CONFIG_FILE).write_text(json.dumps(config_as_started(folder)))
    return folder


def test_run_writes_config(finished_run: FinishedRun) -> None:
    config = json.loads((finished_run.folder / CONFIG_FILE).read_text())
    recipe = config["recipe"]
    assert recipe["name"] == FLAGSHIP
    assert recipe["model"] == {"factory": "resnet9", "label": "resnet9", "args": ANY}
    assert (recipe["model"]["args"]["width"], recipe["epochs"], recipe["batch_size"]) == (4, 1, 40)
    assert recipe["eval_batch_size"] == 100
    assert recipe["seed"] == 3  # from --seed
    assert recipe["model"]["args"]["dropout"] == 0.2  # from the recipe, not the Recipe default
    run = {
        "data_dir": str(finished_run.data_dir),
        "device": "cpu",
        "processes": 1,
        "recipe_file": None,
        "model_facts": {
            "num_classes": 10,
            "num_outputs": 10,
            "input_shape": [3, 32, 32],
            "in_channels": 3,
        },
        "steps_per_epoch": 6,
        "finished": True,
    }
    assert {key: config["run"][key] for key in run} == run
    assert config["run"]["environment"]["torch"] == str(torch.__version__)
    plugins = {p["name"]: p["settings"] for p in config["plugins"]}
    assert list(plugins) == PLUGIN_ORDER.split(" -> ")
    assert plugins["grad_clip"] == {"max": 0.05, "mode": "value"}
    rebuilt = recipe_from_config(config)
    assert rebuilt.epochs == 1
    assert rebuilt.plugin("grad_clip") == GradClip(max=0.05)


def test_run_writes_metrics(finished_run: FinishedRun) -> None:
    metrics = json.loads((finished_run.folder / METRICS_FILE).read_text())
    assert metrics["finished"] is True
    assert metrics["recipe"] == FLAGSHIP
    accuracy = metrics["final_test_accuracy"]
    assert isinstance(accuracy, float)
    assert 0.0 <= accuracy <= 1.0
    assert len(metrics["epochs"]) == 1
    assert metrics["epochs"][-1]["test_accuracy"] == accuracy
    assert metrics["config"] == config_as_started(finished_run.folder)


def test_run_writes_checkpoints(finished_run: FinishedRun) -> None:
    config = config_as_started(finished_run.folder)
    for name in (LAST, BEST):
        payload = load_checkpoint(finished_run.folder / CHECKPOINT_FOLDER / name)
        assert payload["format"] == FORMAT
        assert payload["version"] == VERSION
        assert payload["recipe"] == FLAGSHIP
        assert payload["config"] == config
        assert payload["state"]["epoch"] == 1
        assert payload["state"]["step"] == 6  # 240 images in batches of 40
    leftovers = [p.name for p in finished_run.folder.rglob("*.tmp")]
    assert leftovers == []


def test_run_prints_plugins_and_accuracy(finished_run: FinishedRun) -> None:
    metrics = json.loads((finished_run.folder / METRICS_FILE).read_text())
    lines = finished_run.output.splitlines()
    assert f"plugins: {PLUGIN_ORDER}" in lines
    final = [line for line in lines if line.startswith("final test accuracy ")]
    assert len(final) == 1
    assert final[0].startswith(f"final test accuracy {metrics['final_test_accuracy']:.2%} (")


def test_eval_matches_final_accuracy(finished_run: FinishedRun) -> None:
    metrics = json.loads((finished_run.folder / METRICS_FILE).read_text())
    checkpoint = finished_run.folder / CHECKPOINT_FOLDER / LAST
    # No --data-dir: eval reads the data folder the run saved.
    result = invoke("eval", checkpoint, "--device", "cpu")
    assert result.exit_code == 0, result.output
    match = re.search(r"test accuracy (\d+\.\d{2})%", result.output)
    assert match is not None, result.output
    assert f"{match.group(1)}%" == f"{metrics['final_test_accuracy']:.2%}"
    assert f"({FLAGSHIP}, epoch 1)" in result.output


def test_resume_of_finished_run(finished_run: FinishedRun) -> None:
    result = invoke("resume", finished_run.folder, "--device", "cpu")
    assert_user_error(result, "has finished (epoch 1 of 1)", "nothing to resume")


def test_resume_without_config(tmp_path: Path) -> None:
    folder = tmp_path / "not_a_run"
    folder.mkdir()
    assert_user_error(invoke("resume", folder), "is not a hooktrain run folder", "config.json")


def test_resume_before_the_first_checkpoint_starts_over(
    finished_run: FinishedRun, tmp_path: Path
) -> None:
    """A run killed before it saved anything: resume trains it from step 0, to the same end."""
    folder = tmp_path / "config_only"
    folder.mkdir()
    config = json.loads((finished_run.folder / CONFIG_FILE).read_text())
    del config["run"]["finished"]  # as written at the start, before the kill
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    result = invoke("resume", folder)
    assert result.exit_code == 0, result.output
    assert "has no checkpoint yet: starting the run from its beginning" in result.output
    resumed = load_checkpoint(folder / CHECKPOINT_FOLDER / LAST)["state"]
    original = load_checkpoint(finished_run.folder / CHECKPOINT_FOLDER / LAST)["state"]
    assert resumed["step"] == original["step"]
    for name, tensor in original["params"].items():
        assert torch.equal(resumed["params"][name], tensor), name


def test_resume_with_checkpoint_of_another_recipe(
    finished_run: FinishedRun, tmp_path: Path
) -> None:
    folder = unfinished_copy(finished_run, tmp_path)
    for name in (LAST, BEST):
        path = folder / CHECKPOINT_FOLDER / name
        payload = load_checkpoint(path)
        payload["recipe"] = "other_recipe"
        save_checkpoint(payload, path)
    result = invoke("resume", folder, "--device", "cpu")
    # Not "already finished": the mismatch is caught before training starts.
    assert_user_error(
        result, "No checkpoint in", "written by the recipe 'other_recipe', not this run's"
    )


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _random(data: bytes) -> bytes:
    return random.Random(0).randbytes(len(data))


def _empty(data: bytes) -> bytes:
    return b""


@pytest.mark.parametrize("damage", [_truncated, _random, _empty])
def test_eval_of_corrupt_checkpoint(finished_run: FinishedRun, tmp_path: Path, damage: Any) -> None:
    original = (finished_run.folder / CHECKPOINT_FOLDER / LAST).read_bytes()
    path = tmp_path / "broken.pt"
    path.write_bytes(damage(original))
    result = invoke("eval", path, "--device", "cpu")
    assert_user_error(result, f"{path} cannot be used", "corrupt")


@pytest.mark.parametrize(
    "data", [b"\x80\x02t.", b"\x80\x02h\x00.", random.Random(2).randbytes(1024)]
)
def test_eval_of_malformed_pickle(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "broken.pt"
    path.write_bytes(data)
    assert_user_error(invoke("eval", path, "--device", "cpu"), "cannot be used")


@pytest.mark.parametrize("content", [{"weights": torch.zeros(2)}, [1, 2, 3]])
def test_eval_of_someone_elses_file(tmp_path: Path, content: Any) -> None:
    path = tmp_path / "theirs.pt"
    torch.save(content, path)
    assert_user_error(invoke("eval", path), "is not a hooktrain checkpoint")


def test_eval_of_missing_file(tmp_path: Path) -> None:
    assert_user_error(invoke("eval", tmp_path / "nope.pt"), "There is no checkpoint at")


def test_eval_of_other_version(finished_run: FinishedRun, tmp_path: Path) -> None:
    payload = torch.load(finished_run.folder / CHECKPOINT_FOLDER / LAST, weights_only=True)
    payload["version"] = VERSION + 1
    path = tmp_path / "future.pt"
    torch.save(payload, path)
    result = invoke("eval", path, "--device", "cpu")
    assert_user_error(
        result, f"checkpoint format version {VERSION + 1}", f"reads versions up to {VERSION}"
    )


def test_eval_of_incomplete_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "incomplete.pt"
    torch.save({"format": FORMAT, "version": VERSION}, path)
    assert_user_error(invoke("eval", path), str(path))


def test_console_script_reports_errors(tmp_path: Path) -> None:
    """The installed `hooktrain` command, in its own process: exit code and stderr."""
    script = Path(sys.executable).with_name("hooktrain")
    completed = subprocess.run(
        [str(script), "run", "resnet9_cifar"], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 2
    assert completed.stdout == ""
    assert completed.stderr.startswith("Error: Unknown recipe 'resnet9_cifar'.")
    assert completed.stderr.count("\n") == 1
    assert "Traceback" not in completed.stderr


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from hooktrain.cli import main\n"
        "result = CliRunner().invoke(main, ['--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print('torch' in sys.modules)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert completed.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# 5. Atomic writes


def test_atomic_write_success(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "file.bin"
    atomic_write(path, lambda file: file.write(b"first"))
    atomic_write(path, lambda file: file.write(b"second"))
    assert path.read_bytes() == b"second"
    assert os.listdir(path.parent) == ["file.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_failure_keeps_old_content(tmp_path: Path) -> None:
    path = tmp_path / "file.bin"
    path.write_bytes(b"old content")

    def write(file: Any) -> None:
        file.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, write)
    assert path.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_save_and_load_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt" / "last.pt"
    state = {key: {} for key in STATE_KEYS} | {"params": {"w": torch.arange(3.0)}}
    payload = {"format": FORMAT, "version": VERSION, "recipe": "r", "config": {}, "plugins": {}}
    save_checkpoint(payload | {"state": state}, path)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["state"]["params"]["w"], torch.arange(3.0))
    assert os.listdir(path.parent) == ["last.pt"]


@pytest.mark.parametrize("links", [True, False], ids=["hard_link", "copy"])
def test_copied_checkpoint_keeps_its_content_when_the_source_is_rewritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, links: bool
) -> None:
    if not links:

        def no_links(source: object, target: object) -> None:
            raise OSError("links are not supported here")

        monkeypatch.setattr(os, "link", no_links)
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    save_checkpoint({"w": torch.ones(3)}, last)
    copy_checkpoint(last, best)
    save_checkpoint({"w": torch.zeros(3)}, last)
    assert torch.equal(torch.load(best, weights_only=True)["w"], torch.ones(3))
    assert torch.equal(torch.load(last, weights_only=True)["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


INTERRUPTING_RECIPE = """
import attrs
from hooktrain import Plugin, hookimpl
from hooktrain.config.overrides import apply_overrides
from hooktrain.config.registry import load_recipe


@attrs.define
class PressCtrlC(Plugin):
    default_name = "press_ctrl_c"
    at_epoch: int = 0

    @hookimpl
    def hooktrain_epoch_start(self, state):
        if state.epoch == self.at_epoch:
            raise KeyboardInterrupt


base = load_recipe("resnet9_cifar10")
recipe = attrs.evolve(base, name="interrupted", plugins=(*base.plugins, PressCtrlC(at_epoch=AT)))
"""


@pytest.mark.parametrize(
    ("at_epoch", "advice"),
    [
        (1, "continue from the last checkpoint with `hooktrain resume"),
        (0, "nothing was saved, so `hooktrain resume"),
    ],
)
def test_ctrl_c_says_how_to_continue(
    tiny_cifar: Path, tmp_path: Path, at_epoch: int, advice: str
) -> None:
    recipe_file = tmp_path / "interrupting.py"
    recipe_file.write_text(INTERRUPTING_RECIPE.replace("AT", str(at_epoch)))
    out = tmp_path / "run"
    args = [*TINY, "--set", "epochs=2", "--data-dir", tiny_cifar, "--out", out]
    result = invoke("run", recipe_file, *args)
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output
    assert f"Error: Interrupted; {advice}" in result.stderr
    saved = out / CHECKPOINT_FOLDER / LAST
    assert saved.is_file() == (at_epoch == 1)
    if at_epoch == 1:
        assert f"hooktrain resume {out}" in result.stderr
        assert load_checkpoint(saved)["state"]["epoch"] == 1
