"""ResNet-18 (torchvision's, with a 32x32 stem) on CIFAR-10: SGD with momentum and one-cycle.

The settings of the PyTorch Lightning "CIFAR10 ~94% Baseline" tutorial
(Lightning-AI/tutorials, lightning_examples/cifar10-baseline), which reports 92-93% test
accuracy in 20-30 epochs: torchvision's resnet18 with a 3x3 stride-1 first convolution and no
max-pool; SGD with momentum 0.9 (not Nesterov) and L2 weight decay 5e-4 on every parameter;
torch's OneCycleLR up to 0.1 (warm-up over 30% of the steps from 0.1/25, cosine down to
0.1/25/1e4) stepped every batch; batches of 64 for 30 epochs; a random 32x32 crop of the image
padded by 4 and a random horizontal flip. Two differences: the tutorial holds 5,000 training
images out for validation and pads with zeros, while this recipe trains on all 50,000 with the
seed's chain (reflected padding, the seed's normalization). On CUDA it runs in bf16 autocast
with channels_last.
"""

from hooktrain.config.recipe import CIFAR10_MEAN, CIFAR10_STD, Recipe
from hooktrain.config.ref import Ref
from hooktrain.plugins.checkpoint import Checkpoint
from hooktrain.plugins.data_parallel import DataParallel
from hooktrain.plugins.metrics import Metrics
from hooktrain.plugins.nan_guard import NanGuard
from hooktrain.plugins.onecycle import OneCycle
from hooktrain.plugins.weight_decay import WeightDecay

recipe = Recipe(
    name="resnet18_cifar10",
    model=Ref("resnet18", width=64),
    data=Ref("cifar10"),
    augment=(
        Ref("crop", size=32, pad=4, mode="reflect"),
        Ref("flip"),
        Ref("normalize", mean=CIFAR10_MEAN, std=CIFAR10_STD),
    ),
    task=Ref("classification"),
    epochs=30,
    batch_size=64,
    optimizer="sgd",
    momentum=0.9,
    nesterov=False,
    max_lr=0.1,
    plugins=(
        DataParallel(),
        NanGuard(),
        OneCycle(pct_start=0.3),
        # torch.optim.SGD(weight_decay=5e-4) decays every parameter, BatchNorm's and biases too.
        WeightDecay(rate=5e-4, include=("*",)),
        Metrics(),
        Checkpoint(every=5),
    ),
)
