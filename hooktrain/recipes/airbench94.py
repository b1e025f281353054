"""airbench94 (Keller Jordan's CIFAR-10 speedrun, PyPI ``airbench`` 0.1.8) with every trick a
plugin, an augmentation piece or a field, so each one can be switched off or changed.

airbench reports 94.01% test accuracy (mean of 1,000 runs) in 3.83 s on an A100. The parts:

- network (``model``): ``airbench_net``, a frozen 2x2 whitening convolution and three
  conv-pool-BatchNorm-GELU groups of 64, 256 and 256 channels, logits times 1/9;
- whitening initialisation (plugin ``whitening``): the first layer whitens 2x2 patches of the
  first 5,000 training images; its bias trains for 3 epochs only (plugin ``freeze``);
- data order and augmentation (``augment``): a fresh shuffle each epoch, a random translation
  by up to 2 pixels (reflect-padded crop) and the alternating flip (``altflip``: each image is
  mirrored every other epoch), normalised with airbench's CIFAR-10 statistics;
- optimizer: SGD with Nesterov momentum 0.85 on batches of 1,024, the learning rate a
  triangle (plugin ``triangle``: 0.2 to 1 at 23% of the run, down to 0.07), coupled weight
  decay on every parameter (plugin ``weight_decay``), BatchNorm biases trained 64 times faster
  at the same decay step (plugin ``bias_lr``), Lookahead every 5 steps with a pull that falls
  from 1 to 1 - 0.95**5, ending on the slow weights (plugin ``lookahead``);
- label smoothing 0.2 (plugin ``label_smoothing``);
- multi-crop test-time augmentation (plugin ``multi_crop``): six views per test image.

airbench states its hyperparameters per 1,024 examples of a summed loss (lr 11.5, weight decay
0.0153); with the mean loss hooktrain uses they are ``max_lr = 11.5 / (1 + 1 / (1 - 0.85)) =
1.5`` and a coupled decay rate of ``0.0153 / 11.5``. Two differences remain: 10 epochs
(airbench stops after 9.9, at step 476 of 480), and Lookahead averages the parameters but
not BatchNorm's running statistics. ``hooktrain ablate airbench94 --mode one-at-a-time``
trains the declared ablation below: the recipe, then each trick taken away alone.
"""

from hooktrain.ablation.spec import Ablation
from hooktrain.config.recipe import Recipe
from hooktrain.config.ref import Ref
from hooktrain.plugins.bias_lr import BiasLR
from hooktrain.plugins.checkpoint import Checkpoint
from hooktrain.plugins.data_parallel import DataParallel
from hooktrain.plugins.freeze import Freeze
from hooktrain.plugins.label_smoothing import LabelSmoothing
from hooktrain.plugins.lookahead import Lookahead
from hooktrain.plugins.metrics import Metrics
from hooktrain.plugins.multi_crop import MultiCrop
from hooktrain.plugins.triangle import Triangle
from hooktrain.plugins.weight_decay import WeightDecay
from hooktrain.plugins.whitening import Whitening

AIRBENCH_MEAN = (0.4914, 0.4822, 0.4465)
AIRBENCH_STD = (0.2470, 0.2435, 0.2616)
MOMENTUM = 0.85
LR_PER_1024 = 11.5  # airbench's learning rate, per 1,024 examples of a summed loss
DECAY_PER_1024 = 0.0153

AUGMENT = (
    Ref("crop", pad=2, mode="reflect"),
    Ref("altflip"),
    Ref("normalize", mean=AIRBENCH_MEAN, std=AIRBENCH_STD),
)

recipe = Recipe(
    name="airbench94",
    model=Ref("airbench_net", width=64, bn_momentum=0.4, logit_scale=1 / 9),
    data=Ref("cifar10"),
    augment=AUGMENT,
    epochs=10,
    batch_size=1024,
    eval_batch_size=2000,
    eval_every=10,  # once, at the end, as airbench (multi-crop costs six forward passes)
    optimizer="sgd",
    momentum=MOMENTUM,
    nesterov=True,
    max_lr=LR_PER_1024 / (1 + 1 / (1 - MOMENTUM)),
    compile=True,
    plugins=(
        DataParallel(),
        Whitening(images=5000, eps=5e-4),
        Triangle(start=0.2, peak_at=0.23, end=0.07),
        WeightDecay(rate=DECAY_PER_1024 / LR_PER_1024, mode="coupled", include=("*",)),
        BiasLR(scale=64.0),
        Freeze(include=("whiten.bias",), epochs=3),
        Lookahead(k=5, alpha=1 - 0.95**5, ramp_power=3.0, end_on_slow=True),
        LabelSmoothing(smoothing=0.2),
        MultiCrop(level=2),
        Metrics(),
        Checkpoint(every=10),
    ),
)

TRICKS = ("whitening", "freeze", "bias_lr", "lookahead", "label_smoothing", "multi_crop")

ablation = Ablation(
    vary={
        **{trick: ["on", "off"] for trick in TRICKS},
        # The alternating flip against a random one, and no translation.
        "augment": [
            ("crop", "altflip", "normalize"),
            ("crop", "flip", "normalize"),
            ("altflip", "normalize"),
        ],
    },
    mode="one-at-a-time",
    seeds=5,
)
