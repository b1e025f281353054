"""Where a recipe's time goes: one run under torch.profiler, split into phases and ops.

The run is hooktrain's own (``hooktrain.run.loop.train``); this script only marks its phases
with ``torch.profiler.record_function`` from outside (the engine is not instrumented):
``data`` (an augmented batch: gather, crop, flip, normalise), ``step`` (forward, backward and
the gradient chain), ``epoch end`` (evaluation and the epoch's report). It prints each phase's
host and device time and share, then the ops that take the most device time (CPU time on a
CPU), and writes a Chrome trace.

    python benchmarks/profile_recipe.py --data-dir DATA --recipe resnet9_cifar10 --set epochs=2
    python benchmarks/profile_recipe.py --data-dir .data --device cpu --set model.width=8 \\
        --set epochs=1 --set train_limit=2000 --set compile=false
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from hooktrain.config.overrides import apply_overrides
from hooktrain.config.registry import load_recipe
from hooktrain.data.device import DeviceData
from hooktrain.run import loop
from hooktrain.run.build import resolve_device

PHASES = ("data", "step", "epoch end")


def _marked(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def marked(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return function(*args, **kwargs)

    return marked


def _mark_phases() -> None:
    """Wrap the loop's three phases in profiler ranges (for this process only)."""
    DeviceData.train_batch = _marked("data", DeviceData.train_batch)  # type: ignore[method-assign]
    loop.end_epoch = _marked("epoch end", loop.end_epoch)
    for builder in ("build_step", "build_lane_step"):
        original = getattr(loop, builder)
        setattr(loop, builder, lambda *a, _o=original, **k: _marked("step", _o(*a, **k)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="resnet9_cifar10")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", dest="assignments", action="append", default=[])
    parser.add_argument("--top", type=int, default=25, help="how many ops to list")
    parser.add_argument("--trace", type=Path, default=Path("runs/profile_trace.json"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    recipe = apply_overrides(
        load_recipe(args.recipe),
        ["metrics.progress=false", "metrics.tensorboard=false", *args.assignments],
        without_plugins=["checkpoint"] if load_recipe(args.recipe).plugin("checkpoint") else [],
    )
    _mark_phases()
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with tempfile.TemporaryDirectory() as scratch:
        # A first run pays compilation and autotuning; only the second is profiled.
        loop.train(recipe, out_dir=Path(scratch) / "warm-up", data_dir=args.data_dir,
                   device=args.device, echo=lambda line: None)  # fmt: skip
        with profile(activities=activities) as profiler:
            loop.train(recipe, out_dir=Path(scratch) / "profiled", data_dir=args.data_dir,
                       device=args.device, echo=print)  # fmt: skip
    events = profiler.key_averages()
    on_device = device.type == "cuda"
    total = sum(e.self_device_time_total if on_device else e.self_cpu_time_total for e in events)
    hardware = torch.cuda.get_device_name(device) if on_device else "CPU"
    print(f"\n{recipe.name} on {hardware}, torch {torch.__version__}: phases (host time, "
          "device time under the range)")  # fmt: skip
    for phase in PHASES:
        event = next((e for e in events if e.key == phase), None)
        if event is not None:
            print(f"  {phase:10s} {event.count:6d} calls  host {event.cpu_time_total / 1e6:8.3f} s"
                  f"  device {event.device_time_total / 1e6:8.3f} s")  # fmt: skip
    sort_by = "self_cuda_time_total" if on_device else "self_cpu_time_total"
    print(f"\nops by {sort_by} (all ops together: {total / 1e6:.3f} s)")
    print(events.table(sort_by=sort_by, row_limit=args.top))
    args.trace.parent.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(args.trace))
    print(f"trace: {args.trace}")


if __name__ == "__main__":
    main()
