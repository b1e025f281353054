"""What reading through hooktrain's LoaderData costs: its train step against a plain PyTorch
loop over the same DataLoader workers.

Both arms read the same map-style Dataset of CIFAR-10 JPEGs (decoded per item with PIL) with
the same number of persistent workers, move each uint8 batch to the device, augment it there
(random 32x32 crop of the image padded by 4 and reflected, random flip, normalize) and train a
ResNet-9 of width 16 with Adam at a constant learning rate:

- (a) hooktrain: ``LoaderData`` (its epoch plan, batch sampler and augmentation chain) feeding
  the step composed as a run composes it (``compose_pieces``, ``build_step``);
- (b) plain PyTorch: ``DataLoader(shuffle=True, drop_last=True)``, the augmentation written in
  torch ops, ``nn.Module`` and ``torch.optim.Adam``;
- (c) the plain step of (b) fed by LoaderData, which splits a/b into the data path's part (c/b)
  and the engine's (a/c; ``engine_overhead.py`` measures that alone).

Each repeat trains one epoch of each arm from fresh weights, the arms alternating (a b c a b c
...) so drift of the machine hits all alike; the figures are the median images per second and
the ratios to (b) (the target for a/b is 0.95 or more), and those of the best repeats, which
other work on a shared machine disturbs least.

    python benchmarks/dataloader.py --data-dir .data                  # CPU, 2 workers
    python benchmarks/dataloader.py --data-dir .data --device cuda --workers 8 --images 20000
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hooktrain.config.recipe import CIFAR10_MEAN, CIFAR10_STD, Recipe
from hooktrain.core.context import BuildContext
from hooktrain.core.optim import adam
from hooktrain.core.plugin import make_plugin_manager
from hooktrain.core.state import TrainState
from hooktrain.core.step import build_step
from hooktrain.core.task import Classification
from hooktrain.data.augment import Normalize, RandomCrop, RandomFlip
from hooktrain.data.device import CIFAR10_CLASSES
from hooktrain.data.in_memory import DatasetSplits
from hooktrain.data.loader import LoaderData
from hooktrain.models import resnet9
from hooktrain.run.build import compose_pieces

LR, PAD = 1e-3, 4
Epochs = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]
"""An epoch's batches, (inputs, labels) on the device, given the repeat's seed."""


class Jpegs(Dataset):
    """The first images of each class of one split of an image-folder CIFAR-10, decoded per
    item with PIL into a CHW uint8 tensor."""

    def __init__(self, root: Path, count: int) -> None:
        per_class = -(-count // len(CIFAR10_CLASSES))
        self.files = [
            (path, label)
            for label, name in enumerate(CIFAR10_CLASSES)
            for path in sorted((root / name).glob("*.jpg"))[:per_class]
        ][:count]
        self.targets = [label for _, label in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[index]
        return TF.pil_to_tensor(Image.open(path).convert("RGB")), label


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_data(splits: DatasetSplits, batch: int, device: torch.device) -> LoaderData:
    chain = (RandomCrop(32, PAD, "reflect"), RandomFlip(), Normalize(CIFAR10_MEAN, CIFAR10_STD))
    return LoaderData(splits, device, batch, chain, channels_last=device.type == "cuda")


def hooktrain_arm(model: nn.Module, data: LoaderData) -> Callable[[int], None]:
    """(a) One epoch of hooktrain's step on LoaderData batches, from fresh state."""
    recipe = Recipe(name="dataloader", max_lr=LR, compile=False, plugins=())
    optimizer = adam()
    shapes = {name: p.shape for name, p in model.named_parameters()}
    build = BuildContext(recipe, shapes, data.steps_per_epoch, optimizer)
    task = Classification()
    step = build_step(compose_pieces(make_plugin_manager(()), build, model, None, task))
    start = TrainState.create(model, optimizer, seed=0)

    def run(seed: int) -> None:
        state, plan = start, data.epoch_plan(torch.Generator().manual_seed(seed))
        for index in range(data.steps_per_epoch):
            state, metrics = step(state, data.train_batch(plan, index))
        metrics["loss"].item()

    return run


def plain_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop of the reflect-padded images and random flip, per image, then normalize:
    uint8 NCHW in, float32 NCHW out (channels_last memory on CUDA, as hooktrain's)."""
    size, height, width = len(images), images.shape[2], images.shape[3]
    padded = F.pad(images.float(), (PAD,) * 4, mode="reflect")
    top = torch.randint(0, 2 * PAD + 1, (size,), generator=generator).to(images.device)
    left = torch.randint(0, 2 * PAD + 1, (size,), generator=generator).to(images.device)
    flip = torch.randint(0, 2, (size,), generator=generator).bool().to(images.device)
    rows = top[:, None] + torch.arange(height, device=images.device)
    cols = left[:, None] + torch.arange(width, device=images.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    index = torch.arange(size, device=images.device)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]
    mean = torch.tensor(CIFAR10_MEAN, device=images.device)
    std = torch.tensor(CIFAR10_STD, device=images.device)
    out = crops.div_(255).sub_(mean).div_(std).permute(0, 3, 1, 2)
    cuda = images.device.type == "cuda"
    return out.contiguous(memory_format=torch.channels_last if cuda else torch.contiguous_format)


def plain_training(model: nn.Module, batches: Epochs) -> Callable[[int], None]:
    """One epoch of a plain PyTorch step over ``batches(seed)``, from fresh weights."""

    def run(seed: int) -> None:
        net = copy.deepcopy(model)
        optimizer = torch.optim.Adam(net.parameters(), lr=LR)
        for x, y in batches(seed):
            loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        loss.item()

    return run


def plain_batches(dataset: Dataset, batch: int, workers: int, device: torch.device) -> Epochs:
    """(b) An epoch of a plain DataLoader's batches, augmented on the device."""
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )

    def batches(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        for images, labels in loader:
            x = plain_augment(images.to(device, non_blocking=True), generator)
            yield x, labels.to(device, non_blocking=True)

    return batches


def loader_batches(data: LoaderData) -> Epochs:
    """(c) An epoch of LoaderData's batches."""

    def batches(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = data.epoch_plan(torch.Generator().manual_seed(seed))
        for index in range(data.steps_per_epoch):
            yield data.train_batch(plan, index)

    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="train/<class>/*.jpg")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=2560)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    dataset = Jpegs(args.data_dir / "train", args.images)
    splits = DatasetSplits(dataset, dataset, CIFAR10_CLASSES, workers=args.workers)
    torch.manual_seed(0)
    model = resnet9(10, width=16).to(device).train()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    # One LoaderData (its workers) per arm, as each arm has its own DataLoader.
    arms = {
        "a hooktrain": hooktrain_arm(model, loader_data(splits, args.batch, device)),
        "b plain": plain_training(model, plain_batches(dataset, args.batch, args.workers, device)),
        "c plain step on LoaderData": plain_training(
            model, loader_batches(loader_data(splits, args.batch, device))
        ),
    }
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    steps = len(dataset) // args.batch
    print(
        f"ResNet-9 width 16, {steps} steps of {args.batch} JPEGs a run, {args.workers} workers, "
        f"{args.repeats} repeats, on {hardware} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)"
    )
    for name, arm in arms.items():  # warm-up: workers started, allocator, kernels
        started = time.perf_counter()
        arm(0)
        synchronize(device)
        print(f"  warm-up {name}: {time.perf_counter() - started:.1f} s")
    rates: dict[str, list[float]] = {name: [] for name in arms}
    for repeat in range(1, args.repeats + 1):
        for name, arm in arms.items():
            synchronize(device)
            started = time.perf_counter()
            arm(repeat)
            synchronize(device)
            rates[name].append(steps * args.batch / (time.perf_counter() - started))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        spread = ", ".join(f"{v:.0f}" for v in values)
        print(f"  {name}: {medians[name]:.0f} images/s (median of {spread})")
    best = {name: max(values) for name, values in rates.items()}
    for name, short in (("a hooktrain", "a"), ("c plain step on LoaderData", "c")):
        print(
            f"  {short}/b = {medians[name] / medians['b plain']:.3f} of the medians, "
            f"{best[name] / best['b plain']:.3f} of the best repeats"
        )
    print("  (target a/b >= 0.95)")


if __name__ == "__main__":
    main()
