"""Speed before and after a change: two checkouts of hooktrain, side by side in one run.

Runs the same end-to-end training command with each checkout on ``PYTHONPATH``, alternating
(before, after, before, after, ...) so drift of the machine hits both alike, and prints each
wall time, the medians and the ratio after/before. ``--before-set`` and ``--after-set`` give
each checkout its own spelling of the same settings (``width=16`` became ``model.width=16``).

    git worktree add /tmp/before 7396bef
    python benchmarks/before_after.py --before /tmp/before --after . --data-dir .data \\
        --before-set width=16 --after-set model.width=16 \\
        --set epochs=2 --set train_limit=5000 --set batch_size=100 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _wall_seconds(checkout: Path, sets: list[str], args: argparse.Namespace) -> float:
    overrides = [part for key in sets for part in ("--set", key)]
    with tempfile.TemporaryDirectory() as scratch:
        command = [
            sys.executable, "-m", "hooktrain", "run", args.recipe, "--device", args.device,
            "--data-dir", str(args.data_dir.resolve()), "--out", str(Path(scratch) / "run"),
            *overrides,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(checkout.resolve())}
        started = time.perf_counter()
        # Run from the scratch folder: `python -m` puts the working directory before PYTHONPATH.
        subprocess.run(command, env=env, cwd=scratch, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the older checkout")
    parser.add_argument("--after", type=Path, default=Path("."), help="the newer checkout")
    parser.add_argument("--recipe", default="resnet9_cifar10")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="both")
    parser.add_argument("--before-set", action="append", default=[], help="before only")
    parser.add_argument("--after-set", action="append", default=[], help="after only")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    arms = {
        "before": (args.before, [*args.sets, *args.before_set]),
        "after": (args.after, [*args.sets, *args.after_set]),
    }
    times: dict[str, list[float]] = {name: [] for name in arms}
    for repeat in range(args.repeats):
        for name, (checkout, sets) in arms.items():
            seconds = _wall_seconds(checkout, sets, args)
            times[name].append(seconds)
            print(f"repeat {repeat + 1}: {name:<6} {seconds:7.1f} s", flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"{name:<6} median {median:7.1f} s over {args.repeats} runs")
    print(f"after/before: {medians['after'] / medians['before']:.3f}")


if __name__ == "__main__":
    main()
