"""Seeds trained together (one vmapped step) against the same seeds trained one after another.

Both arms train the same recipe on the same data copy and device, for the same seeds; they
alternate (together, one-by-one, together, ...) so drift of the machine hits both alike. Each
arm's time covers whole runs (building, every epoch, evaluation), as a user waits for them.

    python benchmarks/parallel_seeds.py --data-dir .data --seeds 4 --repeats 3
    python benchmarks/parallel_seeds.py --data-dir .data --set model.width=16 --set train_limit=5000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hooktrain.config.overrides import apply_overrides
from hooktrain.config.registry import load_recipe
from hooktrain.run.build import resolve_device
from hooktrain.run.loop import train, train_seeds

QUIET = ["metrics.progress=false", "metrics.tensorboard=false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="resnet9_cifar10")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        help="recipe overrides (default: width=16, 2 epochs, 5,000 images, batch 500)",
    )
    args = parser.parse_args()
    defaults = ["model.width=16", "epochs=2", "train_limit=5000", "batch_size=500"]
    recipe = apply_overrides(load_recipe(args.recipe), [*defaults, *QUIET, *args.assignments])
    device = resolve_device(args.device)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    seeds = list(range(args.seeds))
    print(
        f"{recipe.name} width {recipe.model.args.get('width')}, {recipe.epochs} epochs of "
        f"{recipe.train_limit or 'all'} images in batches of {recipe.batch_size}, "
        f"{len(seeds)} seeds, on {hardware}"
        f" (torch {torch.__version__}, {torch.get_num_threads()} CPU threads)"
    )

    def quiet(_: str) -> None:
        pass

    def together(folder: Path) -> list[float]:
        trained = train_seeds(
            recipe,
            seeds,
            out_dirs=[folder / f"together-{s}" for s in seeds],
            data_dir=args.data_dir,
            device=args.device,
            echo=quiet,
        )
        return [t.report["test_accuracy"] for t in trained]

    def one_by_one(folder: Path) -> list[float]:
        return [
            train(
                apply_overrides(recipe, [f"seed={s}"]),
                out_dir=folder / f"alone-{s}",
                data_dir=args.data_dir,
                device=args.device,
                echo=quiet,
            ).report["test_accuracy"]
            for s in seeds
        ]

    times: dict[str, list[float]] = {"together": [], "one by one": []}
    accuracies: dict[str, list[float]] = {"together": [], "one by one": []}
    with tempfile.TemporaryDirectory() as scratch:
        one_by_one(Path(scratch) / "warm-up")  # decode cache, kernels and allocator warmed
        for repeat in range(args.repeats):
            for name, arm in (("together", together), ("one by one", one_by_one)):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started = time.perf_counter()
                accuracies[name] = arm(Path(scratch) / f"{name}-{repeat}")
                times[name].append(time.perf_counter() - started)
                print(f"  repeat {repeat + 1} {name:>10}: {times[name][-1]:7.2f} s")
    median = {name: statistics.median(values) for name, values in times.items()}
    for name in times:
        mean = statistics.fmean(accuracies[name])
        print(
            f"{name:>10}: median {median[name]:.2f} s for {len(seeds)} seeds "
            f"({median[name] / len(seeds):.2f} s a seed), mean test accuracy {mean:.2%}"
        )
    print(f"speed-up of training together: {median['one by one'] / median['together']:.2f}x")


if __name__ == "__main__":
    main()
