"""ResNet-9 with the known speed ideas: fewer epochs of larger batches to a higher accuracy.

The seed's ResNet-9 without conv biases (BatchNorm cancels them) and with logits scaled by
1/8; SGD with Nesterov momentum 0.9 on batches of 512 for 10 epochs, the learning rate rising
linearly to 0.4 over the first quarter and falling linearly to almost nothing; L2 weight decay
5e-4 on the conv and linear weights; label smoothing 0.2; gradients left unclipped; test-time
flip augmentation. On CUDA: bf16 autocast, channels_last and the whole step under
torch.compile. Every idea is a field or a plugin, so ``hooktrain ablate resnet9_fast --vary
label_smoothing=on,off --vary tta_flip=true,false`` measures what each is worth; ``--with ema``
adds an average of the weights.
"""

from hooktrain.config.recipe import CIFAR10_MEAN, CIFAR10_STD, Recipe
from hooktrain.config.ref import Ref
from hooktrain.plugins.checkpoint import Checkpoint
from hooktrain.plugins.data_parallel import DataParallel
from hooktrain.plugins.label_smoothing import LabelSmoothing
from hooktrain.plugins.metrics import Metrics
from hooktrain.plugins.nan_guard import NanGuard
from hooktrain.plugins.onecycle import OneCycle
from hooktrain.plugins.weight_decay import WeightDecay

recipe = Recipe(
    name="resnet9_fast",
    model=Ref("resnet9", width=64, dropout=0.0, conv_bias=False, logit_scale=0.125),
    data=Ref("cifar10"),
    augment=(
        Ref("crop", size=32, pad=4, mode="reflect"),
        Ref("flip"),
        Ref("normalize", mean=CIFAR10_MEAN, std=CIFAR10_STD),
    ),
    tta_flip=True,
    epochs=10,
    batch_size=512,
    optimizer="sgd",
    momentum=0.9,
    nesterov=True,
    max_lr=0.4,
    compile=True,
    plugins=(
        DataParallel(),
        NanGuard(),
        OneCycle(pct_start=0.25, anneal="linear", div_factor=40, final_div_factor=100),
        WeightDecay(rate=5e-4),
        LabelSmoothing(smoothing=0.2),
        Metrics(),
        Checkpoint(every=10),
    ),
)
