"""What the augmentation chain costs per batch: the pre-chain fused crop_flip + normalize against
DeviceData with the chain (RandomCrop(pad=4), RandomFlip(), Normalize), side by side in one run.

    python benchmarks/augment_overhead.py                       # CPU, batch 400, 32x32
    python benchmarks/augment_overhead.py --device cuda --mode zeros

Both arms serve the same batches from the same stored images and the same epoch draws (they are
checked bit-identical first), alternating batch by batch so that load from other processes hits
both alike; each figure is the median milliseconds per batch. The baseline is the pre-chain code,
kept here frozen.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from hooktrain.data.augment import Normalize, RandomCrop, RandomFlip
from hooktrain.data.device import CIFAR10_CLASSES, DeviceData, Split, Splits

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


# The pre-chain code path (hooktrain/data/device.py before the chain), verbatim in substance.
def _source_indices(offset: Tensor, pad: int, size: int, pad_mode: str) -> tuple[Tensor, Tensor]:
    raw = offset[:, None] - pad + torch.arange(size, device=offset.device)
    inside = (raw >= 0) & (raw < size)
    if pad_mode == "reflect":
        mapped = torch.where(raw < 0, -raw, raw)
        mapped = torch.where(mapped >= size, 2 * (size - 1) - mapped, mapped)
    else:
        mapped = raw.clamp(0, size - 1)
    return mapped, inside


def old_train_batch(
    source: Tensor,
    labels: Tensor,
    plan: list[Tensor],
    mean: Tensor,
    std: Tensor,
    index: int,
    batch: int,
    mode: str,
) -> tuple[Tensor, Tensor]:
    """One batch as the pre-chain DeviceData.train_batch made it; `plan` is its EpochPlan's
    order, top, left and flip (bool)."""
    rows = slice(index * batch, (index + 1) * batch)
    order, top, left, flip = (drawn[rows] for drawn in plan)
    height, width = source.shape[1], source.shape[2]
    rows_map, rows_inside = _source_indices(top, 4, height, mode)
    raw_cols, cols_inside = _source_indices(left, 4, width, mode)
    flip = flip[:, None]
    cols = torch.where(flip, raw_cols.flip(1), raw_cols)
    out = source[order[:, None, None], rows_map[:, :, None], cols[:, None, :]]
    if mode == "zeros":
        cols_inside = torch.where(flip, cols_inside.flip(1), cols_inside)
        inside = rows_inside[:, :, None] & cols_inside[:, None, :]
        out = torch.where(inside[..., None], out, 0)
    x = out.to(torch.float32).div_(255).sub_(mean).div_(std)
    return x.permute(0, 3, 1, 2).contiguous(), labels[order]


def ms_of(serve: Callable[[int], tuple[Tensor, Tensor]], index: int, device: torch.device) -> float:
    """Milliseconds to serve batch `index` (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    serve(index)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=10_000, help="stored training images")
    parser.add_argument("--batch-size", type=int, default=400)
    parser.add_argument("--mode", choices=("reflect", "zeros"), default="reflect")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 32, 32, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (args.images,), generator=gen)
    splits = Splits(Split(images, labels), Split(images[:10], labels[:10]), CIFAR10_CLASSES)
    chain = (RandomCrop(pad=4, mode=args.mode), RandomFlip(), Normalize(MEAN, STD))
    data = DeviceData(splits, device, args.batch_size, chain)
    plan = data.epoch_plan(torch.Generator().manual_seed(1))
    (crop, flip, _), source, targets = plan.draws, data.train.inputs, data.train.targets
    old_plan = [plan.order, crop["top"], crop["left"], flip["flip"].bool()]
    mean, std = torch.tensor(MEAN, device=device), torch.tensor(STD, device=device)

    arms: dict[str, Callable[[int], tuple[Tensor, Tensor]]] = {
        "pre-chain crop_flip + normalize": lambda i: old_train_batch(
            source, targets, old_plan, mean, std, i, args.batch_size, args.mode
        ),
        "chain RandomCrop+RandomFlip+Normalize": lambda i: data.train_batch(plan, i),
    }
    for index in range(data.steps_per_epoch):  # warm-up, and the arms must agree exactly
        (x_old, y_old), (x_new, y_new) = (serve(index) for serve in arms.values())
        assert torch.equal(x_old, x_new) and torch.equal(y_old, y_new), f"batch {index} differs"
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for index in range(data.steps_per_epoch):
            for name, serve in arms.items():
                times[name].append(ms_of(serve, index, device))

    print(
        f"{args.batch_size} images of 32x32x3 per batch, {args.mode} padding, {device}, "
        f"{torch.get_num_threads()} thread(s), median of {args.rounds} epochs of "
        f"{data.steps_per_epoch} batches, the arms alternating batch by batch:"
    )
    baseline = statistics.median(next(iter(times.values())))
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:40s} {median:7.3f} ms/batch  ({median / baseline:.3f}x)")


if __name__ == "__main__":
    main()
