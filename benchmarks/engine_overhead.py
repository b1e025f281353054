"""What the engine costs: hooktrain's step against a hand-written PyTorch loop doing the same math.

Three arms train the same small ResNet-9 on the same batches with the same math: Adam with L2
decay on the weights of two or more dimensions, the one-cycle learning rate stepped every batch,
gradients clipped by value.

- (a) hooktrain, eager: the step composed from the plugins (``onecycle``, ``weight_decay``,
  ``grad_clip``), and ``step_end`` emitted to them and to ``metrics`` every step, as in a run;
- (b) plain PyTorch: ``nn.Module``, ``torch.optim.Adam``, ``OneCycleLR`` (learning rate only,
  as hooktrain schedules it), ``clip_grad_value_``;
- (c) hooktrain with the compiled step (``torch.compile``; compile time is spent in a warm-up
  run before timing and reported apart).

The arms alternate (a b c a b c ...) so drift of the machine hits all alike; the figures are the
median steps per second over the repeats, and the ratios a/b and c/b.

    python benchmarks/engine_overhead.py                 # CPU, width 8, batch 128
    python benchmarks/engine_overhead.py --device cuda --width 16 --batch 512
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hooktrain.config.recipe import Recipe
from hooktrain.core.plugin import Plugin, make_plugin_manager
from hooktrain.core.state import TrainState
from hooktrain.core.step import build_step
from hooktrain.core.task import Classification
from hooktrain.models import resnet9
from hooktrain.plugins.grad_clip import GradClip
from hooktrain.plugins.metrics import Metrics
from hooktrain.plugins.onecycle import OneCycle
from hooktrain.plugins.weight_decay import WeightDecay
from hooktrain.run.build import build_context, compose_pieces

MAX_LR, DECAY, CLIP = 0.01, 1e-4, 0.1
Batches = list[tuple[torch.Tensor, torch.Tensor]]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hooktrain_arm(
    model: nn.Module, batches: Batches, compile: bool, extra: Sequence[Plugin] = ()
) -> Callable[[], torch.Tensor]:
    """A function that trains ``len(batches)`` steps from fresh state, as the loop does, with
    the ``extra`` plugins added to the flagship's."""
    plugins = (
        OneCycle(),
        WeightDecay(rate=DECAY),
        GradClip(max=CLIP, mode="value"),
        Metrics(tensorboard=False, progress=False),
        *extra,
    )
    recipe = Recipe(name="overhead", max_lr=MAX_LR, compile=compile, plugins=plugins)
    manager = make_plugin_manager(plugins)
    facts = {"num_classes": 10, "num_outputs": 10, "input_shape": [3, 32, 32], "in_channels": 3}
    build = build_context(recipe, model, len(batches), Classification(), facts, manager)
    pieces = compose_pieces(manager, build, model, None)
    step = build_step(pieces, compile=compile)
    start = TrainState.create(model, pieces.chain, seed=0)
    step_end = manager.hook.hooktrain_step_end

    def run() -> torch.Tensor:
        state = start
        for batch in batches:
            state, metrics = step(state, batch)
            step_end(run=None, state=state, metrics=metrics)
        return metrics["loss"]

    return run


def plain_arm(model: nn.Module, batches: Batches) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        net = copy.deepcopy(model)
        named = list(net.named_parameters())
        groups = [
            {"params": [p for _, p in named if p.ndim >= 2], "weight_decay": DECAY},
            {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.Adam(groups, lr=MAX_LR)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=MAX_LR, total_steps=len(batches), cycle_momentum=False
        )
        for x, y in batches:
            loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_value_(net.parameters(), CLIP)
            optimizer.step()
            schedule.step()
        return loss.detach()

    return run


def add_setup_arguments(parser: argparse.ArgumentParser, steps: int, repeats: int) -> None:
    """The options every step benchmark shares: device, model width, batch, steps, repeats."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--repeats", type=int, default=repeats)


def model_and_batches(args: argparse.Namespace) -> tuple[nn.Module, Batches, torch.device]:
    """The ResNet-9 and the random batches the options ask for, on their device; the setup
    printed in one line."""
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
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"ResNet-9 width {args.width}, batch {args.batch}, {args.steps} steps a run, "
        f"{args.repeats} repeats, on {hardware} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)"
    )
    return model, batches, device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_arguments(parser, steps=40, repeats=7)
    parser.add_argument("--no-compile", action="store_true", help="skip arm (c)")
    args = parser.parse_args()
    model, batches, device = model_and_batches(args)
    arms = {
        "a hooktrain": hooktrain_arm(model, batches, compile=False),
        "b plain": plain_arm(model, batches),
    }
    if not args.no_compile:
        arms["c compiled"] = hooktrain_arm(model, batches, compile=True)
    for name, arm in arms.items():  # warm-up: allocator, kernels, and compilation for (c)
        started = time.perf_counter()
        arm()
        synchronize(device)
        print(f"  warm-up {name}: {time.perf_counter() - started:.1f} s")
    rates: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, arm in arms.items():
            synchronize(device)
            started = time.perf_counter()
            arm()
            synchronize(device)
            rates[name].append(args.steps / (time.perf_counter() - started))
    median = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        spread = f"{min(values):.1f}-{max(values):.1f}"
        print(f"  {name:<12} median {median[name]:7.1f} steps/s  (range {spread})")
    print(f"a/b = {median['a hooktrain'] / median['b plain']:.3f}  (goal >= 0.97)")
    if "c compiled" in median:
        print(f"c/b = {median['c compiled'] / median['b plain']:.3f}  (goal > 1)")


if __name__ == "__main__":
    main()
