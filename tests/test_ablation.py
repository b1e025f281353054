"""Ablations: the matrix of cells, the recipes they train, `hooktrain ablate` and its files.

The matrix and the cell recipes are checked in pure Python; bad `--vary` specs must reach the
user as one sentence ("Error: ...", exit code 2, no traceback) before any folder is made; tiny
real ablations (width 4, one or two epochs of 240 random images) check what `ablate` writes,
that its numbers are the run folders' numbers and the statistics computed from them, that an
interrupted ablation continues without retraining finished runs, that vmapped seeds train what
sequential seeds train, and that TensorBoard labels each run with its cell.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import statistics
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import assert_user_error
from scipy import stats
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from hooktrain.ablation.results import AblationResult
from hooktrain.ablation.runner import run_ablation
from hooktrain.ablation.spec import (
    ABLATION_FILE,
    CELLS_FOLDER,
    TABLE_FILE,
    Ablation,
    Cell,
    Factor,
    cell_recipe,
    split_values,
)
from hooktrain.cli import main
from hooktrain.config.overrides import apply_overrides
from hooktrain.config.recipe import Recipe
from hooktrain.config.registry import load_recipe
from hooktrain.core.context import EpochReport, Trained
from hooktrain.errors import HooktrainError
from hooktrain.plugins.checkpoint import CHECKPOINT_FOLDER, LAST
from hooktrain.plugins.grad_clip import GradClip
from hooktrain.plugins.metrics import METRICS_FILE, TENSORBOARD_FOLDER
from hooktrain.run import loop
from hooktrain.run.checkpoints import load_checkpoint
from hooktrain.run.files import CONFIG_FILE

FLAGSHIP = "resnet9_cifar10"
TINY = ["model.width=4", "batch_size=40", "eval_batch_size=100", "metrics.progress=false"]


def sets(*assignments: str) -> list[str]:
    return [arg for assignment in assignments for arg in ("--set", assignment)]


CLI_TINY = [*sets(*TINY, "epochs=1"), "--device", "cpu"]


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test from tmp_path, so a default `runs/` folder could only appear there."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def flagship() -> Recipe:
    return apply_overrides(load_recipe(FLAGSHIP), [*TINY, "epochs=1"])


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args])


def succeeded(result: Result) -> str:
    """The output of a command that must have exited 0 (else its traceback, for the report)."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError("".join(traceback.format_exception(*result.exc_info)))
    assert result.exit_code == 0, result.output
    return result.output


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def run_dir(out: Path, folder: str, seed: int) -> Path:
    return out / CELLS_FOLDER / folder / f"seed-{seed}"


def fake_train_seeds(calls: list[dict[str, Any]]) -> Callable[..., list[Trained]]:
    """A stand-in for the engine's train_seeds: records what it was asked, trains nothing.

    The runner reads only each run's report, so the fake has no state or model to give back.
    """

    def train_seeds(
        recipe: Recipe, seeds: Sequence[int], *, out_dirs: Sequence[Path], **kwargs: Any
    ) -> list[Trained]:
        calls.append({"recipe": recipe, "seeds": list(seeds), "out_dirs": list(out_dirs), **kwargs})
        return [
            Trained(
                report=EpochReport(
                    epoch=1,
                    step=6,
                    train_loss=2.0,
                    metrics={"test_loss": 2.0, "test_accuracy": seed / 10},
                    seconds=0,
                ),
                state=None,  # type: ignore[arg-type]
                model=None,  # type: ignore[arg-type]
            )
            for seed in seeds
        ]

    return train_seeds


def expected_summary(
    accuracies: list[float], baseline: list[float] | None
) -> tuple[float, float, float | None, float | None, float | None]:
    """Mean, std (n-1) and the paired delta with its 95% t interval, computed here."""
    n = len(accuracies)
    mean = statistics.mean(accuracies)
    std = statistics.stdev(accuracies)
    if baseline is None:
        return mean, std, None, None, None
    differences = [a - b for a, b in zip(accuracies, baseline, strict=True)]
    delta = statistics.mean(differences)
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return mean, std, delta, delta - half, delta + half


def expected_row(name: str, accuracies: list[float], baseline: list[float] | None, s: float) -> str:
    """The table row of a cell, from the figures computed here (wall seconds given)."""
    mean, std, delta, low, high = expected_summary(accuracies, baseline)
    if delta is None:
        change = "(baseline)"
    else:
        assert low is not None and high is not None
        change = f"{100 * delta:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"
    accuracy = f"{100 * mean:.2f} ± {100 * std:.2f}"
    return f"| {name} | {len(accuracies)} | {accuracy} | {change} | {s:.1f} |"


# ---------------------------------------------------------------------------------------------
# 1. The matrix of cells


def test_grid_runs_every_combination_once_baseline_first(flagship: Recipe) -> None:
    """3 factors (2 x 2 x 3) give 12 cells: the baseline first and named so, each combination
    exactly once, every other cell named by the settings where it differs from the baseline."""
    vary = {"grad_clip": ["on", "off"], "weight_decay": ["on", "off"], "max_lr": [0.01, 0.02, 0.03]}
    cells = Ablation(vary=vary, mode="grid").cells(flagship)
    assert len(cells) == 12
    assert cells[0].name == "baseline"
    assert cells[0].baseline
    assert not any(cell.baseline for cell in cells[1:])
    assert dict(cells[0].settings) == {"grad_clip": "on", "weight_decay": "on", "max_lr": "0.01"}

    texts = {key: [str(v) for v in values] for key, values in vary.items()}
    combinations = [
        tuple(zip(texts, values, strict=True)) for values in itertools.product(*texts.values())
    ]
    assert sorted(cell.settings for cell in cells) == sorted(combinations)
    baseline = dict(combinations[0])
    for cell in cells[1:]:
        differing = [f"{k}={v}" for k, v in cell.settings if baseline[k] != v]
        assert cell.name == ",".join(differing)
    names = [cell.name for cell in cells]
    assert len(set(names)) == 12
    assert "grad_clip=off,max_lr=0.03" in names
    assert "max_lr=0.02" in names
    assert "grad_clip=off,weight_decay=off,max_lr=0.02" in names


def test_one_at_a_time_changes_one_factor_per_cell(flagship: Recipe) -> None:
    """one-at-a-time: the baseline plus each non-baseline value alone, 1 + 1 + 1 + 2 = 5."""
    vary = {"grad_clip": ["on", "off"], "weight_decay": ["on", "off"], "max_lr": [0.01, 0.02, 0.03]}
    cells = Ablation(vary=vary, mode="one-at-a-time").cells(flagship)
    assert [cell.name for cell in cells] == [
        "baseline",
        "grad_clip=off",
        "weight_decay=off",
        "max_lr=0.02",
        "max_lr=0.03",
    ]
    base = dict(cells[0].settings)
    for cell in cells[1:]:
        changed = [k for k, v in cell.settings if base[k] != v]
        assert len(changed) == 1, cell


def test_settings_of_a_plugin_switched_off_are_moot(flagship: Recipe) -> None:
    """grad_clip off makes grad_clip.max meaningless: 3 cells, not 4, and the off cell has no
    grad_clip.max setting."""
    vary = {"grad_clip": ["on", "off"], "grad_clip.max": ["0.05", "0.1"]}
    cells = Ablation(vary=vary, mode="grid").cells(flagship)
    assert [cell.name for cell in cells] == ["baseline", "grad_clip.max=0.1", "grad_clip=off"]
    assert cells[2].settings == (("grad_clip", "off"),)
    assert dict(cells[0].settings) == {"grad_clip": "on", "grad_clip.max": "0.05"}


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("a,b,(c,d)", ["a", "b", "c,d"]),
        ("(0.9,0.99),(0.8,0.99)", ["0.9,0.99", "0.8,0.99"]),
        ("[0.9, 0.99], 0.5", ["0.9, 0.99", "0.5"]),
        (" 0.1 , 0.2 ", ["0.1", "0.2"]),
    ],
)
def test_split_values_keeps_brackets_together(text: str, values: list[str]) -> None:
    assert split_values(text) == values


def test_bracketed_tuples_become_tuple_recipes(flagship: Recipe) -> None:
    """`betas=(0.9,0.99),(0.8,0.99)` is two values; each cell's recipe has that betas tuple."""
    factor = Factor.parse("betas=(0.9,0.99),(0.8,0.99)")
    assert factor == Factor("betas", ("0.9,0.99", "0.8,0.99"))
    ablation = Ablation(vary=[factor])
    cells = ablation.cells(flagship)
    assert [cell.name for cell in cells] == ["baseline", "betas=0.8,0.99"]
    recipes = [cell_recipe(flagship, cell, set()) for cell in cells]
    assert [recipe.betas for recipe in recipes] == [(0.9, 0.99), (0.8, 0.99)]
    assert all(isinstance(recipe.betas, tuple) for recipe in recipes)


def test_python_values_in_vary(flagship: Recipe) -> None:
    """Floats, booleans and tuples given as Python values vary the recipe like their text;
    booleans read as on/off, so they switch plugins too."""
    ablation = Ablation(
        vary={
            "tta_flip": [True, False],
            "max_lr": [0.01, 2e-3],
            "betas": [(0.9, 0.999), (0.8, 0.99)],
            "grad_clip": [True, False],
        },
        mode="one-at-a-time",
    )
    assert [f.values for f in ablation.vary] == [
        ("on", "off"),
        ("0.01", "0.002"),
        ("0.9,0.999", "0.8,0.99"),
        ("on", "off"),
    ]
    cells = ablation.cells(flagship)
    assert [cell.name for cell in cells] == [
        "baseline",
        "tta_flip=off",
        "max_lr=0.002",
        "betas=0.8,0.99",
        "grad_clip=off",
    ]
    recipes = {cell.name: cell_recipe(flagship, cell, {"grad_clip"}) for cell in cells}
    assert recipes["baseline"].tta_flip is True
    assert recipes["tta_flip=off"].tta_flip is False
    assert recipes["tta_flip=off"].max_lr == 0.01
    assert recipes["grad_clip=off"].plugin("grad_clip") is None
    assert recipes["baseline"].plugin("grad_clip") is not None
    assert recipes["max_lr=0.002"].max_lr == pytest.approx(0.002)
    assert type(recipes["max_lr=0.002"].max_lr) is float
    assert recipes["betas=0.8,0.99"].betas == (0.8, 0.99)


def test_api_rejects_bad_ablations(flagship: Recipe) -> None:
    """The Python API checks what the command line checks, with HooktrainError."""
    with pytest.raises(HooktrainError, match="at least one --vary"):
        Ablation(vary={})
    with pytest.raises(HooktrainError, match="--seeds and --parallel-seeds must be 1 to 10000"):
        Ablation(vary={"max_lr": [0.01]}, seeds=0)
    with pytest.raises(HooktrainError, match="--seeds and --parallel-seeds must be 1 to 10000"):
        Ablation(vary={"max_lr": [0.01]}, parallel_seeds=0)
    with pytest.raises(HooktrainError, match="mode must be one of grid, one-at-a-time"):
        Ablation(vary={"max_lr": [0.01]}, mode="pairs")  # type: ignore[arg-type]
    with pytest.raises(HooktrainError, match=re.escape("lists '0.1' twice")):
        Ablation(vary={"max_lr": [0.1, 0.1]})
    with pytest.raises(HooktrainError, match="in the cell max_lr=abc"):
        Ablation(vary={"max_lr": [0.1, "abc"]}).cells(flagship)


def test_varying_the_seed_is_refused() -> None:
    """`seed` is a recipe field, but the seeds belong to --seeds: a `seed` factor would train
    the baseline's runs again under another name."""
    with pytest.raises(HooktrainError, match=r"--vary seed is not a factor.*--seeds N"):
        Ablation(vary={"seed": [0, 1]}, seeds=1)


def test_values_that_mean_the_same_are_refused(flagship: Recipe) -> None:
    with pytest.raises(
        HooktrainError, match=re.escape("cells baseline and max_lr=0.10 the same settings")
    ):
        Ablation(vary={"max_lr": ["0.1", "0.10"]}).cells(flagship)
    with pytest.raises(HooktrainError, match="the same settings"):
        Ablation(vary={"tta_flip": ["true", "on"]}).cells(flagship)


# ---------------------------------------------------------------------------------------------
# 2. The recipe of a cell


def test_cell_recipe_switches_plugins_and_applies_settings(flagship: Recipe) -> None:
    """Off removes the plugin, on adds one the recipe lacks (with its settings applied, where
    --with puts it: before metrics and checkpoint), recipe fields are set; the other plugins
    and fields are untouched."""
    without_clip = apply_overrides(flagship, without_plugins=["grad_clip"])
    vary = {
        "grad_clip": ["off", "on"],
        "grad_clip.max": ["0.05", "0.2"],
        "weight_decay": ["on", "off"],
        "max_lr": ["0.01", "0.004"],
    }
    ablation = Ablation(vary=vary)
    cells = {cell.name: cell for cell in ablation.cells(without_clip)}
    # grad_clip is off in the baseline, so its max is moot there: 2 x (1 + 2) x 2 cells.
    assert len(cells) == 12
    toggles = {"grad_clip", "weight_decay"}

    baseline = cell_recipe(without_clip, cells["baseline"], toggles)
    assert baseline == without_clip

    name = "grad_clip=on,grad_clip.max=0.2,weight_decay=off,max_lr=0.004"
    recipe = cell_recipe(without_clip, cells[name], toggles)
    assert [p.name for p in recipe.plugins] == [
        "data_parallel",
        "nan_guard",
        "onecycle",
        "grad_clip",
        "metrics",
        "checkpoint",
    ]
    clip = recipe.plugin("grad_clip")
    assert isinstance(clip, GradClip)
    assert (clip.max, clip.mode) == (0.2, "value")
    assert recipe.plugin("weight_decay") is None
    assert recipe.max_lr == pytest.approx(0.004)
    assert (recipe.model.args["width"], recipe.epochs, recipe.batch_size) == (4, 1, 40)
    assert recipe.plugin("onecycle") == flagship.plugin("onecycle")

    clip_on = cell_recipe(without_clip, cells["grad_clip=on,grad_clip.max=0.05"], toggles)
    on_clip = clip_on.plugin("grad_clip")
    assert isinstance(on_clip, GradClip)
    assert on_clip.max == 0.05
    assert clip_on.plugin("weight_decay") == flagship.plugin("weight_decay")
    assert clip_on.max_lr == 0.01

    # Switching on a plugin the recipe has, or off one it lacks, changes nothing.
    keep = Cell("weight_decay=on", (("weight_decay", "on"),), False)
    assert cell_recipe(flagship, keep, {"weight_decay"}) == flagship
    lacking = Cell("grad_clip=off", (("grad_clip", "off"),), False)
    assert cell_recipe(without_clip, lacking, {"grad_clip"}) == without_clip


# ---------------------------------------------------------------------------------------------
# 3. Bad specs on the command line


NO_ABLATION_RECIPE = """
from hooktrain.config.registry import load_recipe

recipe = load_recipe("resnet9_cifar10")
"""


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (
            ["--vary", "gradclip=on,off"],
            ["--vary gradclip", "neither a recipe field nor a plugin", "Did you mean 'grad_clip'?"],
        ),
        (["--vary", "max_lrr=0.1,0.2"], ["'max_lrr' is neither", "Did you mean 'max_lr'?"]),
        (["--vary", "grad_clip="], ["--vary grad_clip needs at least one value"]),
        (["--vary", "max_lr=0.1,"], ["--vary max_lr needs at least one value and no empty"]),
        (
            ["--vary", "max_lr=0.1,abc"],
            ["in the cell max_lr=abc", "max_lr must be a number (float), not 'abc'"],
        ),
        (
            ["--vary", "grad_clip=on,maybe"],
            ["'grad_clip' is a plugin, so its values are on and off, not 'maybe'"],
        ),
        (["--vary", "grad_clip"], ["--vary takes KEY=VALUE1,VALUE2", "not 'grad_clip'"]),
        (["--vary", "=on,off"], ["--vary takes KEY=VALUE1,VALUE2"]),
        (["--vary", "max_lr=0.1,0.2,0.1"], ["--vary max_lr lists '0.1' twice"]),
        (
            ["--vary", "max_lr=0.1,0.2", "--vary", "max_lr=0.3"],
            ["--vary max_lr is given twice"],
        ),
        (
            ["--vary", "max_lr=0.1,0.2", "--set", "max_lr=0.3"],
            ["max_lr is both varied and fixed"],
        ),
        (
            ["--vary", "grad_clip=on,off", "--without", "grad_clip"],
            ["grad_clip is both varied and fixed"],
        ),
        (
            ["--vary", "grad_clip.maximum=0.1,0.2"],
            ["has no setting 'grad_clip.maximum'", "Did you mean 'grad_clip.max'?"],
        ),
        (
            ["--vary", "grad_clip.max=0.05,0.1", "--without", "grad_clip"],
            ["in the cell baseline", "no plugin 'grad_clip'"],
        ),
        (["--vary", "optimizer=adam,rmsprop"], ["optimizer must be one of adam, adamw, sgd"]),
    ],
)
def test_bad_vary_is_one_sentence_and_makes_no_folder(
    tiny_cifar: Path, tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    """Every bad spec is refused before anything is written."""
    out = tmp_path / "ablation"
    result = invoke("ablate", FLAGSHIP, *args, *CLI_TINY, "--data-dir", tiny_cifar, "--out", out)
    assert_user_error(result, *fragments)
    assert not out.exists()
    assert not (tmp_path / "runs").exists()


def test_recipe_without_a_declared_ablation_needs_vary(tmp_path: Path) -> None:
    recipe_file = tmp_path / "plain.py"
    recipe_file.write_text(NO_ABLATION_RECIPE)
    out = tmp_path / "ablation"
    result = invoke("ablate", recipe_file, *CLI_TINY, "--out", out)
    assert_user_error(result, "Say what to vary", "declares no ablation of its own")
    assert not out.exists()


@pytest.mark.parametrize("option", ["--seeds", "--parallel-seeds"])
def test_seed_counts_below_one_are_refused(tmp_path: Path, option: str) -> None:
    out = tmp_path / "ablation"
    result = invoke("ablate", FLAGSHIP, "--vary", "grad_clip=on,off", option, "0", "--out", out)
    assert_user_error(result, "--seeds and --parallel-seeds must be 1 to 10000")
    assert not out.exists()


def test_declared_ablation_refuses_fixing_what_it_varies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """resnet9_cifar10 declares grad_clip=on,off: `--without grad_clip` contradicts it, as it
    does with an explicit `--vary grad_clip=on,off`."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(loop, "train_seeds", fake_train_seeds(calls))
    out = tmp_path / "ablation"
    result = invoke("ablate", FLAGSHIP, "--without", "grad_clip", *CLI_TINY, "--out", out)
    assert_user_error(result, "grad_clip is both varied and fixed")
    assert calls == []


# ---------------------------------------------------------------------------------------------
# 4. End to end through the command line


E2E_CELLS = {"baseline": "baseline", "grad_clip=off": "grad_clip=off"}  # name -> folder


@pytest.fixture(scope="module")
def grad_clip_ablation(tiny_cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """`hooktrain ablate resnet9_cifar10 --vary grad_clip=on,off --seeds 2`, two epochs."""
    out = tmp_path_factory.mktemp("e2e") / "clip"
    args = ["--vary", "grad_clip=on,off", "--seeds", "2", "--data-dir", tiny_cifar]
    # max_lr 0.02 makes the two cells' accuracies differ on this tiny data set.
    extra = [*sets(*TINY, "epochs=2", "max_lr=0.02"), "--device", "cpu"]
    output = succeeded(invoke("ablate", FLAGSHIP, *args, *extra, "--out", out))
    return output, out


def test_ablate_writes_results_equal_to_its_run_folders(grad_clip_ablation: tuple) -> None:
    """ablation.json holds every run's final test accuracy as its run folder's metrics.json
    has it; each run folder is an ordinary finished run of its cell's recipe and seed."""
    _, out = grad_clip_ablation
    assert (out / TABLE_FILE).is_file()
    saved = read_json(out / ABLATION_FILE)
    assert saved["format"] == "hooktrain-ablation"
    assert saved["spec"]["vary"] == {"grad_clip": ["on", "off"]}
    assert saved["spec"]["seeds"] == [0, 1]
    assert saved["spec"]["mode"] == "grid"
    assert [cell["name"] for cell in saved["cells"]] == list(E2E_CELLS)
    for cell in saved["cells"]:
        assert cell["folder"] == E2E_CELLS[cell["name"]]
        assert sorted(cell["runs"]) == ["0", "1"]
        for seed in (0, 1):
            folder = run_dir(out, cell["folder"], seed)
            metrics = read_json(folder / METRICS_FILE)
            assert metrics["finished"]
            assert len(metrics["epochs"]) == 2
            run = cell["runs"][str(seed)]
            assert run["test_accuracy"] == metrics["final_test_accuracy"]
            assert run["test_loss"] == metrics["epochs"][-1]["test_loss"]
            assert run["seconds"] >= metrics["wall_seconds"] > 0
            config = read_json(folder / "config.json")
            assert config["recipe"]["seed"] == seed
            assert config["recipe"]["epochs"] == 2
            plugins = [p["name"] for p in config["plugins"]]
            assert ("grad_clip" in plugins) == (cell["name"] == "baseline")
            assert (folder / CHECKPOINT_FOLDER / LAST).is_file()
    assert not (out / CELLS_FOLDER / "grad_clip=on").exists()


def test_ablate_summary_is_the_statistics_of_the_runs(grad_clip_ablation: tuple) -> None:
    """Mean, std (n-1), paired delta and its 95% t interval in ablation.json, the console and
    ablation.md equal those computed here from the run folders' metrics.json."""
    output, out = grad_clip_ablation
    saved = read_json(out / ABLATION_FILE)
    accuracies = {
        name: [
            read_json(run_dir(out, folder, seed) / METRICS_FILE)["final_test_accuracy"]
            for seed in (0, 1)
        ]
        for name, folder in E2E_CELLS.items()
    }
    summaries = {summary["cell"]: summary for summary in saved["summary"]}
    assert list(summaries) == list(E2E_CELLS)
    markdown = (out / TABLE_FILE).read_text()
    assert markdown.startswith("# Ablation of resnet9_cifar10\n")
    assert "Varied (grid, first value = baseline): grad_clip = on, off." in markdown
    assert "Seeds: 0, 1." in markdown
    for name, cell_accuracies in accuracies.items():
        baseline = None if name == "baseline" else accuracies["baseline"]
        mean, std, delta, low, high = expected_summary(cell_accuracies, baseline)
        summary = summaries[name]
        assert summary["runs"] == 2
        assert summary["baseline"] == (name == "baseline")
        assert summary["mean"] == pytest.approx(mean, abs=1e-12)
        assert summary["std"] == pytest.approx(std, abs=1e-12)
        for key, value in (("delta", delta), ("delta_low", low), ("delta_high", high)):
            if value is None:
                assert summary[key] is None
            else:
                assert summary[key] == pytest.approx(value, abs=1e-9)
        cell = next(c for c in saved["cells"] if c["name"] == name)
        assert summary["seconds"] == pytest.approx(sum(r["seconds"] for r in cell["runs"].values()))
        row = expected_row(name, cell_accuracies, baseline, summary["seconds"])
        assert row in output.splitlines()
        assert row in markdown.splitlines()
    assert f"table: {out / TABLE_FILE}" in output


def test_tensorboard_labels_each_run_with_its_cell(grad_clip_ablation: tuple) -> None:
    """Each run's hparams hold the tag `cell` and the toggled plugin as "on" or "off"."""
    _, out = grad_clip_ablation
    for name, folder in E2E_CELLS.items():
        for seed in (0, 1):
            events = EventAccumulator(str(run_dir(out, folder, seed) / TENSORBOARD_FOLDER))
            events.Reload()
            metadata = events.summary_metadata["_hparams_/session_start_info"]
            data = plugin_data_pb2.HParamsPluginData.FromString(metadata.plugin_data.content)
            hparams = data.session_start_info.hparams
            assert hparams["cell"].string_value == name
            assert hparams["grad_clip"].string_value == ("on" if name == "baseline" else "off")
            assert hparams["weight_decay"].string_value == "on"
            assert hparams["seed"].number_value == seed


# ---------------------------------------------------------------------------------------------
# 5. Interrupting and continuing


def test_interrupted_ablation_continues_without_retraining(
    tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in the third run: exit 130 and how to continue; the same command then trains only
    the two missing runs (the half-made run folder is replaced), the finished runs stay untouched
    and the final ablation.json has all four; a third time trains nothing."""
    out = tmp_path / "ablation"
    command = [
        "ablate", FLAGSHIP, "--vary", "grad_clip=on,off", "--seeds", "2",
        *CLI_TINY, "--data-dir", tiny_cifar, "--out", out,
    ]  # fmt: skip
    real_train_seeds = loop.train_seeds
    calls: list[list[int]] = []

    def interrupting(recipe: Recipe, seeds: Sequence[int], **kwargs: Any) -> Any:
        calls.append(list(seeds))
        if len(calls) == 3:  # a run cut off halfway leaves its config.json behind
            shutil.copy(run_dir(out, "baseline", 0) / CONFIG_FILE, kwargs["out_dirs"][0])
            raise KeyboardInterrupt
        return real_train_seeds(recipe, seeds, **kwargs)

    monkeypatch.setattr(loop, "train_seeds", interrupting)
    result = invoke(*command)
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output
    assert (
        f"Error: Interrupted; the finished runs are kept in {out / ABLATION_FILE}: run the same "
        f"command with --out {out} (or --resume) to do the rest." in result.stderr
    )
    assert calls == [[0], [1], [0]]
    saved = read_json(out / ABLATION_FILE)
    assert {c["name"]: sorted(c["runs"]) for c in saved["cells"]} == {
        "baseline": ["0", "1"],
        "grad_clip=off": [],
    }
    assert [s["cell"] for s in saved["summary"]] == ["baseline"]
    finished = [run_dir(out, "baseline", seed) / METRICS_FILE for seed in (0, 1)]
    before = [(path.stat().st_mtime_ns, path.read_bytes()) for path in finished]

    counted: list[list[int]] = []

    def counting(recipe: Recipe, seeds: Sequence[int], **kwargs: Any) -> Any:
        counted.append(list(seeds))
        return real_train_seeds(recipe, seeds, **kwargs)

    monkeypatch.setattr(loop, "train_seeds", counting)
    output = succeeded(invoke(*command))
    assert counted == [[0], [1]]
    assert f"continuing the ablation in {out}: 2 finished runs are kept" in output
    assert "[1/2 baseline] finished before, skipped" in output
    assert [(path.stat().st_mtime_ns, path.read_bytes()) for path in finished] == before
    # The leftover (the baseline's config) was replaced by the cell's own run.
    replaced = read_json(run_dir(out, "grad_clip=off", 0) / CONFIG_FILE)
    assert "grad_clip" not in [plugin["name"] for plugin in replaced["plugins"]]
    saved = read_json(out / ABLATION_FILE)
    for cell in saved["cells"]:
        assert sorted(cell["runs"]) == ["0", "1"]
        for seed in (0, 1):
            metrics = read_json(run_dir(out, cell["folder"], seed) / METRICS_FILE)
            assert cell["runs"][str(seed)]["test_accuracy"] == metrics["final_test_accuracy"]
    assert [s["cell"] for s in saved["summary"]] == ["baseline", "grad_clip=off"]

    counted.clear()
    output = succeeded(invoke(*command, "--resume"))
    assert counted == []
    assert "continuing the ablation in" in output
    assert "[2/2 grad_clip=off] finished before, skipped" in output
    assert read_json(out / ABLATION_FILE) == saved


def test_resume_needs_an_ablation_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--resume on a folder without ablation.json is refused and creates nothing; without
    --resume, a non-empty folder that holds no ablation is refused too."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(loop, "train_seeds", fake_train_seeds(calls))
    out = tmp_path / "nothing-here"
    result = invoke(
        "ablate", FLAGSHIP, "--vary", "grad_clip=on,off", *CLI_TINY, "--out", out, "--resume"
    )
    assert_user_error(result, f"{out} holds no ablation to resume")
    assert not out.exists()

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not an ablation")
    result = invoke("ablate", FLAGSHIP, "--vary", "grad_clip=on,off", *CLI_TINY, "--out", other)
    assert_user_error(result, f"{other} is not empty and holds no ablation")
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    assert calls == []


def _start_and_interrupt(monkeypatch: pytest.MonkeyPatch, *args: str | Path) -> Result:
    """Start an ablation and press Ctrl-C in its first run: ablation.json, no runs."""

    def interrupt(*_: Any, **__: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_seeds", interrupt)
    result = invoke("ablate", FLAGSHIP, *args)
    assert result.exit_code == 130, result.output
    return result


def test_same_folder_with_other_settings_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another --seeds (or --vary) on a folder holding an ablation is refused, with or without
    --resume, and the folder's ablation.json stays as it was; --parallel-seeds is not a setting
    of the results, so another one continues the ablation."""
    out = tmp_path / "ablation"
    common = ["--vary", "grad_clip=on,off", *CLI_TINY, "--out", out]
    _start_and_interrupt(monkeypatch, *common, "--seeds", "2")
    before = (out / ABLATION_FILE).read_bytes()
    for extra in (["--seeds", "3"], ["--seeds", "3", "--resume"], ["--set", "max_lr=0.02"]):
        result = invoke("ablate", FLAGSHIP, *common, "--seeds", "2", *extra)
        line = assert_user_error(
            result, f"{out} holds an ablation with other settings", "pass another --out"
        )
        assert ("its seeds differ" in line) == ("--seeds" in extra[0])
    result = invoke(
        "ablate", FLAGSHIP, "--vary", "grad_clip=off,on", *CLI_TINY, "--out", out, "--seeds", "2"
    )
    assert_user_error(result, "holds an ablation with other settings (its vary differ)")
    assert (out / ABLATION_FILE).read_bytes() == before

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(loop, "train_seeds", fake_train_seeds(calls))
    output = succeeded(invoke("ablate", FLAGSHIP, *common, "--seeds", "2", "--parallel-seeds", "2"))
    assert "continuing the ablation" in output
    assert [call["seeds"] for call in calls] == [[0, 1], [0, 1]]


def test_resume_finds_the_newest_matching_ablation_under_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --out, --resume continues the ablation under runs/ that has these settings, and
    refuses when none has."""
    common = ["--vary", "weight_decay=on,off", *CLI_TINY, "--seeds", "1"]
    _start_and_interrupt(monkeypatch, *common)
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.startswith("ablate-resnet9_cifar10-")

    result = invoke("ablate", FLAGSHIP, *common, "--set", "max_lr=0.02", "--resume")
    assert_user_error(result, "No ablation of resnet9_cifar10 with these settings is under runs/")

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(loop, "train_seeds", fake_train_seeds(calls))
    output = succeeded(invoke("ablate", FLAGSHIP, *common, "--resume"))
    assert f"continuing the ablation in {Path('runs') / folder.name}" in output
    assert [call["out_dirs"] for call in calls] == [
        [Path("runs") / folder.name / CELLS_FOLDER / "baseline" / "seed-0"],
        [Path("runs") / folder.name / CELLS_FOLDER / "weight_decay=off" / "seed-0"],
    ]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [folder.name]
    runs = {c["name"]: c["runs"] for c in read_json(folder / ABLATION_FILE)["cells"]}
    assert runs["weight_decay=off"]["0"]["test_accuracy"] == 0.0  # the fake's seed 0 / 10


# ---------------------------------------------------------------------------------------------
# 6. Seeds trained together


@pytest.mark.usefixtures("float64_training")
def test_parallel_seeds_train_what_sequential_seeds_train(tiny_cifar: Path, tmp_path: Path) -> None:
    """--parallel-seeds 2 trains each cell's two seeds in one vmapped step, into a run folder
    per seed, and ends where training them one at a time ends, to 1e-7 in float64.

    In float32 the two paths cannot be compared tightly on every CPU. Measured on this run
    (6 SGD steps, width 4): both stay within 2.4e-7 of float64 for three steps; then, in one
    path, a max-pool pair that differs by 6e-7 swaps its winner or a ReLU input within 1e-6 of
    zero changes side, the gradient of 0.0.weight jumps by 2e-3 (of 0.8-1.4), and the gap grows
    about tenfold a step (1.8e-5, 5.6e-5 here, 1.1e-3 on an AVX-512 Xeon). Raising one input
    pixel by one ulp moves the one-by-one float32 run just as far (4.2e-5). In float64 the
    paths agree to 2.2e-16 here; a batch order shifted by one image or the next dropout
    mask moves the weights by 1e-2 (5% of their size), a wrong seed by more.
    """
    common = [
        "ablate", FLAGSHIP, "--vary", "grad_clip=on,off", "--seeds", "2",
        *sets(*TINY, "epochs=1", "optimizer=sgd"),
        "--device", "cpu", "--data-dir", tiny_cifar,
    ]  # fmt: skip
    together, apart = tmp_path / "together", tmp_path / "apart"
    output = succeeded(invoke(*common, "--parallel-seeds", "2", "--out", together))
    sequential_output = succeeded(invoke(*common, "--out", apart))
    assert "6 steps of 40 x 2 seeds together" in output
    assert "seeds together" not in sequential_output
    saved, sequential = read_json(together / ABLATION_FILE), read_json(apart / ABLATION_FILE)
    assert saved["spec"] == sequential["spec"]  # parallel_seeds does not change the results
    exact = {"rtol": 1e-7, "atol": 1e-9}
    for cell, sequential_cell in zip(saved["cells"], sequential["cells"], strict=True):
        for seed in (0, 1):
            folder = run_dir(together, cell["folder"], seed)
            assert read_json(folder / "config.json")["recipe"]["seed"] == seed
            metrics = read_json(folder / METRICS_FILE)
            run, alone_run = cell["runs"][str(seed)], sequential_cell["runs"][str(seed)]
            assert run["test_accuracy"] == metrics["final_test_accuracy"]
            assert run["test_accuracy"] == alone_run["test_accuracy"]
            assert run["test_loss"] == pytest.approx(alone_run["test_loss"], rel=1e-7)
            state = load_checkpoint(folder / CHECKPOINT_FOLDER / LAST)["state"]
            alone = load_checkpoint(run_dir(apart, cell["folder"], seed) / CHECKPOINT_FOLDER / LAST)
            assert state["step"] == alone["state"]["step"] == 6
            assert state["params"]["0.0.weight"].dtype == torch.float64
            torch.testing.assert_close(state["params"], alone["state"]["params"], **exact)
            torch.testing.assert_close(state["buffers"], alone["state"]["buffers"], **exact)
    # The seeds of a cell really differ, far beyond the tolerance: not one run copied twice.
    first = load_checkpoint(run_dir(together, "baseline", 0) / CHECKPOINT_FOLDER / LAST)
    second = load_checkpoint(run_dir(apart, "baseline", 1) / CHECKPOINT_FOLDER / LAST)
    for name, tensor in first["state"]["params"].items():
        if name.endswith("0.weight"):  # every convolution
            assert not torch.allclose(tensor, second["state"]["params"][name], rtol=1e-3), name


# ---------------------------------------------------------------------------------------------
# 7. The Python API and declared ablations


def test_summary_statistics_on_known_numbers(flagship: Recipe) -> None:
    """summaries(): mean, std, paired delta and t interval from given accuracies; a cell with
    an unfinished seed is left out of the summaries and the table."""
    ablation = Ablation(vary={"max_lr": [0.01, 0.02, 0.03]}, seeds=3)
    cells = ablation.cells(flagship)
    figures = {
        "baseline": [0.50, 0.60, 0.55],
        "max_lr=0.02": [0.58, 0.61, 0.66],
        "max_lr=0.03": [0.40, 0.45],
    }
    runs = {
        name: {str(seed): {"test_accuracy": a, "test_loss": 1.0, "seconds": 2.0} for seed, a in
               enumerate(accuracies)}
        for name, accuracies in figures.items()
    }  # fmt: skip
    result = AblationResult(ablation.spec(flagship), cells, runs)
    summaries = result.summaries()
    assert [s.cell for s in summaries] == ["baseline", "max_lr=0.02"]
    for summary in summaries:
        baseline = None if summary.baseline else figures["baseline"]
        mean, std, delta, low, high = expected_summary(figures[summary.cell], baseline)
        assert summary.runs == 3
        assert summary.seconds == 6.0
        assert summary.mean == pytest.approx(mean)
        assert summary.std == pytest.approx(std)
        for got, want in ((summary.delta, delta), (summary.delta_low, low)):
            assert got == (None if want is None else pytest.approx(want))
        assert summary.delta_high == (None if high is None else pytest.approx(high))
    # By hand: differences 0.08, 0.01, 0.11; mean 0.0667, sd 0.0513, t(0.975, 2) = 4.303.
    assert summaries[1].delta == pytest.approx(0.2 / 3)
    assert summaries[1].delta_low == pytest.approx(0.2 / 3 - 4.302653 * 0.051316 / math.sqrt(3))
    table = result.table().splitlines()
    assert len(table) == 4
    assert table[2] == "| baseline | 3 | 55.00 ± 5.00 | (baseline) | 6.0 |"
    assert table[3].startswith("| max_lr=0.02 | 3 | 61.67 ± 4.04 | +6.67 [-6.08, +19.41] |")


def test_run_ablation_api_matches_its_files(
    flagship: Recipe, tiny_cifar: Path, tmp_path: Path
) -> None:
    """run_ablation returns an AblationResult holding what ablation.json holds, trains each
    cell's recipe (weight_decay missing from the off cell's saved config) and echoes the table;
    its summaries and ablation.md's rows are the statistics computed here from the run folders."""
    lines: list[str] = []
    out = tmp_path / "api"
    ablation = Ablation(vary={"weight_decay": ["on", "off"]}, seeds=2)
    result = run_ablation(
        flagship, ablation, out_dir=out, data_dir=tiny_cifar, device="cpu", echo=lines.append
    )
    assert isinstance(result, AblationResult)
    saved = read_json(out / ABLATION_FILE)
    assert result.to_json() == saved
    assert [s.cell for s in result.summaries()] == ["baseline", "weight_decay=off"]
    assert lines[0] == f"ablation of resnet9_cifar10: 2 cells x 2 seeds (grid), in {out}"
    accuracies: dict[str, list[float]] = {}
    for cell in result.cells:
        accuracies[cell.name] = []
        for seed in (0, 1):
            folder = run_dir(out, cell.folder, seed)
            accuracy = read_json(folder / METRICS_FILE)["final_test_accuracy"]
            assert result.runs[cell.name][str(seed)]["test_accuracy"] == accuracy
            accuracies[cell.name].append(accuracy)
            plugins = [p["name"] for p in read_json(folder / "config.json")["plugins"]]
            assert ("weight_decay" in plugins) == cell.baseline
    markdown_rows = (out / TABLE_FILE).read_text().splitlines()
    for summary in result.summaries():
        baseline = None if summary.baseline else accuracies["baseline"]
        mean, std, delta, low, high = expected_summary(accuracies[summary.cell], baseline)
        assert (summary.mean, summary.std) == (pytest.approx(mean), pytest.approx(std))
        for got, want in ((summary.delta, delta), (summary.delta_low, low)):
            assert got == (None if want is None else pytest.approx(want))
        assert summary.delta_high == (None if high is None else pytest.approx(high))
        row = expected_row(summary.cell, accuracies[summary.cell], baseline, summary.seconds)
        assert row in markdown_rows
        assert any(row in line.splitlines() for line in lines)  # the echoed table
    assert any(line.startswith("[2/2 weight_decay=off] seed 1: ") for line in lines)


DECLARED_RECIPE = """
import attrs

from hooktrain.ablation.spec import Ablation
from hooktrain.config.overrides import apply_overrides
from hooktrain.config.registry import load_recipe

recipe = attrs.evolve(
    apply_overrides(load_recipe("resnet9_cifar10"), TINY), name="tiny_declared"
)
ablation = Ablation(vary={"max_lr": [0.01, 0.02]}, mode="one-at-a-time", seeds=3)
"""


def test_recipe_file_with_a_declared_ablation(tiny_cifar: Path, tmp_path: Path) -> None:
    """A .py recipe file's `ablation` runs without --vary; --seeds 1 overrides its 3 seeds."""
    recipe_file = tmp_path / "declared.py"
    recipe_file.write_text(DECLARED_RECIPE.replace("TINY", repr([*TINY, "epochs=1"])))
    out = tmp_path / "declared"
    output = succeeded(
        invoke(
            "ablate", recipe_file, "--device", "cpu", "--data-dir", tiny_cifar,
            "--out", out, "--seeds", "1",
        )
    )  # fmt: skip
    assert f"ablation of tiny_declared: 2 cells x 1 seeds (one-at-a-time), in {out}" in output
    saved = read_json(out / ABLATION_FILE)
    assert saved["spec"]["seeds"] == [0]
    assert saved["spec"]["mode"] == "one-at-a-time"
    assert saved["spec"]["vary"] == {"max_lr": ["0.01", "0.02"]}
    assert saved["spec"]["recipe"]["recipe"]["name"] == "tiny_declared"
    assert [c["name"] for c in saved["cells"]] == ["baseline", "max_lr=0.02"]
    assert sorted(p.name for p in (out / CELLS_FOLDER).iterdir()) == ["baseline", "max_lr=0.02"]
    for cell in saved["cells"]:
        assert sorted(p.name for p in (out / CELLS_FOLDER / cell["folder"]).iterdir()) == ["seed-0"]
        config = read_json(run_dir(out, cell["folder"], 0) / "config.json")
        assert config["recipe"]["max_lr"] == float(cell["settings"]["max_lr"])
        assert config["recipe"]["model"]["args"]["width"] == 4
    assert (out / TABLE_FILE).read_text().startswith("# Ablation of tiny_declared\n")
