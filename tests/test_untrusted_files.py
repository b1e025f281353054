"""What hooktrain reads back from files (config.json, checkpoints, recipe files) never makes it
run code the user did not name, and contents that do not fit end in one sentence, exit 2.

Crafted files are real: a config naming an importable module that would leave a mark if
imported, checksummed checkpoints whose contents are wrong, recipe files that exit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import assert_user_error

from hooktrain.cli import main
from hooktrain.config.overrides import apply_overrides
from hooktrain.config.registry import load_recipe, load_recipe_module
from hooktrain.plugins.checkpoint import CHECKPOINT_FOLDER, LAST, PREVIOUS
from hooktrain.run.checkpoints import load_checkpoint, save_checkpoint
from hooktrain.run.files import CONFIG_FILE, METRICS_FILE
from hooktrain.run.loop import train

TINY = ["model.width=4", "batch_size=40", "eval_batch_size=100", "metrics.progress=false"]

# A module on sys.path that leaves a mark when imported: proof that nothing was imported.
MARKER_MODULE = """
from pathlib import Path
Path(__file__).with_name("imported.txt").write_text("imported")
class Boom:
    def __init__(self, **settings):
        Path(__file__).with_name("called.txt").write_text(repr(settings))
"""

# A recipe file with a plugin of its own, counting how often the file runs.
RECIPE_FILE = '''
from pathlib import Path

import attrs

from hooktrain import Plugin, hookimpl
from hooktrain.config.registry import load_recipe

with Path(__file__).with_name("runs_of_the_file.txt").open("a") as log:
    log.write("ran\\n")


@attrs.define
class CountEpochs(Plugin):
    """Counts finished epochs (state kept in checkpoints)."""

    default_name = "count_epochs"
    seen: int = attrs.field(default=0, init=False)

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = int(state.get("seen", 0))

    @hookimpl
    def hooktrain_epoch_end(self, run, state, report):
        self.seen += 1


base = load_recipe("resnet9_cifar10")
recipe = attrs.evolve(base, name="myrec", plugins=(*base.plugins, CountEpochs()))
'''


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args])


def tiny(*assignments: str, recipe: str = "resnet9_cifar10") -> Any:
    return apply_overrides(load_recipe(recipe), [*TINY, *assignments])


def quiet(_: str) -> None:
    pass


@pytest.fixture
def stopped_run(tiny_cifar: Path, tmp_path: Path) -> Path:
    """A run of 3 epochs stopped after 2: last.pt (epoch 2), previous.pt (epoch 1)."""
    out = tmp_path / "stopped"
    recipe = tiny("epochs=3")
    train(recipe, out_dir=out, data_dir=tiny_cifar, device="cpu", stop_after_epoch=2, echo=quiet)
    return out


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value))


# --------------------------------------------------------------------------------------------
# Item 2: a file never makes hooktrain import or call anything


def test_config_naming_any_class_imports_nothing(
    stopped_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "planted.py").write_text(MARKER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = read_json(stopped_run / CONFIG_FILE)
    config["plugins"][0]["class"] = "planted:Boom"
    write_json(stopped_run / CONFIG_FILE, config)
    # The checkpoints' configs must name it too, or resume would pass them over as foreign.
    for name in (LAST, PREVIOUS):
        payload = load_checkpoint(stopped_run / CHECKPOINT_FOLDER / name)
        payload["config"] = config
        save_checkpoint(payload, stopped_run / CHECKPOINT_FOLDER / name)

    assert_user_error(invoke("resume", stopped_run), "planted:Boom", "not a hooktrain plugin")
    assert_user_error(invoke("eval", stopped_run / CHECKPOINT_FOLDER / LAST), "planted:Boom")
    assert "planted" not in sys.modules
    assert not (tmp_path / "imported.txt").exists()
    assert not (tmp_path / "called.txt").exists()


@pytest.mark.parametrize("path", ["os:makedirs", "ctypes:CDLL", "builtins:exec"])
def test_config_naming_a_callable_of_the_standard_library_calls_nothing(
    stopped_run: Path, tmp_path: Path, path: str
) -> None:
    config = read_json(stopped_run / CONFIG_FILE)
    target = tmp_path / "made-by-the-config"
    config["plugins"][0] = {"class": path, "name": str(target), "settings": {}}
    write_json(stopped_run / CONFIG_FILE, config)
    assert_user_error(invoke("resume", stopped_run), path)
    assert not target.exists()


# --------------------------------------------------------------------------------------------
# Item 5: resume


def test_run_of_a_recipe_file_with_its_own_plugin_resumes_when_the_file_is_named(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    recipe_path = tmp_path / "myrec.py"
    recipe_path.write_text(RECIPE_FILE)
    log = tmp_path / "runs_of_the_file.txt"
    base, _ = load_recipe_module(str(recipe_path))
    out = tmp_path / "mine"
    lines: list[str] = []
    recipe = apply_overrides(base, [*TINY, "epochs=2"])
    train(
        recipe,
        out_dir=out,
        data_dir=tiny_cifar,
        device="cpu",
        stop_after_epoch=1,
        echo=lines.append,
    )
    assert f"hooktrain resume {out} --recipe {recipe_path}" in lines[-1]
    assert log.read_text() == "ran\n"

    # Without the file named, its code does not run and the sentence says what to type.
    assert_user_error(invoke("resume", out), f"--recipe {recipe_path}")
    assert log.read_text() == "ran\n"

    result = invoke("resume", out, "--recipe", recipe_path)
    assert result.exit_code == 0, result.output
    assert log.read_text() == "ran\nran\n"
    last = load_checkpoint(out / CHECKPOINT_FOLDER / LAST)
    assert last["state"]["epoch"] == 2
    assert last["plugins"]["count_epochs"] == {"seen": 2}  # its state came back from epoch 1


def test_finished_run_without_checkpoints_is_never_trained_again(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    """The README's own my_recipe.py: onecycle, grad_clip, metrics, no checkpoint plugin."""
    recipe = apply_overrides(
        tiny("epochs=1"), without_plugins=["checkpoint", "nan_guard", "weight_decay"]
    )
    out = tmp_path / "done"
    train(recipe, out_dir=out, data_dir=tiny_cifar, device="cpu", echo=quiet)
    metrics_before = (out / METRICS_FILE).read_bytes()
    assert_user_error(invoke("resume", out), "has finished")
    assert (out / METRICS_FILE).read_bytes() == metrics_before

    # And with no metrics plugin either: config.json alone says the run is done.
    bare = apply_overrides(recipe, without_plugins=["metrics"])
    train(bare, out_dir=tmp_path / "bare", data_dir=tiny_cifar, device="cpu", echo=quiet)
    assert read_json(tmp_path / "bare" / CONFIG_FILE)["run"]["finished"] is True
    assert_user_error(invoke("resume", tmp_path / "bare"), "has finished")


def _rewrite_last(run: Path, change: Any) -> None:
    path = run / CHECKPOINT_FOLDER / LAST
    payload = load_checkpoint(path)
    change(payload)
    save_checkpoint(payload, path)  # a valid checksum: only the contents are wrong


def _wrong_shape(payload: dict[str, Any]) -> None:
    name = next(iter(payload["state"]["params"]))
    payload["state"]["params"][name] = torch.zeros(7, 7)


def _step_off_its_epoch(payload: dict[str, Any]) -> None:
    payload["state"]["step"] += 100


UNUSABLE_LAST = {
    "wrong shapes": (_wrong_shape, "shape"),
    "step and epoch disagree": (_step_off_its_epoch, "does not fit epoch"),
}


@pytest.mark.parametrize("case", sorted(UNUSABLE_LAST))
def test_last_that_loads_but_does_not_fit_is_passed_over(stopped_run: Path, case: str) -> None:
    change, reason = UNUSABLE_LAST[case]
    _rewrite_last(stopped_run, change)
    (stopped_run / CHECKPOINT_FOLDER / "best.pt").unlink()
    result = invoke("resume", stopped_run)
    assert result.exit_code == 0, result.output
    assert "passed over" in result.output and reason in result.output
    assert "resuming from" in result.output and PREVIOUS in result.output
    assert load_checkpoint(stopped_run / CHECKPOINT_FOLDER / LAST)["state"]["epoch"] == 3


def test_folder_named_last_pt_is_passed_over(stopped_run: Path) -> None:
    folder = stopped_run / CHECKPOINT_FOLDER
    (folder / LAST).unlink()
    (folder / "best.pt").unlink()
    (folder / LAST).mkdir()
    result = invoke("resume", stopped_run)
    assert "passed over" in result.output and "it is not a file" in result.output
    assert "resuming from" in result.output and PREVIOUS in result.output
    # The folder is the user's: it stays, so the last save cannot be made and says so.
    assert_user_error(result, "last checkpoint could not be written")
    assert (folder / LAST).is_dir()


def _set_state(key: str, value: Any) -> Any:
    def change(payload: dict[str, Any]) -> None:
        payload["state"][key] = value

    return change


def _params_as_lists(payload: dict[str, Any]) -> None:
    payload["state"]["params"] = {k: v.tolist() for k, v in payload["state"]["params"].items()}


MALFORMED = {
    "a parameter given as a list": _params_as_lists,
    "step as text": _set_state("step", "12"),
    "empty optimizer state": _set_state("opt_state", {}),
    "garbage RNG state": _set_state(
        "rng", {"data": torch.randint(0, 255, (40,), dtype=torch.uint8), "torch": torch.zeros(3)}
    ),
    "plugin state of the wrong kind": lambda payload: payload["plugins"].update(
        checkpoint={"best_score": "high"}
    ),
    "a state that is a tensor": lambda payload: payload.update(state=torch.zeros(3)),
    "a sparse parameter": lambda payload: payload["state"]["params"].update(
        {"0.0.weight": payload["state"]["params"]["0.0.weight"].to_sparse()}
    ),
    "no progress record": lambda payload: payload.update(progress=None),
    "progress as whole numbers": lambda payload: payload.update(
        progress={"loss_sum": 10**100, "seconds": 0}
    ),
    "metrics history of text": lambda payload: payload["plugins"].update(
        metrics={"history": "abc"}
    ),
    "metrics history of foreign records": lambda payload: payload["plugins"].update(
        metrics={"history": [{"x": 1}]}
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_checkpoint_contents_end_in_a_sentence(stopped_run: Path, case: str) -> None:
    folder = stopped_run / CHECKPOINT_FOLDER
    for other in ("previous.pt", "best.pt"):
        (folder / other).unlink(missing_ok=True)
    _rewrite_last(stopped_run, MALFORMED[case])
    before = (folder / LAST).read_bytes()
    assert_user_error(invoke("resume", stopped_run), "can be resumed")
    assert_user_error(invoke("eval", folder / LAST), "cannot be used")
    assert (folder / LAST).read_bytes() == before


HAND_EDITED = {
    "run section missing": lambda config: config.pop("run"),
    "settings as a list": lambda config: config["plugins"][0].update(settings=[]),
    "a number as the name": lambda config: config["recipe"].update(name=5),
    "plugins as text": lambda config: config.update(plugins="all"),
    "a plugin without a class": lambda config: config["plugins"][0].pop("class"),
    "infinite epochs": lambda config: config["recipe"].update(epochs=float("inf")),
    "a width beyond floats": lambda config: config["recipe"]["model"]["args"].update(width=10**400),
    "a name that climbs out of runs/": lambda config: config["recipe"].update(name="../../x"),
}


@pytest.mark.parametrize("case", sorted(HAND_EDITED))
def test_hand_edited_config_ends_in_a_sentence(stopped_run: Path, case: str) -> None:
    config = read_json(stopped_run / CONFIG_FILE)
    HAND_EDITED[case](config)
    write_json(stopped_run / CONFIG_FILE, config)
    assert_user_error(invoke("resume", stopped_run))


# --------------------------------------------------------------------------------------------
# Item 8: values refused up front, and recipe files that do not end normally


@pytest.mark.parametrize(
    "assignment",
    ["max_lr=inf", "model.logit_scale=inf", "betas=1,1", "eps=0", "momentum=1", "model.dropout=1",
     "augment.normalize.std=0.2,0,0.2", "max_lr=-inf", "weight_decay.rate=inf"],
)  # fmt: skip
def test_values_that_would_diverge_are_refused_before_training(
    tiny_cifar: Path, assignment: str
) -> None:
    """Recipe fields are refused as the recipe is read; the arguments of the model and of the
    augmentation pieces when their factories are built, still before any step and leaving no
    run folder behind. The tiny settings keep the data checks from refusing first."""
    result = invoke(
        "run", "resnet9_cifar10", *_sets(), "--set", assignment, "--data-dir", tiny_cifar
    )  # fmt: skip
    assert_user_error(result, assignment.partition("=")[0].rpartition(".")[2])
    assert list(Path("runs").glob("*")) == []


def test_a_model_too_big_for_memory_is_a_sentence(tiny_cifar: Path) -> None:
    result = invoke(
        "run", "resnet9_cifar10", *_sets(), "--set", "model.width=100000",
        "--data-dir", tiny_cifar, "--out", "big",
    )  # fmt: skip
    assert_user_error(result, "does not fit in the memory", "width")


def test_recipe_file_that_exits_is_a_sentence(tmp_path: Path) -> None:
    (tmp_path / "quits.py").write_text("import sys\nsys.exit(0)\n")
    assert_user_error(invoke("run", "quits.py"), "sys.exit(0)")


def test_empty_test_split_is_refused_before_training(tmp_path: Path) -> None:
    from conftest import write_cifar_batches

    data = write_cifar_batches(tmp_path / "no-test", n_train=240, n_test=0)
    result = invoke("run", "resnet9_cifar10", *_sets(), "--data-dir", data, "--out", "r")
    assert_user_error(result)
    assert not (tmp_path / "r" / METRICS_FILE).exists()


def _sets() -> list[str]:
    return [arg for assignment in [*TINY, "epochs=1"] for arg in ("--set", assignment)] + [
        "--device",
        "cpu",
    ]


# --------------------------------------------------------------------------------------------
# What a hostile session found (each a traceback or a hang before)


@pytest.fixture
def stopped_ema_run(tiny_cifar: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ema"
    recipe = apply_overrides(tiny("epochs=3"), with_plugins=["ema"])
    train(recipe, out_dir=out, data_dir=tiny_cifar, device="cpu", stop_after_epoch=2, echo=quiet)
    return out


@pytest.mark.parametrize(
    ("average", "fragment"),
    [([1, 2], "can be resumed"), ({}, "does not fit"), ("double", "does not fit")],
)
def test_a_saved_ema_average_that_does_not_fit_is_a_sentence(
    stopped_ema_run: Path, average: Any, fragment: str
) -> None:
    folder = stopped_ema_run / CHECKPOINT_FOLDER
    for other in ("previous.pt", "best.pt"):
        (folder / other).unlink(missing_ok=True)

    def change(payload: dict[str, Any]) -> None:
        saved = payload["plugins"]["ema"]["average"]
        doubled = {name: tensor.double() for name, tensor in saved.items()}
        payload["plugins"]["ema"]["average"] = doubled if average == "double" else average

    _rewrite_last(stopped_ema_run, change)
    assert_user_error(invoke("resume", stopped_ema_run), fragment)
    assert_user_error(invoke("eval", folder / LAST))


def test_paths_the_system_refuses_are_a_sentence(tmp_path: Path) -> None:
    too_long = "x" * 300
    assert_user_error(invoke("resume", too_long), "File name too long")
    assert_user_error(invoke("eval", too_long + ".pt"), "File name too long")
    assert_user_error(invoke("run", too_long + ".py"), "File name too long")


def test_a_recipe_file_raising_a_base_exception_is_a_sentence(tmp_path: Path) -> None:
    (tmp_path / "raises.py").write_text("raise BaseException('not an Exception')\n")
    assert_user_error(invoke("run", "raises.py"), "failed to run", "BaseException")


def test_torchrun_variables_without_torchrun_are_a_sentence(
    monkeypatch: pytest.MonkeyPatch, tiny_cifar: Path
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = invoke("run", "resnet9_cifar10", *_sets(), "--data-dir", tiny_cifar, "--out", "r")
    assert_user_error(result, "WORLD_SIZE=2", "MASTER_ADDR")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "zz")
    result = invoke("run", "resnet9_cifar10", *_sets(), "--data-dir", tiny_cifar, "--out", "r")
    assert result.exit_code == 0, result.output


def test_an_absurd_number_of_seeds_is_refused_at_once() -> None:
    result = invoke("ablate", "resnet9_cifar10", "--vary", "grad_clip=on,off", "--seeds", 10**11)
    assert_user_error(result, "--seeds", "1 to 10000")


@pytest.mark.parametrize("accuracy", ["x", float("nan"), 7.0])
def test_tampered_ablation_results_are_a_sentence(tiny_cifar: Path, accuracy: Any) -> None:
    command = ["ablate", "resnet9_cifar10", "--vary", "grad_clip=on,off", "--seeds", "1"]
    command += [*_sets(), "--data-dir", str(tiny_cifar), "--out", "abl"]
    assert invoke(*command).exit_code == 0
    results = read_json(Path("abl/ablation.json"))
    results["cells"][0]["runs"]["0"]["test_accuracy"] = accuracy
    write_json(Path("abl/ablation.json"), results)
    assert_user_error(invoke(*command), "cannot be read as a hooktrain ablation")
