"""What each step-changing plugin costs per step: the flagship's step with and without it.

Every arm is hooktrain's step of the flagship (Adam, one-cycle, weight decay, clipping by value,
``metrics``) on the same small ResNet-9 and batches; arm "none" adds nothing, each other arm adds
one plugin with its default settings (``mixup``, ``cutmix``, ``lion`` in place of Adam,
``lookahead``, ``sam``, ``grad_accumulation`` with 2 micro-batches). The arms alternate within each
repeat so drift of the machine hits all alike; the table gives the median steps per second and
the ratio to "none", eager and (with ``--compile``) compiled, compile time spent in a warm-up.

``early_stopping`` and ``swa`` act at epoch ends, not in the step: their per-step cost is zero by
construction (``swa`` adds one pass over the training images in eval mode per evaluated epoch
once averaging starts).

    python benchmarks/plugin_cost.py                      # CPU, eager only
    python benchmarks/plugin_cost.py --compile --device cuda --width 16 --batch 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from engine_overhead import hooktrain_arm, synchronize

from hooktrain.core.plugin import make_plugin
from hooktrain.models import resnet9

STEP_PLUGINS = ("mixup", "cutmix", "lion", "lookahead", "sam", "grad_accumulation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time the compiled step")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = resnet9(10, width=args.width).to(device).train()
    generator = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(args.batch, 3, 32, 32, generator=generator).to(device),
            torch.randint(0, 10, (args.batch,), generator=generator).to(device),
        )
        for _ in range(args.steps)
    ]
    modes = (False, True) if args.compile else (False,)
    arms = {
        (name, compiled): hooktrain_arm(
            model, batches, compiled, () if name == "none" else (make_plugin(name),)
        )
        for compiled in modes
        for name in ("none", *STEP_PLUGINS)
    }
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"ResNet-9 width {args.width}, batch {args.batch}, {args.steps} steps a run, "
        f"{args.repeats} repeats, on {hardware} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)"
    )
    for arm in arms.values():  # warm-up: allocator, kernels, compilation
        arm()
    rates: dict[tuple[str, bool], list[float]] = {key: [] for key in arms}
    for _ in range(args.repeats):
        for key, arm in arms.items():
            synchronize(device)
            started = time.perf_counter()
            arm()
            synchronize(device)
            rates[key].append(args.steps / (time.perf_counter() - started))
    median = {key: statistics.median(values) for key, values in rates.items()}
    header = "| plugin | eager steps/s | eager vs none |"
    header += " compiled steps/s | compiled vs none |" if args.compile else ""
    print(header)
    print("| --- " * (header.count("|") - 1) + "|")
    for name in ("none", *STEP_PLUGINS):
        row = f"| {name} "
        for compiled in modes:
            rate = median[(name, compiled)]
            row += f"| {rate:.2f} | {rate / median[('none', compiled)]:.3f} "
        print(row + "|")


if __name__ == "__main__":
    main()
