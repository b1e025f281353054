"""The ``hooktrain`` command: run, ablate, list, resume, eval.

Commands import the engine inside their bodies so ``hooktrain --help`` answers without
loading torch.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from hooktrain import __version__
from hooktrain.errors import HooktrainError, TrainingStopped, shown
from hooktrain.run.distributed import Topology, elastic_restart
from hooktrain.run.files import (
    CHECKPOINT_FOLDER,
    CONFIG_FILE,
    resume_command,
)
from hooktrain.run.folder import claim_run_folder, hold_run_folder
from hooktrain.run.resume import (
    DEVICES,
    config_if_readable,
    continue_run,
    data_dir_of,
    read_run_config,
    recipe_module_for,
)
from hooktrain.run.signals import Interrupted, interrupt_on_signals

if TYPE_CHECKING:  # the commands import the engine when they run, not at --help
    pass

DEVICE_CHOICE = click.Choice(DEVICES)


class UserError(click.ClickException):
    """A :class:`HooktrainError` on its way out: the message alone and the error's exit code
    (2 for something to fix, 3 for a diverged run, 128 + N for a run stopped by signal N)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        # One line whatever the user typed: a path or key with a line break stays on it.
        super().__init__(" ".join(message.splitlines()))
        self.exit_code = exit_code


class _Commands(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            with interrupt_on_signals():
                return super().invoke(ctx)
        except KeyboardInterrupt as error:  # outside training: click would say "Aborted!"
            if ctx.invoked_subcommand in ("run", "resume", "ablate"):
                raise _stopped(
                    error, "nothing was saved, so run the same command again", _BEFORE_TRAINING
                ) from None
            raise _stopped(error, "nothing was changed") from None
        except HooktrainError as error:
            raise UserError(str(error), error.exit_code) from error
        except OSError as error:
            if error.filename is None:  # not about a path the user gave: a bug to report
                raise
            # A path the system refuses (too long, unreadable, ...), wherever it was first used.
            raise UserError(
                f"Cannot use {shown(error.filename)} ({error.strerror or error}); check the path "
                "and its permissions."
            ) from error
        except click.UsageError as error:
            # One sentence, as for every other mistake, instead of click's usage block.
            # Named as typed at a shell, whatever the program was called (python -m, tests).
            subcommand = error.ctx.command_path.partition(" ")[2] if error.ctx else ""
            where = f"hooktrain {subcommand}".strip()
            message = error.format_message().rstrip(".?")
            raise UserError(f"{message}; see `{where} --help`.") from error


def _data_dir_option(function: Any) -> Any:
    return click.option(
        "--data-dir",
        type=click.Path(path_type=Path, file_okay=False),
        help="Folder with cifar-10-batches-py/ or train/ and test/ class folders "
        "(default: the cache folder, downloading there if needed).",
    )(function)


def _device_option(purpose: str) -> Any:
    """``--device``, for a command that does ``purpose`` ("train", "evaluate") there."""
    return click.option(
        "--device",
        type=DEVICE_CHOICE,
        default="auto",
        show_default=True,
        help=f"Where to {purpose}.",
    )


def _override_options(function: Any) -> Any:
    function = click.option(
        "--without",
        "without_plugins",
        multiple=True,
        metavar="PLUGIN",
        help="Drop one of the recipe's plugins.",
    )(function)
    function = click.option(
        "--with",
        "with_plugins",
        multiple=True,
        metavar="PLUGIN",
        help="Add a plugin: after the recipe's plugins, but before the metrics and checkpoint "
        "that end the list (they record and save what the others did; added back, they go last).",
    )(function)
    return click.option(
        "--set",
        "assignments",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a recipe field (epochs=12) or plugin setting (grad_clip.max=0.05).",
    )(function)


@click.group(cls=_Commands)
@click.version_option(__version__, prog_name="hooktrain")
def main() -> None:
    """hooktrain: functional, plugin-driven training for PyTorch."""


@main.command()
@click.argument("recipe_name", metavar="RECIPE")
@_override_options
@_data_dir_option
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    help="Run folder (default: runs/RECIPE-TIMESTAMP).",
)
@click.option("--seed", type=int, help="Seed for initialisation, data order and augmentation.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the run already in --out (its checkpoints, logs and metrics are deleted).",
)
@_device_option("train")
def run(
    recipe_name: str,
    assignments: tuple[str, ...],
    with_plugins: tuple[str, ...],
    without_plugins: tuple[str, ...],
    data_dir: Path | None,
    out: Path | None,
    seed: int | None,
    overwrite: bool,
    device: str,
) -> None:
    """Train RECIPE (a name from `hooktrain list` or a .py file that assigns `recipe`).

    Under `torchrun --nproc-per-node N -m hooktrain run ...` the N processes train the run
    data-parallel and the first writes the run folder; when torchrun restarts them after a
    failure (--max-restarts), they continue the run in --out from its last checkpoint.
    """
    from hooktrain.config.overrides import apply_overrides
    from hooktrain.config.registry import load_recipe_module
    from hooktrain.run.loop import train

    if seed is not None:
        assignments = (*assignments, f"seed={seed}")
    base, module = load_recipe_module(recipe_name)
    recipe = apply_overrides(base, assignments, with_plugins, without_plugins, module)
    if out is not None and elastic_restart() and (out / CONFIG_FILE).is_file():
        _continue_run(out, data_dir, device, module if recipe.source else None)
        return
    out = out or Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    # Under torchrun the first process alone makes and owns the folder.
    is_main = Topology.from_environment().is_main
    claim = claim_run_folder(out, overwrite) if is_main else contextlib.nullcontext()
    with claim, _interruptible(out):
        train(recipe, out_dir=out, data_dir=data_dir, device=device, echo=click.echo)


_BEFORE_TRAINING = " before training started"


def _stopped(error: KeyboardInterrupt | TrainingStopped, advice: str, when: str = "") -> UserError:
    """What a stopped run tells the user, with the shell's exit code for the signal.

    ``when`` says when a signal that came outside training came.
    """
    if isinstance(error, TrainingStopped):
        return UserError(f"{error}; {advice}.", error.exit_code)
    if not isinstance(error, Interrupted):  # raised by code, not by a signal
        return UserError(f"Interrupted; {advice}.", 128 + signal.SIGINT)
    if error.second:
        return UserError(
            f"Stopped at once by a second {error.name}; {advice}.", 128 + error.signal_number
        )
    return UserError(f"Interrupted by {error.name}{when}; {advice}.", 128 + error.signal_number)


@contextlib.contextmanager
def _interruptible(run_dir: Path) -> Iterator[None]:

    try:
        yield
    except (KeyboardInterrupt, TrainingStopped) as error:
        command = resume_command(
            run_dir, config_if_readable(run_dir), Topology.from_environment().distributed
        )
        if any((run_dir / CHECKPOINT_FOLDER).glob("*.pt")):
            advice = f"continue from the last checkpoint with `{command}`"
        elif (run_dir / CONFIG_FILE).is_file():
            advice = f"nothing was saved, so `{command}` starts it from the beginning"
        else:  # `run` removes the folder it made
            advice = "nothing was saved, so run the same command again"
        raise _stopped(error, advice, _BEFORE_TRAINING) from None


@main.command()
@click.argument("recipe_name", metavar="RECIPE")
@click.option(
    "--vary",
    multiple=True,
    metavar="KEY=V1,V2",
    help="A plugin (grad_clip=on,off), plugin setting (grad_clip.max=0.05,0.1) or recipe field "
    "(max_lr=0.005,0.01) and its values; the first value is the baseline. Repeatable.",
)
@click.option(
    "--mode",
    type=click.Choice(["grid", "one-at-a-time"]),
    help="Every combination (grid, the default) or each change alone against the baseline.",
)
@click.option("--seeds", type=int, help="Seeds per cell (default: as the recipe declares, else 3).")
@click.option("--metric", help="The final figure to compare (default test_accuracy; test_mse ...).")
@click.option(
    "--parallel-seeds",
    type=int,
    help="Train this many seeds of a cell at once in one vmapped step (default 1).",
)
@_override_options
@_data_dir_option
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    help="Ablation folder (default: runs/ablate-RECIPE-TIMESTAMP); an existing one with the "
    "same ablation is continued.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue --out, or the newest ablation under runs/ that has these settings.",
)
@_device_option("train")
def ablate(
    recipe_name: str,
    vary: tuple[str, ...],
    mode: str | None,
    seeds: int | None,
    metric: str | None,
    parallel_seeds: int | None,
    assignments: tuple[str, ...],
    with_plugins: tuple[str, ...],
    without_plugins: tuple[str, ...],
    data_dir: Path | None,
    out: Path | None,
    resume: bool,
    device: str,
) -> None:
    """Train RECIPE's variants over several seeds and tabulate what each change is worth.

    Without --vary, the ablation declared beside the recipe (`ablation = Ablation(...)`) runs.
    """
    if Topology.from_environment().distributed:
        raise HooktrainError(
            "hooktrain ablate does not run under torchrun yet (its cells and summary are "
            "written by one process); run it in one process, or run each cell with "
            "`torchrun ... -m hooktrain run`."
        )
    from hooktrain.ablation.runner import newest_ablation, run_ablation
    from hooktrain.ablation.spec import ABLATION_FILE, chosen_ablation
    from hooktrain.config.registry import load_recipe_module

    base, module = load_recipe_module(recipe_name)
    ablation = chosen_ablation(
        recipe_name,
        module,
        vary,
        mode=mode,
        seeds=seeds,
        metric=metric,
        parallel_seeds=parallel_seeds,
    )
    recipe = ablation.fixed_recipe(base, assignments, with_plugins, without_plugins)
    if out is None and resume:
        out = newest_ablation(recipe, ablation)
    if resume and not (out / ABLATION_FILE).is_file():
        raise HooktrainError(f"{out} holds no ablation to resume; start one without --resume.")
    out = out or Path("runs") / f"ablate-{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        run_ablation(
            recipe, ablation, out_dir=out, data_dir=data_dir, device=device, echo=click.echo
        )
    except (KeyboardInterrupt, TrainingStopped) as error:
        raise _stopped(
            error,
            f"the finished runs are kept in {out / ABLATION_FILE}: run the same command with "
            f"--out {out} (or --resume) to do the rest",
        ) from None


@main.command(name="list")
def list_() -> None:
    """List the recipes and plugins, the installed third-party ones too."""
    from hooktrain.config.registry import BUILTINS, recipe_paths, registered
    from hooktrain.core.plugin import plugin_classes

    def first_line(obj: Any) -> str:
        return (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else ""

    click.echo("recipes:")
    for name, path in sorted(recipe_paths().items()):
        module = importlib.import_module(path.partition(":")[0])
        click.echo(f"  {name:<20} {first_line(module)}")
    click.echo("plugins:")
    for name, cls in sorted(plugin_classes().items()):
        click.echo(f"  {name:<20} {first_line(cls)}")
    for kind in BUILTINS:
        click.echo(
            f"{kind} (--set {kind}={'A,B' if kind == 'augment' else 'NAME'}): "
            + ", ".join(sorted(registered(kind)))
        )


def _recipe_option(function: Any) -> Any:
    return click.option(
        "--recipe",
        "recipe_file",
        type=click.Path(path_type=Path, dir_okay=False),
        help="The recipe file the run was started with, when plugins it defines are used "
        "(a recipe file's code runs only when you name it).",
    )(function)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False))
@_data_dir_option
@click.option(
    "--device", type=DEVICE_CHOICE, help="Where to train (default: as the run was started)."
)
@_recipe_option
def resume(
    run_dir: Path, data_dir: Path | None, device: str | None, recipe_file: Path | None
) -> None:
    """Continue the run in RUN_DIR from its newest usable checkpoint.

    A damaged checkpoint is passed over for the newest good one (previous.pt, best.pt); a run
    killed before its first checkpoint starts again from the beginning. Under torchrun, with
    any number of processes. A finished run is never trained again.
    """
    config = read_run_config(run_dir / CONFIG_FILE)  # before torch loads: a typo says so fast
    # A run another process is training is refused before its checkpoints are read.
    is_main = Topology.from_environment().is_main
    with hold_run_folder(run_dir) if is_main else contextlib.nullcontext():
        _continue_run(run_dir, data_dir, device, recipe_module_for(recipe_file, config))


def _continue_run(
    run_dir: Path, data_dir: Path | None, device: str | None, recipe_module: Any
) -> None:
    with _interruptible(run_dir):
        continue_run(
            run_dir, data_dir=data_dir, device=device, recipe_module=recipe_module, echo=click.echo
        )


@main.command(name="eval")
@click.argument("checkpoint", type=click.Path(path_type=Path, dir_okay=False))
@_data_dir_option
@_device_option("evaluate")
@_recipe_option
def eval_(checkpoint: Path, data_dir: Path | None, device: str, recipe_file: Path | None) -> None:
    """The test metrics of a CHECKPOINT (accuracy and loss for classification)."""
    from hooktrain.core.context import metric_text
    from hooktrain.run.checkpoints import load_checkpoint
    from hooktrain.run.evaluation import evaluate_checkpoint

    payload = load_checkpoint(checkpoint)
    config = payload["config"] if isinstance(payload["config"], dict) else {}
    result = evaluate_checkpoint(
        payload, data_dir_of(config, data_dir), device, recipe_module_for(recipe_file, config)
    )
    figures = ", ".join(metric_text(f"test_{name}", value) for name, value in result.items())
    click.echo(f"{checkpoint}: {figures} ({payload['recipe']}, epoch {payload['state']['epoch']})")
