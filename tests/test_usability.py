"""What a new user meets first: the progress bar, the logged curves, the command's name, its
version, the plugin order of --with, ablations of a plugin with settings, the package itself.

Runs are tiny (width 4, 240 random images, 6 steps an epoch); the progress bar is read where a
log file would catch it (a pipe, or pytest's capture: neither is a terminal), and the command
runs as a real `python -m hooktrain` process where its name or installation matters.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner, Result
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

import hooktrain
from hooktrain.ablation.spec import CELLS_FOLDER
from hooktrain.cli import main
from hooktrain.config.overrides import apply_overrides
from hooktrain.config.registry import load_recipe
from hooktrain.plugins.checkpoint import CHECKPOINT_FOLDER, LAST
from hooktrain.plugins.metrics import METRICS_FILE, TENSORBOARD_FOLDER
from hooktrain.plugins.onecycle import onecycle_schedule
from hooktrain.run.checkpoints import load_checkpoint, save_checkpoint
from hooktrain.run.files import CONFIG_FILE
from hooktrain.run.loop import train, train_seeds

REPO = Path(__file__).resolve().parents[1]
FLAGSHIP = "resnet9_cifar10"
TINY = ["model.width=4", "batch_size=40", "eval_batch_size=100"]
STEPS_PER_EPOCH = 6  # 240 images in batches of 40
# A line of tqdm's meter: "epoch 1/2:  50%|#####     | 6/12 [00:01<00:01, 5.1step/s, ...]".
METER = re.compile(r"^(epoch \d+/\d+(?: \(\d+ seeds\))?): +\d+%\|.*\| (\d+)/(\d+) \[")


def tiny(*assignments: str, epochs: int = 2) -> hooktrain.Recipe:
    return apply_overrides(load_recipe(FLAGSHIP), [*TINY, f"epochs={epochs}", *assignments])


def hooktrain_process(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m hooktrain ARGS` from this checkout, its output in pipes (not a terminal)."""
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "hooktrain", *map(str, args)],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def meter_lines(text: str) -> list[tuple[str, int, int]]:
    """(label, steps done, steps in all) of every progress line in ``text``."""
    return [
        (match[1], int(match[2]), int(match[3]))
        for line in text.splitlines()
        if (match := METER.match(line))
    ]


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args])


# --------------------------------------------------------------------------------------------
# The progress bar


def test_progress_in_a_log_counts_the_whole_run_and_continues_on_resume(
    tiny_cifar: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Outside a terminal the bar still reports, on lines of its own (no carriage returns that
    make one endless line of a log file), over all the run's steps, and a resumed run's bar
    starts at the steps already done. The old click bar printed nothing outside a terminal,
    and counted one epoch."""
    out = tmp_path / "run"
    total = 2 * STEPS_PER_EPOCH
    train(tiny(), out_dir=out, data_dir=tiny_cifar, device="cpu", stop_after_epoch=1)
    stopped = capsys.readouterr().out
    assert "\r" not in stopped
    lines = meter_lines(stopped)
    assert lines[0] == ("epoch 1/2", 0, total)
    assert lines[-1][1:] == (STEPS_PER_EPOCH, total)
    # A line per 30 s at most: a handful of lines over a run of seconds, not one per step.
    assert len(lines) < STEPS_PER_EPOCH

    resumed = hooktrain_process("resume", out, "--device", "cpu", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "\r" not in resumed.stdout
    lines = meter_lines(resumed.stdout)
    assert lines[0] == ("epoch 2/2", STEPS_PER_EPOCH, total)
    assert lines[-1][1:] == (total, total)
    # The last line shows the last window's figures, read when metrics are logged.
    last_line = [line for line in resumed.stdout.splitlines() if METER.match(line)][-1]
    assert re.search(r"loss [\d.]+ +lr [\d.e+-]+ +grad_norm [\d.]+\]$", last_line)
    assert "epoch 2/2  train loss" in resumed.stdout
    assert meter_lines(resumed.stderr) == []  # stderr is for an error's sentence alone


def test_seeds_trained_together_share_one_bar(
    tiny_cifar: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tiny(epochs=1)
    folders = [tmp_path / "seed-0", tmp_path / "seed-1"]
    train_seeds(recipe, [0, 1], out_dirs=folders, data_dir=tiny_cifar, device="cpu")
    lines = meter_lines(capsys.readouterr().out)
    assert lines[0] == ("epoch 1/1 (2 seeds)", 0, STEPS_PER_EPOCH)
    assert [line for line in lines if line[1] == 0] == [lines[0]]  # one bar, not one a seed
    assert lines[-1] == ("epoch 1/1 (2 seeds)", STEPS_PER_EPOCH, STEPS_PER_EPOCH)


def test_a_failed_run_leaves_stderr_to_its_error_and_its_bar_to_the_next_run(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    """A diverged run's bar is never closed (no hook tells a plugin of a failure): its error
    is still the one line on stderr, and the next run in the process draws its bar in its
    place, not a line below (cursor moves, ``ESC [A``, in a log)."""
    common = [arg for setting in [*TINY, "epochs=1"] for arg in ("--set", setting)]
    common += ["--data-dir", str(tiny_cifar), "--device", "cpu"]
    diverged = invoke(
        "run", FLAGSHIP, *common, "--set", "max_lr=1e30", "--set", "train_limit=80",
        "--without", "grad_clip", "--without", "onecycle", "--out", tmp_path / "diverged",
    )  # fmt: skip
    assert diverged.exit_code == 3
    assert diverged.stderr.startswith("Error: Training diverged")
    assert len(diverged.stderr.strip().splitlines()) == 1
    assert meter_lines(diverged.stdout)[0] == ("epoch 1/1", 0, 2)
    after = invoke("run", FLAGSHIP, *common, "--out", tmp_path / "after")
    assert after.exit_code == 0, after.output
    assert "\x1b[" not in after.stdout
    assert meter_lines(after.stdout)[-1] == ("epoch 1/1", STEPS_PER_EPOCH, STEPS_PER_EPOCH)


def test_under_torchrun_only_the_first_process_draws_the_bar(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    """Two processes, one bar (from rank 0, whose metrics plugin alone runs)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node=2", "-m", "hooktrain", "run", FLAGSHIP, "--device", "cpu"]
    command += [arg for setting in [*TINY, "epochs=1"] for arg in ("--set", setting)]
    command += ["--data-dir", str(tiny_cifar), "--out", str(tmp_path / "run")]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    job = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stdout + job.stderr
    lines = meter_lines(job.stdout)
    assert [line for line in lines if line[1] == 0] == [("epoch 1/1", 0, STEPS_PER_EPOCH)]
    assert lines[-1] == ("epoch 1/1", STEPS_PER_EPOCH, STEPS_PER_EPOCH)


# --------------------------------------------------------------------------------------------
# What the run folder records


@pytest.fixture(scope="module")
def stopped_run(tiny_cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 2 epochs stopped after the first (as SIGTERM would after saving)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    recipe = tiny("metrics.log_every=2", "metrics.progress=false")
    train(recipe, out_dir=out, data_dir=tiny_cifar, device="cpu", stop_after_epoch=1)
    return out


def test_lr_is_logged_at_the_step_and_loss_over_the_window(stopped_run: Path) -> None:
    """train/lr at step s is the rate step s trained with (the schedule at s - 1 steps done),
    not the mean of the window, which the old code logged."""
    events = EventAccumulator(str(stopped_run / TENSORBOARD_FOLDER)).Reload()
    schedule = onecycle_schedule(0.01, 2 * STEPS_PER_EPOCH)
    logged = [(event.step, event.value) for event in events.Scalars("train/lr")]
    assert [step for step, _ in logged] == [2, 4, 6]
    for step, value in logged:
        # float32 on both sides: the step computes the rate as the schedule does here.
        expected = schedule(torch.tensor(step - 1)).item()
        assert value == pytest.approx(expected, rel=1e-6), step
    losses = [event.step for event in events.Scalars("train/loss")]
    assert losses == [2, 4, 6]


def test_a_stopped_run_has_hparams_with_its_metrics_so_far(stopped_run: Path) -> None:
    """The HPARAMS tab lists a run that stopped before its end (the old code wrote hparams
    only at fit_end), with the classification task's test loss, accuracy and top-5 accuracy as
    its metrics."""
    events = EventAccumulator(str(stopped_run / TENSORBOARD_FOLDER)).Reload()
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        events.summary_metadata["_hparams_/experiment"].plugin_data.content
    ).experiment
    metrics = [info.name.tag for info in experiment.metric_infos]
    assert metrics == ["test/loss", "test/accuracy", "test/top5"]
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.summary_metadata["_hparams_/session_start_info"].plugin_data.content
    ).session_start_info
    assert start.hparams["model.width"].number_value == 4
    assert start.hparams["grad_clip"].string_value == "on"
    assert "_hparams_/session_end_info" not in events.summary_metadata  # not finished
    first_epoch = json.loads((stopped_run / METRICS_FILE).read_text())["epochs"][0]
    (accuracy,) = events.Scalars("test/accuracy")
    assert accuracy.value == pytest.approx(first_epoch["test_accuracy"], rel=1e-6)


def test_config_records_the_environment_and_a_resume_elsewhere_records_its_own(
    stopped_run: Path, tmp_path: Path
) -> None:
    """config.json names the versions and the device; a run continued on another machine
    (here: a checkpoint and config that say they come from one) records where it went on."""
    config = json.loads((stopped_run / CONFIG_FILE).read_text())
    here = {
        "hooktrain": hooktrain.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }
    environment = config["run"]["environment"]
    assert {key: environment[key] for key in here} == here
    assert isinstance(environment["device"], str) and environment["device"]

    folder = Path(shutil.copytree(stopped_run, tmp_path / "run"))
    elsewhere = {**environment, "device": "NVIDIA H100 80GB HBM3", "cuda": "12.8"}
    last = folder / CHECKPOINT_FOLDER / LAST
    payload = load_checkpoint(last)
    payload["config"]["run"]["environment"] = elsewhere
    save_checkpoint(payload, last)
    config["run"]["environment"] = elsewhere
    (folder / CONFIG_FILE).write_text(json.dumps(config))

    result = invoke("resume", folder, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert f"resuming {folder} at step {STEPS_PER_EPOCH}" in result.output
    assert json.loads((folder / CONFIG_FILE).read_text())["run"]["environment"] == environment


# --------------------------------------------------------------------------------------------
# The command itself


def test_python_m_hooktrain_names_itself_hooktrain(tmp_path: Path) -> None:
    """Under `python -m hooktrain` (as torchrun starts it) the advice names the command a user
    types; it said `hooktrain -m hooktrain run --help`."""
    result = hooktrain_process("run", "--bogus", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("see `hooktrain run --help`.")
    usage = hooktrain_process("--bogus", cwd=tmp_path)
    assert usage.stderr.startswith("Usage: hooktrain [OPTIONS]")


def test_version_from_a_checkout_on_pythonpath(tmp_path: Path) -> None:
    result = hooktrain_process("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"hooktrain, version {hooktrain.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+", hooktrain.__version__)


def test_installed_version_is_the_package_version() -> None:
    try:
        installed = importlib.metadata.version("hooktrain")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("hooktrain is not installed here, only on PYTHONPATH")
    assert installed == hooktrain.__version__


def test_eval_device_help_says_evaluate() -> None:
    result = invoke("eval", "--help")
    assert re.search(r"--device \S+\s+Where to evaluate\.", result.output)
    assert "Where to train" not in result.output


def test_wheel_carries_the_version_licence_and_py_typed(tmp_path: Path) -> None:
    """A wheel built from the project files holds py.typed, the LICENSE and BSD-3-Clause
    metadata, and the version hooktrain.__version__ says."""
    source = tmp_path / "source"
    shutil.copytree(
        REPO / "hooktrain", source / "hooktrain", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("hooktrain-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = f"hooktrain-{hooktrain.__version__}.dist-info"
        metadata = archive.read(f"{dist_info}/METADATA").decode()
        licence = archive.read(f"{dist_info}/licenses/LICENSE").decode()
    assert "hooktrain/py.typed" in names
    assert f"\nVersion: {hooktrain.__version__}\n" in metadata
    assert "\nLicense-Expression: BSD-3-Clause\n" in metadata
    assert "Copyright (c) 2026, the hooktrain developers" in licence
    assert re.search(r"\nRequires-Dist: tqdm>=4\.60\n", metadata)


# --------------------------------------------------------------------------------------------
# --with and ablations of an added plugin


def test_with_adds_before_a_closing_metrics_and_checkpoint() -> None:
    """`--with` plugins go after the recipe's others, in the order given, but before the
    metrics and checkpoint that close the list (the old code appended them after those);
    metrics or checkpoint added back go last."""
    recipe = load_recipe(FLAGSHIP)
    added = apply_overrides(recipe, with_plugins=["ema", "label_smoothing"])
    assert [p.name for p in added.plugins] == [
        "data_parallel", "nan_guard", "onecycle", "weight_decay", "grad_clip",
        "ema", "label_smoothing", "metrics", "checkpoint",
    ]  # fmt: skip
    readded = apply_overrides(recipe, with_plugins=["metrics"], without_plugins=["metrics"])
    assert [p.name for p in readded.plugins][-2:] == ["checkpoint", "metrics"]
    bare = apply_overrides(recipe, without_plugins=["metrics", "checkpoint"])
    assert [p.name for p in apply_overrides(bare, with_plugins=["ema"]).plugins][-1] == "ema"


@pytest.mark.parametrize("also_with", [False, True], ids=["set-alone", "with-and-set"])
def test_ablate_a_plugin_switched_on_with_its_settings(
    tiny_cifar: Path, tmp_path: Path, also_with: bool
) -> None:
    """`--vary ema=off,on --set ema.decay=0.5` trains ema with decay 0.5 where it is on, with
    or without `--with ema`; the old code asked for --with and then refused it as both varied
    and fixed."""
    out = tmp_path / "ablation"
    settings = [*TINY, "epochs=1", "metrics.progress=false", "ema.decay=0.5"]
    result = invoke(
        "ablate", FLAGSHIP, "--vary", "ema=off,on", "--seeds", "1",
        *(["--with", "ema"] if also_with else []),
        *(arg for setting in settings for arg in ("--set", setting)),
        "--data-dir", tiny_cifar, "--device", "cpu", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert meter_lines(result.output) == []  # metrics.progress=false: no bar
    cells = out / CELLS_FOLDER
    baseline = json.loads((cells / "baseline" / "seed-0" / CONFIG_FILE).read_text())
    assert "ema" not in [p["name"] for p in baseline["plugins"]]
    switched_on = json.loads((cells / "ema=on" / "seed-0" / CONFIG_FILE).read_text())
    plugins = {p["name"]: p["settings"] for p in switched_on["plugins"]}
    assert plugins["ema"]["decay"] == 0.5
    assert list(plugins)[-3:] == ["ema", "metrics", "checkpoint"]
