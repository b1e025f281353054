"""What the safety nets cost: a recipe trained without nan_guard, with it, and with it plus a
checkpoint every N steps, the three arms alternating in one process.

    python benchmarks/guard_overhead.py --data-dir DATA --recipe resnet9_cifar10 --repeats 3
    python benchmarks/guard_overhead.py --data-dir .data --device cpu --repeats 2 \
        --set model.width=8 --set epochs=1 --set train_limit=2000 --set batch_size=100

Each arm first trains once untimed (cuDNN autotuning, allocator, compilation). The figure is the
median over repeats of the run's training and evaluation seconds (the epochs' wall times, as
``metrics.json`` records them); ratios are to the arm without nan_guard.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from hooktrain.config.overrides import apply_overrides
from hooktrain.config.recipe import Recipe
from hooktrain.config.registry import load_recipe
from hooktrain.plugins.metrics import METRICS_FILE
from hooktrain.run.build import resolve_device
from hooktrain.run.loop import train

QUIET = ["metrics.progress=false", "metrics.tensorboard=false"]


def arms(base: Recipe, every_steps: int) -> dict[str, Recipe]:
    """The three variants, each with the checkpoint plugin (every epoch) as the recipe has it."""
    with_checkpoint = [] if base.plugin("checkpoint") else ["checkpoint"]
    guarded = apply_overrides(base, QUIET, with_checkpoint)
    return {
        "without nan_guard": apply_overrides(base, QUIET, with_checkpoint, ["nan_guard"]),
        "nan_guard": guarded,
        f"nan_guard + checkpoint every {every_steps} steps": apply_overrides(
            guarded, [f"checkpoint.every_steps={every_steps}"]
        ),
    }


def seconds_of(recipe: Recipe, data_dir: Path | None, device: str) -> tuple[float, float]:
    """Train once in a scratch folder; (training + evaluation seconds, final test accuracy)."""
    with tempfile.TemporaryDirectory() as scratch:
        trained = train(recipe, out_dir=Path(scratch), data_dir=data_dir, device=device, echo=str)
        metrics = json.loads((Path(scratch) / METRICS_FILE).read_text())
    return metrics["wall_seconds"], trained.report["test_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="resnet9_cifar10")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every-steps", type=int, default=50)
    parser.add_argument("--set", dest="assignments", action="append", default=[])
    args = parser.parse_args()

    recipe = apply_overrides(load_recipe(args.recipe), args.assignments)
    variants = arms(recipe, args.every_steps)
    device = resolve_device(args.device)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.recipe} {' '.join(args.assignments)} on {hardware}, torch {torch.__version__}")
    for name, variant in variants.items():
        seconds, _ = seconds_of(variant, args.data_dir, args.device)
        print(f"  warm-up {name}: {seconds:.2f} s", flush=True)
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, variant in variants.items():
            seconds, accuracy = seconds_of(variant, args.data_dir, args.device)
            timings[name].append(seconds)
            print(f"  repeat {repeat + 1} {name}: {seconds:.2f} s, {accuracy:.2%}", flush=True)
    baseline = statistics.median(timings["without nan_guard"])
    print(f"median over {args.repeats} repeats (ratio to the run without nan_guard):")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"  {name:<40} {median:8.2f} s  {median / baseline:.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
