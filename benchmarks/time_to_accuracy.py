"""Time to accuracy: hooktrain recipes against airbench, on the same GPU and the same data copy.

Every contestant trains ``--seeds`` seeds after one throwaway warm-up run (compilation, cuDNN
autotuning and the allocator are paid there, and its time is reported on its own). Seeds are
interleaved (seed 0 of every contestant, then seed 1, ...) so drift of the machine hits all
alike. The table gives test accuracy and training seconds as mean ± std over seeds, and their
ratios to the reference's (airbench94; airbench94_muon.py for the airbench94_muon recipe, with
``--airbench-muon``); ``results.md`` and ``results.json`` (every seed's figures) are rewritten
after each run, so a cut-off benchmark keeps what it finished.

    python benchmarks/time_to_accuracy.py --data-dir DATA --recipes resnet9_cifar10,resnet9_fast \
        --airbench-src airbench-0.1.8.tar.gz --seeds 3
    python benchmarks/time_to_accuracy.py --data-dir .data --device cpu --recipes resnet9_cifar10 \
        --seeds 2 --set model.width=4 --set epochs=1 --set train_limit=500 \
        --set batch_size=50 --out /tmp/tta

airbench94 (the PyPI package ``airbench``, 0.1.8) needs CUDA; without it it is skipped. It reads
``cifar10/train.pt`` and ``cifar10/test.pt`` relative to the working directory, which this
script writes from the ``--data-dir`` copy into a scratch folder and runs airbench from there.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from airbench_muon_script import MUON, MUON_TIME_NOTE, MuonContestant, load_muon_script

from hooktrain.config.overrides import apply_overrides
from hooktrain.config.recipe import Recipe
from hooktrain.config.registry import load_recipe
from hooktrain.data.device import Splits
from hooktrain.data.sources import load_cifar10
from hooktrain.errors import HooktrainError
from hooktrain.run.build import resolve_device
from hooktrain.run.loop import train

QUIET = ["metrics.progress=false", "metrics.tensorboard=false"]
AIRBENCH = "airbench 0.1.8 train94"
# The airbench contestant each hooktrain recipe is measured against (airbench94 by default).
REFERENCE_OF = {"airbench94_muon": MUON}
AIRBENCH_HINT = (
    "pass --airbench-src PATH (the airbench-0.1.8 sdist .tar.gz or its unpacked folder), "
    "pip install it, or leave it out with --no-airbench"
)
OUR_TIME_NOTE = (
    "hooktrain recipes: training seconds are the sum of the epochs' wall times in the run's "
    "metrics.json: every training step plus the evaluation of the {test:,} test images after "
    "each epoch the recipe evaluates (building the model, moving the data to the device and "
    "writing files are outside). Accuracy: the final epoch's test accuracy. First run: the "
    "same figure for a throwaway run of the first seed before the timed ones (torch.compile, "
    "cuDNN and allocator warm-up)."
)
AIRBENCH_TIME_NOTE = (
    "airbench94: training seconds are airbench's own total_time_seconds (CUDA events): the "
    "whitening-layer initialisation from 5,000 training images, the training epochs (the "
    "loader's one-off normalisation, flip and padding of all images on the first one "
    "included) and the final test-time-augmented evaluation of the {test:,} test images "
    "(tta_level 2: mirror and two translations); its per-epoch evaluation, building the "
    "network and loading the data to the GPU are outside. Accuracy: that final TTA accuracy. "
    "First run: total_time_seconds of a whole throwaway run (airbench's own warmup94 is a "
    "single step). Run as airbench runs itself: cudnn.benchmark on, torch.manual_seed(seed)."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--recipes",
        default="resnet9_cifar10",
        help="comma-separated hooktrain recipes (names or .py files), e.g. "
        "resnet9_cifar10,resnet9_fast",
    )
    parser.add_argument("--seeds", type=int, default=3, help="timed seeds per contestant")
    parser.add_argument("--data-dir", type=Path, default=None, help="the CIFAR-10 copy")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/time_to_accuracy"))
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for the hooktrain recipes (not airbench), as hooktrain run --set",
    )
    parser.add_argument(
        "--airbench-src",
        type=Path,
        default=None,
        help="airbench sdist (.tar.gz) or source folder to import; default: installed airbench",
    )
    parser.add_argument("--no-airbench", action="store_true", help="leave airbench94 out")
    parser.add_argument(
        "--airbench-muon",
        type=Path,
        default=None,
        help="airbench94_muon.py (KellerJordan/cifar10-airbench, commit 096d14d) to run as a "
        "contestant too, on CUDA; the hooktrain recipe airbench94_muon is compared with it",
    )
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    try:
        benchmark(args)
    except HooktrainError as error:
        print(error, file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(
            f"interrupted; the runs finished so far are in {args.out / 'results.json'}",
            file=sys.stderr,
        )
        sys.exit(130)


def benchmark(args: argparse.Namespace) -> None:
    recipes = _our_recipes(args.recipes, args.assignments)
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index not in (None, 0):
        raise HooktrainError(
            "airbench always trains on the default CUDA device; choose the GPU with "
            "CUDA_VISIBLE_DEVICES and pass --device cuda."
        )
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    dataset = load_cifar10(args.data_dir)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="time-to-accuracy-") as scratch_name:
        scratch = Path(scratch_name)
        airbench, airbench_info = _prepare_airbench(args, device, scratch)
        muon = None
        if args.airbench_muon is not None and device.type == "cuda":
            muon = MuonContestant(load_muon_script(args.airbench_muon), scratch / "airbench")
        if airbench is not None or muon is not None:
            airbench_info["data"] = _write_airbench_data(dataset, scratch / "airbench" / "cifar10")

        results: dict[str, Any] = {
            "command": shlex.join(sys.orig_argv),
            "hardware": hardware,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "device": str(device),
            "seeds": args.seeds,
            "data_dir": str(args.data_dir.resolve()) if args.data_dir else None,
            "train_images": len(dataset.train),
            "test_images": len(dataset.test),
            "overrides": args.assignments,
            "airbench": airbench_info,
            "notes": {
                "hooktrain": OUR_TIME_NOTE.format(test=len(dataset.test)),
                AIRBENCH: AIRBENCH_TIME_NOTE.format(test=len(dataset.test)),
                MUON: MUON_TIME_NOTE,
            },
            "contestants": [
                {
                    "name": name,
                    "kind": "hooktrain",
                    "epochs": recipe.epochs,
                    "train_limit": recipe.train_limit,
                    "seeds": [recipe.seed + i for i in range(args.seeds)],
                    "warmup": None,
                    "runs": [],
                }
                for name, recipe in recipes.items()
            ],
        }
        if airbench is not None:
            results["contestants"].append(
                {
                    "name": AIRBENCH,
                    "kind": "airbench",
                    "epochs": airbench.lib_airbench94.hyp["opt"]["train_epochs"],
                    "train_limit": None,
                    "seeds": list(range(args.seeds)),
                    "warmup": None,
                    "runs": [],
                }
            )
        if muon is not None:
            results["contestants"].append(
                {
                    "name": MUON,
                    "kind": "muon",
                    "epochs": 8,
                    "train_limit": None,
                    "seeds": list(range(args.seeds)),
                    "warmup": None,
                    "runs": [],
                }
            )
        print(_header(results), flush=True)

        def run_one(
            contestant: dict[str, Any], seed: int, folder: Path, warmup: bool = False
        ) -> dict[str, Any]:
            if contestant["kind"] == "airbench":
                return _run_airbench(airbench, scratch / "airbench", seed)
            if contestant["kind"] == "muon":
                assert muon is not None
                return muon.run(seed, warmup)
            recipe = apply_overrides(recipes[contestant["name"]], [f"seed={seed}"])
            return _run_recipe(recipe, folder, args.data_dir, args.device)

        for number, contestant in enumerate(results["contestants"]):
            seed = contestant["seeds"][0]
            folder = scratch / "runs" / f"{number}-warmup"
            contestant["warmup"] = run_one(contestant, seed, folder, warmup=True)
            _report_run(contestant["name"], "first run (warm-up)", contestant["warmup"])
            _save(out, results)
        for index in range(args.seeds):
            for number, contestant in enumerate(results["contestants"]):
                seed = contestant["seeds"][index]
                folder = scratch / "runs" / f"{number}-seed-{seed}"
                contestant["runs"].append(run_one(contestant, seed, folder))
                _report_run(contestant["name"], f"seed {seed}", contestant["runs"][-1])
                _save(out, results)
        print()
        print(_table(results))
        print(f"\nwritten: {out / 'results.md'}, {out / 'results.json'}")


# --------------------------------------------------------------------------------------------
# hooktrain recipes


def _our_recipes(names: str, assignments: list[str]) -> dict[str, Recipe]:
    """Every recipe named, with the overrides applied and checked before any training."""
    recipes: dict[str, Recipe] = {}
    for name in (part.strip() for part in names.split(",")):
        if not name:
            raise HooktrainError(
                f"--recipes {names!r} has an empty name; give recipe names separated by commas."
            )
        if name in recipes:
            raise HooktrainError(f"--recipes names {name!r} twice; give each contestant once.")
        recipe = load_recipe(name)
        if recipe.plugin("metrics") is None:
            raise HooktrainError(
                f"The recipe {name!r} has no metrics plugin, whose metrics.json gives the epoch "
                "times; add Metrics() to its plugins."
            )
        # Checkpoints are written outside the timed epochs; the throwaway runs need none.
        without = ["checkpoint"] if recipe.plugin("checkpoint") is not None else []
        recipes[name] = apply_overrides(recipe, [*QUIET, *assignments], without_plugins=without)
    return recipes


def _quiet(_: str) -> None:
    pass


def _run_recipe(recipe: Recipe, folder: Path, data_dir: Path | None, device: str) -> dict[str, Any]:
    """Train one seed; its figures from the run folder's metrics.json."""
    frames = _compiled_frames()
    started = time.perf_counter()
    train(recipe, out_dir=folder, data_dir=data_dir, device=device, echo=_quiet)
    call_seconds = time.perf_counter() - started
    frames_after = _compiled_frames()
    metrics = json.loads((folder / "metrics.json").read_text())
    return {
        "seed": recipe.seed,
        "test_accuracy": metrics["final_test_accuracy"],
        "train_seconds": metrics["wall_seconds"],
        "call_seconds": call_seconds,
        # Frames torch.compile compiled during this run: 0 when the warm-up's graphs were reused.
        "compiled_frames": None if frames is None else frames_after - frames,
        "epochs": metrics["epochs"],
    }


def _compiled_frames() -> int | None:
    """How many frames TorchDynamo has compiled in this process (a private counter)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    return int(counters["frames"]["total"])


# --------------------------------------------------------------------------------------------
# airbench


def _prepare_airbench(
    args: argparse.Namespace, device: torch.device, scratch: Path
) -> tuple[ModuleType | None, dict[str, Any]]:
    """airbench imported (or None) and what the results should say about it."""
    if args.no_airbench:
        return None, {"ran": False, "reason": "left out with --no-airbench."}
    module = None
    if args.airbench_src is not None or device.type == "cuda":
        module = _import_airbench(args.airbench_src, scratch)
    if device.type != "cuda":
        reason = (
            f"it needs a CUDA GPU (it builds its network with .cuda(), loads the data to "
            f"cuda:0 and times with CUDA events), and this run is on {device}."
        )
        return None, {"ran": False, "reason": reason}
    assert module is not None
    return module, {
        "ran": True,
        "version": _airbench_version(module),
        "file": module.__file__,
        "hyperparameters": module.lib_airbench94.hyp,
    }


def _import_airbench(src: Path | None, scratch: Path) -> ModuleType:
    root = None
    if src is not None:
        root = _airbench_root(src, scratch)
        sys.path.insert(0, str(root))
    # airbench sets cudnn.benchmark on import; it is set only around airbench's own runs.
    benchmark_flag = torch.backends.cudnn.benchmark
    try:
        import airbench
        import airbench.lib_airbench94
        import airbench.utils
    except ImportError as error:
        raise HooktrainError(f"airbench cannot be imported ({error}); {AIRBENCH_HINT}.") from error
    finally:
        torch.backends.cudnn.benchmark = benchmark_flag
    file = Path(airbench.__file__ or "").resolve()
    if root is not None and not file.is_relative_to(root.resolve()):
        raise HooktrainError(
            f"An airbench from {file.parent} was imported instead of the one in {root}; "
            "uninstall that one or leave out --airbench-src."
        )
    needed = ("train94", "lib_airbench94", "utils")
    if not all(hasattr(airbench, name) for name in needed) or not hasattr(
        airbench.utils, "print_training_details"
    ):
        raise HooktrainError(
            f"The airbench in {file.parent} lacks train94 or utils.print_training_details, "
            f"which this benchmark uses (written for airbench 0.1.8); {AIRBENCH_HINT}."
        )
    return airbench


def _airbench_root(src: Path, scratch: Path) -> Path:
    """The folder to put on sys.path: the one holding ``airbench/__init__.py``."""
    if not src.exists():
        raise HooktrainError(f"--airbench-src {src} does not exist; {AIRBENCH_HINT}.")
    if src.is_file():
        if not tarfile.is_tarfile(src):
            raise HooktrainError(f"--airbench-src {src} is not a .tar.gz archive; {AIRBENCH_HINT}.")
        target = scratch / "airbench-src"
        with tarfile.open(src) as archive:
            archive.extractall(target, filter="data")
        src = target
    if (src / "__init__.py").is_file() and src.name == "airbench":
        return src.parent
    candidates = [src, *sorted(p for p in src.iterdir() if p.is_dir())]
    for folder in candidates:
        if (folder / "airbench" / "__init__.py").is_file():
            return folder
    raise HooktrainError(f"--airbench-src {src} holds no airbench/__init__.py; {AIRBENCH_HINT}.")


def _airbench_version(module: ModuleType) -> str:
    package = Path(module.__file__ or "").parent
    pkg_info = package.parent / "PKG-INFO"
    if pkg_info.is_file():
        found = re.search(r"^Version: (\S+)", pkg_info.read_text(), re.MULTILINE)
        if found:
            return found.group(1)
    try:
        return metadata.version("airbench")
    except metadata.PackageNotFoundError:
        return "unknown"


def _write_airbench_data(dataset: Splits, folder: Path) -> str:
    """``train.pt``/``test.pt`` as airbench's CifarLoader reads them (and writes them from
    torchvision): a dict of uint8 NHWC ``images``, int64 ``labels`` and the ``classes`` list.

    airbench initialises its whitening layer from the first 5,000 training images, so a copy
    that lists them class by class (image folders do) is written in a fixed random order;
    one in the official order is written as it is. Returns what was done, for the results.
    """
    folder.mkdir(parents=True, exist_ok=True)
    train_labels = dataset.train.targets
    by_class = bool((train_labels[1:] >= train_labels[:-1]).all())
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train_labels), generator=generator) if by_class else None
    splits = (("train.pt", dataset.train, order), ("test.pt", dataset.test, None))
    for name, split, index in splits:
        payload = {
            "images": (split.inputs if index is None else split.inputs[index]).contiguous().clone(),
            "labels": (split.targets if index is None else split.targets[index]).clone(),
            "classes": list(dataset.classes),
        }
        torch.save(payload, folder / name)
    if by_class:
        return (
            "training images written in a fixed random order (torch.randperm, generator seed 0): "
            "the copy lists them class by class, and airbench initialises its whitening layer "
            "from the first 5,000"
        )
    return "training and test images written in the copy's order"


@contextlib.contextmanager
def _cudnn_benchmark(on: bool) -> Iterator[None]:
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def _run_airbench(airbench: Any, data_root: Path, seed: int) -> dict[str, Any]:
    """One airbench94 run exactly as ``airbench.train94()`` does it, its printed table captured.

    train94 returns only the network; its time and final (TTA) accuracy are what it prints, so
    the rows it prints are taken from its print_training_details as numbers.
    """
    rows: list[dict[str, Any]] = []
    original: Callable[..., None] = airbench.utils.print_training_details
    columns = ("epoch", "train_loss", "train_acc", "val_acc", "tta_val_acc", "total_time_seconds")

    def capture(variables: dict[str, Any], is_final_entry: bool) -> None:
        rows.append({key: variables.get(key) for key in columns})
        original(variables, is_final_entry)

    printed = io.StringIO()
    airbench.utils.print_training_details = capture
    try:
        # Its loaders read cifar10/train.pt and cifar10/test.pt relative to the working folder.
        with (
            contextlib.chdir(data_root),
            contextlib.redirect_stdout(printed),
            _cudnn_benchmark(True),
        ):
            torch.manual_seed(seed)
            started = time.perf_counter()
            net = airbench.train94(run=seed, verbose=True)
            torch.cuda.synchronize()
            call_seconds = time.perf_counter() - started
    finally:
        airbench.utils.print_training_details = original
    del net
    final = next((row for row in rows if row["epoch"] == "eval"), None)
    if final is None or final["tta_val_acc"] is None:
        raise HooktrainError(
            "airbench printed no final evaluation row; this benchmark was written for airbench "
            f"0.1.8. Its output was:\n{printed.getvalue()}"
        )
    return {
        "seed": seed,
        "test_accuracy": final["tta_val_acc"],
        "train_seconds": final["total_time_seconds"],
        "call_seconds": call_seconds,
        "epochs": [row for row in rows if row["epoch"] != "eval"],
        "log": printed.getvalue(),
    }


# --------------------------------------------------------------------------------------------
# Reporting


def _report_run(name: str, what: str, run: dict[str, Any]) -> None:
    print(
        f"  {name} {what}: test accuracy {run['test_accuracy']:.2%}, "
        f"{run['train_seconds']:.2f} s training ({run['call_seconds']:.1f} s in all)",
        flush=True,
    )


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _summaries(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    summaries = {}
    for contestant in results["contestants"]:
        runs = contestant["runs"]
        if not runs:
            continue
        accuracy = _mean_std([100 * run["test_accuracy"] for run in runs])
        seconds = _mean_std([run["train_seconds"] for run in runs])
        warmup = contestant["warmup"]
        summaries[contestant["name"]] = {
            "n": len(runs),
            "accuracy_percent": accuracy,
            "train_seconds": seconds,
            "first_run_seconds": warmup["train_seconds"] if warmup else None,
            "epochs": contestant["epochs"],
        }
    for name, summary in summaries.items():
        reference = summaries.get(REFERENCE_OF.get(name, AIRBENCH))
        summary["accuracy_ratio"] = (
            summary["accuracy_percent"][0] / reference["accuracy_percent"][0] if reference else None
        )
        summary["time_ratio"] = (
            summary["train_seconds"][0] / reference["train_seconds"][0] if reference else None
        )
    return summaries


def _header(results: dict[str, Any]) -> str:
    seeds = results["seeds"]
    airbench = results["airbench"]
    airbench_line = (
        f"airbench {airbench['version']} ({airbench['file']}); its cifar10/train.pt and "
        f"test.pt: {airbench['data']}"
        if airbench["ran"]
        else f"{AIRBENCH} skipped: {airbench['reason']}"
    )
    overrides = " ".join(f"--set {a}" for a in results["overrides"]) or "none"
    return "\n".join(
        [
            f"## Time to accuracy on CIFAR-10: {results['hardware']}, torch {results['torch']}, "
            f"{seeds} seed{'s' if seeds != 1 else ''} per contestant",
            "",
            f"- command: `{results['command']}`",
            f"- hardware: {results['hardware']} (device {results['device']}); torch "
            f"{results['torch']}, Python {results['python']}",
            f"- data: {results['data_dir'] or 'the default CIFAR-10 folder'} "
            f"({results['train_images']:,} training, {results['test_images']:,} test images), "
            "the same copy for every contestant",
            f"- hooktrain overrides: {overrides} (plus metrics.progress=false, "
            "metrics.tensorboard=false, and no checkpoint plugin: checkpoints are written "
            "outside the timed epochs and these runs are throwaway)",
            f"- {airbench_line}",
        ]
    )


def _format(pair: tuple[float, float | None], digits: int) -> str:
    mean, std = pair
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _table(results: dict[str, Any]) -> str:
    summaries = _summaries(results)
    seeds = results["seeds"]
    lines = [
        _header(results),
        "",
        "Mean ± std (n-1) over seeds. Training seconds exclude compilation and warm-up, which "
        "the first run pays. **Our seconds include the evaluations the recipe asks for (every "
        f"epoch, or once at the end with eval_every) on the {results['test_images']:,} test "
        "images; airbench's are what it reports itself (whitening init + training + one final "
        "TTA evaluation).** Ratios are to the means of each recipe's reference: "
        + ", ".join(f"{ours} to {theirs}" for ours, theirs in REFERENCE_OF.items())
        + f", every other to {AIRBENCH} (n/a where the reference did not run).",
        "",
        "| contestant | epochs | seeds | test accuracy % | training s | "
        "first run s (incl. compile) | accuracy ÷ reference | time ÷ reference |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, summary in summaries.items():
        first = summary["first_run_seconds"]
        accuracy_ratio, time_ratio = summary["accuracy_ratio"], summary["time_ratio"]
        lines.append(
            f"| {name} | {summary['epochs']:g} | {summary['n']}/{seeds} "
            f"| {_format(summary['accuracy_percent'], 2)} "
            f"| {_format(summary['train_seconds'], 2)} "
            f"| {'-' if first is None else f'{first:.2f}'} "
            f"| {'n/a' if accuracy_ratio is None else f'{accuracy_ratio:.3f}'} "
            f"| {'n/a' if time_ratio is None else f'{time_ratio:.2f}'} |"
        )
    lines += ["", f"- {results['notes']['hooktrain']}"]
    for contestant in results["contestants"]:
        recompiled = sum(run.get("compiled_frames") or 0 for run in contestant["runs"])
        if recompiled:
            lines.append(
                f"- **Warning**: {contestant['name']}'s timed runs compiled {recompiled} more "
                "frame(s) with torch.compile instead of reusing the first run's, so their "
                "seconds include some compilation."
            )
    for reference in (AIRBENCH, MUON):
        if reference in summaries:
            lines.append(f"- {results['notes'][reference]}")
    lines.append("- Every seed's figures and per-epoch records: results.json.")
    return "\n".join(lines)


def _save(out: Path, results: dict[str, Any]) -> None:
    payload = {**results, "summaries": _summaries(results)}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "results.md").write_text(_table(results) + "\n")


if __name__ == "__main__":
    main()
