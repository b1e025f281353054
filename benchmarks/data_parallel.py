"""Data-parallel training throughput: one recipe trained by 1, 2, ... processes under torchrun.

Every configuration trains the same recipe from scratch in a fresh process (or a fresh torchrun
with N worker processes), each into its own scratch run folder, on the same data and device:

* ``1 process, without data_parallel``: plain ``python -m hooktrain run ... --without
  data_parallel``, the baseline every ratio is to;
* ``1 process, data_parallel``: the same with the plugin, which does nothing in one process, so
  its ratio should read 1.00;
* ``N processes``: ``python -m torch.distributed.run --standalone --nproc-per-node N -m hooktrain
  run ...`` (gloo on CPU, one GPU a process with NCCL on CUDA), each process taking batch_size/N
  of every global batch; with ``--sync-batchnorm`` each N is run a second time with
  ``data_parallel.sync_batchnorm=true``.

Throughput is images/s = images trained per epoch (steps x global batch size, from the run's
``metrics.json``) / the epoch's wall time, over every epoch but the first (warm-up: allocator,
cuDNN autotuning, compilation). ``metrics.json`` records one wall time per epoch, training and
the evaluation of the whole test split together, so the figure includes evaluation (which every
process runs in full); "run s" is the whole command as a user waits for it (start-up,
rendezvous, data loading, every epoch). Configurations alternate within each repeat so drift of
the machine hits all alike. Every process runs with ``OMP_NUM_THREADS`` as this command's
environment has it, else 1 (torchrun's default for its workers), so N processes use N times the
CPU threads of one.

    python benchmarks/data_parallel.py --data-dir .data --nproc 1,2,4 --repeats 3  # 4 GPUs
    OMP_NUM_THREADS=1 python benchmarks/data_parallel.py --data-dir /tmp/tiny --device cpu \
        --set model.width=8 --set epochs=3 --set batch_size=40
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hooktrain.config.overrides import apply_overrides
from hooktrain.config.recipe import Recipe
from hooktrain.config.registry import load_recipe
from hooktrain.errors import HooktrainError
from hooktrain.plugins.metrics import METRICS_FILE
from hooktrain.run.build import resolve_device

QUIET = ["metrics.progress=false", "metrics.tensorboard=false"]
PLUGIN = "data_parallel"
BASELINE = f"1 process, without {PLUGIN}"


class RunFailed(Exception):
    """A run that exited with an error, ran out of time, or left no finished metrics.json."""


@dataclass
class Configuration:
    """One row of the table: how many processes, and what the command line adds for it."""

    name: str
    nproc: int
    extra: list[str]
    images_per_second: list[float] = field(default_factory=list)
    run_seconds: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    command: str = ""
    failed: str = ""


def configurations(
    counts: list[int], recipe: Recipe, sync_batchnorm: bool, assignments: list[str]
) -> list[Configuration]:
    """The single-process pair, then each process count (twice with ``sync_batchnorm``)."""
    # The plugin's own settings cannot be given to a run that drops the plugin.
    plugin_free = [a for a in assignments if not a.startswith(f"{PLUGIN}.")]
    without = ["--without", PLUGIN, *(f"--set={a}" for a in [*QUIET, *plugin_free])]
    add = [] if recipe.plugin(PLUGIN) else ["--with", PLUGIN]
    plugged = [*add, *(f"--set={a}" for a in [*QUIET, *assignments])]
    rows = [Configuration(BASELINE, 1, without), Configuration(f"1 process, {PLUGIN}", 1, plugged)]
    for n in counts:
        if n > 1:
            rows.append(Configuration(f"{n} processes", n, plugged))
            if sync_batchnorm:
                synced = [*plugged, f"--set={PLUGIN}.sync_batchnorm=true"]
                rows.append(Configuration(f"{n} processes, sync BatchNorm", n, synced))
    return rows


def command_of(row: Configuration, args: argparse.Namespace, device: str, out: Path) -> list[str]:
    """The command line that trains ``row`` into ``out``."""
    if row.nproc == 1:
        launcher = [sys.executable, "-m", "hooktrain"]
    else:
        launcher = [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
            *("--nproc-per-node", str(row.nproc), "-m", "hooktrain"),
        ]
    data = ["--data-dir", str(args.data_dir)] if args.data_dir is not None else []
    return [
        *launcher,
        *("run", args.recipe, "--out", str(out), "--device", device),
        *data,
        *row.extra,
    ]


def run_once(
    command: list[str], env: dict[str, str], out: Path, log: Path, timeout: float
) -> tuple[float, dict]:
    """Run ``command`` to its end (output into ``log``); its wall seconds and the metrics.json
    it wrote in ``out``.

    It runs in a session of its own, so a timeout or Ctrl-C ends torchrun's workers with it.
    """
    with log.open("wb") as output:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _end(process)
            raise RunFailed(f"still running after {timeout:g} s, stopped") from None
        except KeyboardInterrupt:
            _end(process)
            raise
        seconds = time.perf_counter() - started
    if code != 0:
        raise RunFailed(f"exit status {code}")
    try:
        metrics = json.loads((out / METRICS_FILE).read_text())
    except (OSError, ValueError) as error:
        raise RunFailed(f"no readable {METRICS_FILE}: {error}") from error
    if not metrics.get("finished"):
        raise RunFailed(f"{METRICS_FILE} says the run did not finish")
    return seconds, metrics


def _end(process: subprocess.Popen[bytes]) -> None:
    """Stop the process group ``process`` leads: SIGTERM, then SIGKILL after 30 s."""
    for number, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, number)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def throughput(metrics: dict, batch_size: int) -> float:
    """Images/s over every epoch but the first: images trained / the epochs' wall seconds."""
    epochs = metrics["epochs"]
    steps = [e["step"] - before["step"] for before, e in itertools.pairwise(epochs)]
    seconds = sum(e["seconds"] for e in epochs[1:])
    return sum(steps) * batch_size / seconds


def hardware(device: torch.device) -> str:
    """The accelerator or CPU model, and how many CPUs this process may use."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = f"{cpu} ({usable} CPUs usable)"
    if device.type != "cuda":
        return cpus
    return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, {cpus}"


def mean_and_spread(values: list[float], digits: int) -> str:
    """``mean`` or ``mean ± sample std`` when there are several values."""
    if len(values) < 2:
        return f"{statistics.fmean(values):.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="resnet9_cifar10")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--nproc", default="1,2", help="process counts, comma separated (1 is always run)"
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        help="recipe override passed to every run (repeatable), e.g. --set epochs=4",
    )
    parser.add_argument(
        "--sync-batchnorm",
        action="store_true",
        help="run each process count >1 also with data_parallel.sync_batchnorm=true",
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds one run may take (default 3600)"
    )
    args = parser.parse_args()
    try:
        counts = sorted({1, *(int(n) for n in args.nproc.split(",") if n.strip())})
    except ValueError:
        parser.error(f"--nproc {args.nproc!r} is not a comma-separated list of whole numbers")
    if counts[0] < 1 or args.repeats < 1 or args.timeout <= 0:
        parser.error("--nproc counts and --repeats must be at least 1, --timeout above 0")
    try:
        recipe = apply_overrides(load_recipe(args.recipe), [*QUIET, *args.assignments])
        device = resolve_device(args.device)
    except HooktrainError as error:
        parser.error(str(error))
    if recipe.epochs < 2:
        parser.error("throughput leaves out the first epoch: set epochs to 2 or more")
    uneven = [n for n in counts if recipe.batch_size % n]
    if uneven:
        parser.error(f"batch_size {recipe.batch_size} does not split over {uneven} processes")
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and counts[-1] > gpus:
        parser.error(f"{counts[-1]} processes need {counts[-1]} GPUs, {gpus} seen; lower --nproc")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rows = configurations(counts, recipe, args.sync_batchnorm, args.assignments)

    print(
        f"{hardware(device)}; torch {torch.__version__}, python {platform.python_version()}, "
        f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} in every process"
    )
    print(
        f"{recipe.name} {' '.join(args.assignments)}: {recipe.epochs} epochs in batches of "
        f"{recipe.batch_size} on {device.type}, {args.repeats} repeat(s)",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="data-parallel-") as scratch:
        for repeat in range(args.repeats):
            for index, row in enumerate(rows):
                if row.failed:
                    continue
                out = Path(scratch) / f"run-{index}-{repeat}"
                command = command_of(row, args, device.type, out)
                if not row.command:
                    row.command = f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} {shlex.join(command)}"
                log = Path(scratch) / f"run-{index}-{repeat}.log"
                try:
                    seconds, metrics = run_once(command, env, out, log, args.timeout)
                except RunFailed as error:
                    row.failed = f"repeat {repeat + 1}: {error}"
                    tail = log.read_text(errors="replace").splitlines()[-15:]
                    print(f"  {row.name}: FAILED in {row.failed}; the end of its output:")
                    print("\n".join(f"    | {line}" for line in tail), flush=True)
                    continue
                row.run_seconds.append(seconds)
                row.images_per_second.append(throughput(metrics, recipe.batch_size))
                row.accuracies.append(metrics["final_test_accuracy"])
                print(
                    f"  repeat {repeat + 1} {row.name}: {row.images_per_second[-1]:.1f} images/s, "
                    f"{row.accuracies[-1]:.2%}, run {seconds:.1f} s",
                    flush=True,
                )
    report(rows, args.repeats)
    if any(row.failed for row in rows):
        sys.exit(1)


def report(rows: list[Configuration], repeats: int) -> None:
    """The table: throughput, ratio to the baseline, accuracy, run seconds, command."""
    base = None if rows[0].failed else statistics.fmean(rows[0].images_per_second)
    spread = " ± std" if repeats > 1 else ""
    print(
        f"images/s over epochs 2 onwards, training and test evaluation together "
        f"(metrics.json does not time them apart), mean{spread} over {repeats} repeat(s); "
        f"ratio to '{BASELINE}'"
    )
    width = max(len(row.name) for row in rows)
    header = f"{'configuration':<{width}}  {'images/s':>16}  {'ratio':>6}  {'test acc':>8}"
    print(f"{header}  {'run s':>7}  command")
    for row in rows:
        if row.failed:
            print(f"{row.name:<{width}}  {'failed':>16}  {'':>6}  {'':>8}  {'':>7}  {row.command}")
            continue
        mean = statistics.fmean(row.images_per_second)
        ratio = f"{mean / base:.2f}" if base else "-"
        print(
            f"{row.name:<{width}}  {mean_and_spread(row.images_per_second, 1):>16}  "
            f"{ratio:>6}  {statistics.fmean(row.accuracies):>8.2%}  "
            f"{statistics.fmean(row.run_seconds):>7.1f}  {row.command}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
