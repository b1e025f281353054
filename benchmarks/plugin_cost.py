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

from engine_overhead import add_setup_arguments, hooktrain_arm, model_and_batches, synchronize

from hooktrain.core.plugin import make_plugin

STEP_PLUGINS = ("mixup", "cutmix", "lion", "lookahead", "sam", "grad_accumulation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_arguments(parser, steps=20, repeats=5)
    parser.add_argument("--compile", action="store_true", help="also time the compiled step")
    args = parser.parse_args()
    model, batches, device = model_and_batches(args)
    modes = (False, True) if args.compile else (False,)
    arms = {
        (name, compiled): hooktrain_arm(
            model, batches, compiled, () if name == "none" else (make_plugin(name),)
        )
        for compiled in modes
        for name in ("none", *STEP_PLUGINS)
    }
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
