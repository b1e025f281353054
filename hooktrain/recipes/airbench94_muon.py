"""airbench94_muon (KellerJordan/cifar10-airbench, 94.01% in 2.59 s on an A100, mean of 200
runs): airbench94's network and data with Muon for the convolution filters, as plugins.

Against ``airbench94``: Muon (plugin ``muon``: momentum 0.6, Nesterov, three Newton-Schulz
steps, each filter renormalised every step) trains the filters, Nesterov SGD (momentum 0.85)
the BatchNorm and whitening biases and the head, whose rate is 0.67/0.053 times theirs
(plugin ``head_lr``); batches of 2,000 for 8 epochs; the learning rate falls linearly to zero
(plugin ``triangle`` with ``peak_at=0, end=0``), the whitening bias's to zero over its 3
epochs (plugin ``freeze`` with ``ramp``); weight decay on the SGD parameters only; no
Lookahead; the head starts at unit standard deviation with logits divided by 256.

airbench states its SGD rates for a summed loss (0.053 for the biases, 0.67 for the head,
decay 2e-6 per example); with the mean loss hooktrain uses, the biases' rate is 0.053 * 2,000
(``max_lr``) and the coupled decay rate 2e-6 / 0.053. Muon is blind to the gradient's scale:
its rate stays 0.24 (``muon.lr_scale = 0.24 / max_lr``).
"""

from hooktrain.config.recipe import Recipe
from hooktrain.config.ref import Ref
from hooktrain.plugins.bias_lr import BiasLR
from hooktrain.plugins.checkpoint import Checkpoint
from hooktrain.plugins.data_parallel import DataParallel
from hooktrain.plugins.freeze import Freeze
from hooktrain.plugins.label_smoothing import LabelSmoothing
from hooktrain.plugins.metrics import Metrics
from hooktrain.plugins.multi_crop import MultiCrop
from hooktrain.plugins.muon import Muon
from hooktrain.plugins.triangle import Triangle
from hooktrain.plugins.weight_decay import WeightDecay
from hooktrain.plugins.whitening import Whitening
from hooktrain.recipes.airbench94 import AUGMENT

BATCH = 2000
BIAS_LR, HEAD_LR, MUON_LR = 0.053, 0.67, 0.24  # airbench94_muon's, per summed loss
DECAY_PER_EXAMPLE = 2e-6
SGD_PARAMS = ("whiten.bias", "*norm*.bias", "head.weight")

recipe = Recipe(
    name="airbench94_muon",
    model=Ref(
        "airbench_net",
        width=64,
        bn_momentum=0.4,
        logit_scale=1 / 256,
        head_std=1.0,
        random_whiten_bias=True,
    ),
    data=Ref("cifar10"),
    augment=AUGMENT,
    epochs=8,
    batch_size=BATCH,
    eval_batch_size=2000,
    eval_every=8,
    optimizer="sgd",
    momentum=0.85,
    nesterov=True,
    max_lr=BIAS_LR * BATCH,
    compile=True,
    plugins=(
        DataParallel(),
        Whitening(images=5000, eps=5e-4),
        Triangle(start=1.0, peak_at=0.0, end=0.0),
        WeightDecay(rate=DECAY_PER_EXAMPLE / BIAS_LR, mode="coupled", include=SGD_PARAMS),
        Muon(momentum=0.6, nesterov=True, steps=3, lr_scale=MUON_LR / (BIAS_LR * BATCH)),
        BiasLR(name="head_lr", scale=HEAD_LR / BIAS_LR, include=("head.weight",)),
        Freeze(include=("whiten.bias",), epochs=3, ramp=True),
        LabelSmoothing(smoothing=0.2),
        MultiCrop(level=2),
        Metrics(),
        Checkpoint(every=8),
    ),
)
