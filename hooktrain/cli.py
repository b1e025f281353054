"""The ``hooktrain`` command: run, ablate, list, resume, eval.

Commands import the engine inside their bodies so ``hooktrain --help`` answers without
loading torch.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from hooktrain.errors import HooktrainError

if TYPE_CHECKING:  # the commands import the engine when they run, not at --help
    from hooktrain.engine.ablation import Ablation
    from hooktrain.engine.recipe import Recipe

DEVICES = click.Choice(["auto", "cpu", "cuda"])


class UserError(click.ClickException):
    """A :class:`HooktrainError` on its way out: the message alone, exit code 2."""

    exit_code = 2


class _Commands(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HooktrainError as error:
            raise UserError(str(error)) from error


def _data_dir_option(function: Any) -> Any:
    return click.option(
        "--data-dir",
        type=click.Path(path_type=Path, file_okay=False),
        help="Folder with cifar-10-batches-py/ or train/ and test/ class folders "
        "(default: the cache folder, downloading there if needed).",
    )(function)


def _device_option(function: Any) -> Any:
    return click.option(
        "--device", type=DEVICES, default="auto", show_default=True, help="Where to train."
    )(function)


def _override_options(function: Any) -> Any:
    function = click.option(
        "--without",
        "without_plugins",
        multiple=True,
        metavar="PLUGIN",
        help="Drop one of the recipe's plugins.",
    )(function)
    function = click.option(
        "--with", "with_plugins", multiple=True, metavar="PLUGIN", help="Add a plugin."
    )(function)
    return click.option(
        "--set",
        "assignments",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a recipe field (epochs=12) or plugin setting (grad_clip.max=0.05).",
    )(function)


@click.group(cls=_Commands)
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
@_device_option
def run(
    recipe_name: str,
    assignments: tuple[str, ...],
    with_plugins: tuple[str, ...],
    without_plugins: tuple[str, ...],
    data_dir: Path | None,
    out: Path | None,
    seed: int | None,
    device: str,
) -> None:
    """Train RECIPE (a name from `hooktrain list` or a .py file that assigns `recipe`)."""
    from hooktrain.engine.loop import train
    from hooktrain.engine.recipe import apply_overrides, load_recipe

    if seed is not None:
        assignments = (*assignments, f"seed={seed}")
    recipe = apply_overrides(load_recipe(recipe_name), assignments, with_plugins, without_plugins)
    out = out or Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()):
        raise HooktrainError(
            f"The run folder {out} is not empty; pass another --out, or continue that run "
            f"with `hooktrain resume {out}`."
        )
    with _interruptible(out):
        train(recipe, out_dir=out, data_dir=data_dir, device=device, echo=click.echo)


class Interrupted(click.ClickException):
    """Ctrl-C during training: say how to continue; 130 is the shell's code for SIGINT."""

    exit_code = 130


@contextlib.contextmanager
def _interruptible(run_dir: Path) -> Iterator[None]:
    from hooktrain.plugins.checkpoint import CHECKPOINT_FOLDER

    try:
        yield
    except KeyboardInterrupt:
        if any((run_dir / CHECKPOINT_FOLDER).glob("*.pt")):
            advice = f"continue from the last saved epoch with `hooktrain resume {run_dir}`"
        else:
            advice = (
                f"no epoch had finished, so nothing was saved: delete {run_dir} and start again"
            )
        raise Interrupted(f"Interrupted; {advice}.") from None


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
@_device_option
def ablate(
    recipe_name: str,
    vary: tuple[str, ...],
    mode: str | None,
    seeds: int | None,
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
    import attrs

    from hooktrain.engine.ablation import ABLATION_FILE, Ablation, Factor, run_ablation
    from hooktrain.engine.recipe import apply_overrides, load_recipe_module, parse_assignment

    base, module = load_recipe_module(recipe_name)
    factors = [Factor.parse(text) for text in vary]
    declared = getattr(module, "ablation", None)
    if factors:
        ablation = Ablation(vary=factors)
    elif isinstance(declared, Ablation):
        ablation = declared
    else:
        raise HooktrainError(
            f"Say what to vary, e.g. --vary grad_clip=on,off; the recipe {recipe_name!r} "
            "declares no ablation of its own."
        )
    changes = {"mode": mode, "seeds": seeds, "parallel_seeds": parallel_seeds}
    ablation = attrs.evolve(ablation, **{k: v for k, v in changes.items() if v is not None})
    fixed = {parse_assignment(text)[0] for text in assignments}
    ablation.check_fixed(fixed | set(with_plugins) | set(without_plugins))
    recipe = apply_overrides(base, assignments, with_plugins, without_plugins)
    if out is None and resume:
        out = _newest_ablation(recipe, ablation)
    if resume and not (out / ABLATION_FILE).is_file():
        raise HooktrainError(f"{out} holds no ablation to resume; start one without --resume.")
    out = out or Path("runs") / f"ablate-{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        run_ablation(
            recipe, ablation, out_dir=out, data_dir=data_dir, device=device, echo=click.echo
        )
    except KeyboardInterrupt:
        raise Interrupted(
            f"Interrupted; the finished runs are kept in {out / ABLATION_FILE}: run the same "
            f"command with --out {out} (or --resume) to do the rest."
        ) from None


def _newest_ablation(recipe: Recipe, ablation: Ablation) -> Path:
    from hooktrain.engine.ablation import holds_ablation

    folders = sorted(Path("runs").glob(f"ablate-{recipe.name}-*"), reverse=True)
    match = next((folder for folder in folders if holds_ablation(folder, recipe, ablation)), None)
    if match is None:
        raise HooktrainError(
            f"No ablation of {recipe.name} with these settings is under runs/ to resume; "
            "name its folder with --out, or start it without --resume."
        )
    return match


@main.command(name="list")
def list_() -> None:
    """List the recipes and plugins, the installed third-party ones too."""
    from hooktrain.engine.plugin import plugin_classes
    from hooktrain.engine.recipe import recipe_paths

    def first_line(obj: Any) -> str:
        return (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else ""

    click.echo("recipes:")
    for name, path in sorted(recipe_paths().items()):
        module = importlib.import_module(path.partition(":")[0])
        click.echo(f"  {name:<20} {first_line(module)}")
    click.echo("plugins:")
    for name, cls in sorted(plugin_classes().items()):
        click.echo(f"  {name:<20} {first_line(cls)}")


def _newest_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The run's checkpoint with the most steps, loaded (each file is read once)."""
    from hooktrain.engine.checkpoints import load_checkpoint
    from hooktrain.plugins.checkpoint import BEST, CHECKPOINT_FOLDER, LAST

    candidates = [run_dir / CHECKPOINT_FOLDER / n for n in (LAST, BEST)]
    loaded = [(path, load_checkpoint(path)) for path in candidates if path.is_file()]
    if not loaded:
        raise HooktrainError(
            f"{run_dir} has no checkpoints/{LAST}; pass the folder of a run that saved one."
        )
    return max(loaded, key=lambda entry: entry[1]["state"]["step"])


def _data_dir_of(payload: dict[str, Any], given: Path | None) -> Path | None:
    """``--data-dir`` if given, else the folder the checkpoint's run trained on."""
    saved = payload["config"]["run"]["data_dir"]
    return given or (Path(saved) if saved else None)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False))
@_data_dir_option
@click.option("--device", type=DEVICES, help="Where to train (default: as the run was started).")
def resume(run_dir: Path, data_dir: Path | None, device: str | None) -> None:
    """Continue the run in RUN_DIR from its newest checkpoint."""
    from hooktrain.engine.loop import CONFIG_FILE, train
    from hooktrain.engine.recipe import recipe_from_config

    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise HooktrainError(f"{run_dir} is not a hooktrain run folder (no {CONFIG_FILE}).")
    config = json.loads(config_path.read_text())
    path, payload = _newest_checkpoint(run_dir)
    if payload["recipe"] != config["recipe"]["name"]:
        raise HooktrainError(
            f"{path} was written by the recipe {payload['recipe']!r}, but {run_dir} is a run "
            f"of {config['recipe']['name']!r}; move the checkpoint back to its own run folder."
        )
    with _interruptible(run_dir):
        train(
            recipe_from_config(payload["config"]),
            out_dir=run_dir,
            data_dir=_data_dir_of(payload, data_dir),
            device=device or payload["config"]["run"]["device"],
            resume=payload,
            echo=click.echo,
        )


@main.command(name="eval")
@click.argument("checkpoint", type=click.Path(path_type=Path, dir_okay=False))
@_data_dir_option
@_device_option
def eval_(checkpoint: Path, data_dir: Path | None, device: str) -> None:
    """Test accuracy of a CHECKPOINT on the test images."""
    from hooktrain.engine.checkpoints import load_checkpoint
    from hooktrain.engine.loop import evaluate_checkpoint

    payload = load_checkpoint(checkpoint)
    result = evaluate_checkpoint(payload, _data_dir_of(payload, data_dir), device)
    click.echo(
        f"{checkpoint}: test accuracy {result.accuracy:.2%}, test loss {result.loss:.4f} "
        f"({payload['recipe']}, epoch {payload['state']['epoch']})"
    )
