"""The seed's run: ResNet-9 on CIFAR-10 with Adam, one-cycle, weight decay and clipping.

ResNet-9 (conv-BN-ReLU 64, 128 + pool, residual 128, 256 + pool, 512 + pool, residual 512,
pool, dropout 0.2, linear 10), batches of 400 for 8 epochs; augmentation is a random 32x32 crop
of the image padded by 4 (reflected) and a random horizontal flip; Adam with L2 weight decay
1e-4, the learning rate one-cycled up to 0.01 and back down every batch, gradients clipped to
[-0.1, 0.1]. On CUDA it runs in bf16 autocast with channels_last.

``hooktrain ablate resnet9_cifar10`` (no --vary) runs the ablation declared at the end: what
clipping and weight decay are each worth, over three seeds.
"""

from hooktrain.ablation.spec import Ablation
from hooktrain.config.recipe import CIFAR10_MEAN, CIFAR10_STD, Recipe
from hooktrain.config.ref import Ref
from hooktrain.plugins.checkpoint import Checkpoint
from hooktrain.plugins.data_parallel import DataParallel
from hooktrain.plugins.grad_clip import GradClip
from hooktrain.plugins.metrics import Metrics
from hooktrain.plugins.nan_guard import NanGuard
from hooktrain.plugins.onecycle import OneCycle
from hooktrain.plugins.weight_decay import WeightDecay

recipe = Recipe(
    name="resnet9_cifar10",
    model=Ref("resnet9", width=64, dropout=0.2),
    data=Ref("cifar10"),
    # The seed's transforms: RandomCrop(32, padding=4), RandomHorizontalFlip(), Normalize(...).
    augment=(
        Ref("crop", size=32, pad=4, mode="reflect"),
        Ref("flip"),
        Ref("normalize", mean=CIFAR10_MEAN, std=CIFAR10_STD),
    ),
    task=Ref("classification"),
    epochs=8,
    batch_size=400,
    optimizer="adam",
    max_lr=0.01,
    plugins=(
        DataParallel(),
        NanGuard(),
        OneCycle(pct_start=0.3),
        WeightDecay(rate=1e-4),
        GradClip(max=0.1, mode="value"),
        Metrics(),
        Checkpoint(every=1),
    ),
)

ablation = Ablation(vary={"grad_clip": ["on", "off"], "weight_decay": ["on", "off"]}, seeds=3)
