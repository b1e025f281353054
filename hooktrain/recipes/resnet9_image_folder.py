"""A ResNet-9 of half the seed's width on your own photos: a folder of class folders, 48x48.

``hooktrain run resnet9_image_folder --data-dir DIR`` trains on DIR/train/CLASS/*.jpg (or .png,
...) and tests on DIR/test/CLASS/, any number of classes (two or more; the model gets one
output per class). Every image is resized to 48x48 as it is decoded (once, then cached), so
the photos may have any sizes; ``--set data.image_size=64,64`` trains at another size. The
chain is the seed's at 48 pixels: a random crop of the image padded by 4 (reflected) and a
random horizontal flip, then ImageNet's per-channel mean and std, the usual statistics for
photographs. The seed's Adam with L2 weight decay 1e-4, one-cycled up to 0.01, gradients
clipped to [-0.1, 0.1], on batches of 64 (small folders still get several steps an epoch)
for 20 epochs; ``best.pt`` keeps the epoch of best test accuracy, or best validation
accuracy with ``--set val_split=0.1``.
"""

from hooktrain.config.recipe import Recipe
from hooktrain.config.ref import Ref
from hooktrain.plugins.checkpoint import Checkpoint
from hooktrain.plugins.data_parallel import DataParallel
from hooktrain.plugins.grad_clip import GradClip
from hooktrain.plugins.metrics import Metrics
from hooktrain.plugins.nan_guard import NanGuard
from hooktrain.plugins.onecycle import OneCycle
from hooktrain.plugins.weight_decay import WeightDecay

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

recipe = Recipe(
    name="resnet9_image_folder",
    model=Ref("resnet9", width=32, dropout=0.2),
    data=Ref("image_folder", image_size=(48, 48)),
    augment=(
        Ref("crop", pad=4, mode="reflect"),
        Ref("flip"),
        Ref("normalize", mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ),
    task=Ref("classification"),
    epochs=20,
    batch_size=64,
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
