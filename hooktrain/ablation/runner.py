"""Running an ablation: every cell's seeds trained into ``out_dir/cells/CELL/seed-S``, the
results saved after each run, so the same command continues an ablation that was cut off."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from hooktrain.ablation.results import AblationResult
from hooktrain.ablation.spec import (
    ABLATION_FILE,
    CELLS_FOLDER,
    FORMAT,
    TABLE_FILE,
    VERSION,
    Ablation,
    Cell,
    cell_recipe,
)
from hooktrain.config.recipe import Recipe
from hooktrain.core.task import check_metric
from hooktrain.errors import HooktrainError
from hooktrain.run.build import build_task
from hooktrain.run.files import atomic_write, read_json
from hooktrain.run.folder import claim_run_folder, hold_run_folder


def _check_run_figures(figures: Any, metric: str) -> None:
    """A finished run's figures as :func:`run_ablation` saves them (its metrics and seconds,
    finite numbers, the compared ``metric`` among them), or ValueError."""
    if not (
        isinstance(figures, dict)
        and metric in figures
        and "seconds" in figures
        and all(isinstance(n, float | int) and not isinstance(n, bool) for n in figures.values())
        and all(math.isfinite(n) for n in figures.values())
        # fractions: an accuracy above 1 was written by hand, not by a run
        and all(0 <= v <= 1 for k, v in figures.items() if k.endswith(("accuracy", "top5")))
    ):
        raise ValueError(f"a run's figures are malformed: {figures!r:.80}")


def _read_result(path: Path, spec: dict[str, Any], cells: list[Cell]) -> AblationResult:
    try:
        saved = read_json(path)
        if (
            not isinstance(saved, dict)
            or saved.get("format") != FORMAT
            or saved.get("version") != VERSION
        ):
            raise ValueError("not an ablation file of this version")
        runs = {cell["name"]: dict(cell["runs"]) for cell in saved["cells"]}
        for cell_runs in runs.values():
            for figures in cell_runs.values():
                _check_run_figures(figures, spec["metric"])
        saved_spec = saved["spec"]
    except (ValueError, KeyError, TypeError) as error:
        raise HooktrainError(
            f"{path} cannot be read as a hooktrain ablation ({error}); pass another --out."
        ) from error
    if saved_spec != json.loads(json.dumps(spec)):
        differs = [key for key in spec if saved_spec.get(key) != json.loads(json.dumps(spec[key]))]
        raise HooktrainError(
            f"{path.parent} holds an ablation with other settings (its {', '.join(differs)} "
            "differ); repeat the command that started it to continue it, or pass another --out."
        )
    return AblationResult(spec, cells, runs)


def _write(out_dir: Path, result: AblationResult) -> None:
    text = json.dumps(result.to_json(), indent=2) + "\n"
    markdown = result.markdown()
    for name, content in ((ABLATION_FILE, text), (TABLE_FILE, markdown)):
        try:
            atomic_write(out_dir / name, lambda file, c=content: file.write(c.encode()))
        except OSError as error:
            raise HooktrainError(
                f"Cannot write {out_dir / name} ({error.strerror or error}); the results saved "
                f"before are intact: make room and run the same command with --out {out_dir} "
                "to continue."
            ) from error


def holds_ablation(folder: Path, recipe: Recipe, ablation: Ablation) -> bool:
    """Whether ``folder`` has an ablation file with exactly this ablation's spec."""
    try:
        saved = read_json(folder / ABLATION_FILE)
    except ValueError:
        return False
    return isinstance(saved, dict) and saved.get("spec") == json.loads(
        json.dumps(ablation.spec(recipe))
    )


def run_ablation(
    recipe: Recipe,
    ablation: Ablation,
    *,
    out_dir: Path,
    data_dir: Path | None = None,
    device: str = "auto",
    echo: Callable[[str], None] = print,
) -> AblationResult:
    """Train every cell of ``ablation`` over its seeds, into ``out_dir``; return the results.

    A cell's seed is ``out_dir/cells/CELL/seed-S``, an ordinary run folder. Results are saved
    after every finished run, so running this again on the same folder skips what finished
    (a run cut off halfway starts over: its wall time would otherwise be wrong).
    """
    cells = ablation.cells(recipe)
    split, _, name = ablation.metric.partition("_")
    check_metric(build_task(recipe), name, f"The ablation's metric {ablation.metric!r}")
    if split not in ("test", "val") or (split == "val" and not recipe.val_split):
        raise HooktrainError(
            f"The ablation's metric {ablation.metric!r} names no evaluated split; compare a "
            "test_ metric (or a val_ one with --set val_split=...), e.g. test_accuracy."
        )
    spec = ablation.spec(recipe)
    path = out_dir / ABLATION_FILE
    if path.exists():
        result = _read_result(path, spec, cells)
        finished = sum(len(runs) for runs in result.runs.values())
        echo(f"continuing the ablation in {out_dir}: {finished} finished runs are kept")
    else:
        if out_dir.exists() and any(out_dir.iterdir()):
            raise HooktrainError(
                f"{out_dir} is not empty and holds no ablation; pass another --out."
            )
        result = AblationResult(spec, cells, {})
    # One process per ablation folder, as per run folder: a second one would delete the
    # first one's seed folders as leftovers.
    with hold_run_folder(out_dir):
        _write(out_dir, result)
        _train_cells(recipe, ablation, cells, result, out_dir, data_dir, device, echo)
    echo(result.table())
    echo(f"table: {out_dir / TABLE_FILE}; curves: tensorboard --logdir {out_dir}")
    return result


def _train_cells(
    recipe: Recipe,
    ablation: Ablation,
    cells: list[Cell],
    result: AblationResult,
    out_dir: Path,
    data_dir: Path | None,
    device: str,
    echo: Callable[[str], None],
) -> None:
    """Train every cell's seeds that are not done yet, saving the results after each run."""
    from hooktrain.run.build import resolve_device
    from hooktrain.run.loop import train_seeds

    toggles = ablation.toggles(recipe)

    seeds = ablation.seed_list(recipe)
    if ablation.parallel_seeds > 1 and resolve_device(device).type == "cpu":
        echo(
            "note: on the CPU, seeds trained together run slower than one by one (vmap makes "
            "grouped convolutions, which CPU kernels do worse); --parallel-seeds pays on GPUs."
        )
    echo(
        f"ablation of {recipe.name}: {len(cells)} cells x {len(seeds)} seeds "
        f"({ablation.mode}), in {out_dir}"
    )
    for number, cell in enumerate(cells, start=1):
        done = result.runs.setdefault(cell.name, {})
        todo = [s for s in seeds if str(s) not in done]
        label = f"[{number}/{len(cells)} {cell.name}]"
        if not todo:
            echo(f"{label} finished before, skipped")
            continue
        variant = cell_recipe(recipe, cell, toggles)
        tags = {"cell": cell.name, **{k: v for k, v in cell.settings if k in toggles}}
        for start in range(0, len(todo), ablation.parallel_seeds):
            group = todo[start : start + ablation.parallel_seeds]
            run_dirs = [_seed_folder(out_dir, cell, s) for s in group]
            started = time.perf_counter()
            prefix = f"{label} " if len(group) > 1 else f"{label} seed {group[0]}: "
            with contextlib.ExitStack() as claimed:
                for run_dir in run_dirs:  # a folder an interrupted attempt left is replaced
                    claimed.enter_context(claim_run_folder(run_dir, overwrite=True))
                trained = train_seeds(
                    attrs.evolve(variant, seed=group[0]),
                    group,
                    out_dirs=run_dirs,
                    data_dir=data_dir,
                    device=device,
                    echo=lambda line, prefix=prefix: echo(prefix + line),
                    tags=tags,
                )
            share = (time.perf_counter() - started) / len(group)
            for seed, run in zip(group, trained, strict=True):
                done[str(seed)] = {**run.report.metrics, "seconds": share}
            _write(out_dir, result)


def _seed_folder(out_dir: Path, cell: Cell, seed: int) -> Path:
    """``out_dir/cells/CELL/seed-S``, refusing links on the way: deleting a leftover seed
    folder must not reach outside the ablation folder."""
    for folder in (out_dir / CELLS_FOLDER, out_dir / CELLS_FOLDER / cell.folder):
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise HooktrainError(
                f"{folder} is not a folder of this ablation (a link or a file has its name); "
                "remove it, or pass another --out."
            )
    return out_dir / CELLS_FOLDER / cell.folder / f"seed-{seed}"


def newest_ablation(recipe: Recipe, ablation: Ablation, runs: Path = Path("runs")) -> Path:
    """The newest ``runs/ablate-RECIPE-*`` folder holding exactly this ablation (``--resume``)."""
    folders = sorted(runs.glob(f"ablate-{recipe.name}-*"), reverse=True)
    match = next((folder for folder in folders if holds_ablation(folder, recipe, ablation)), None)
    if match is None:
        raise HooktrainError(
            f"No ablation of {recipe.name} with these settings is under {runs}/ to resume; "
            "name its folder with --out, or start it without --resume."
        )
    return match
