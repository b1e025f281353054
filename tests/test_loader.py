"""LoaderData, DataLoader workers reading a Dataset batch by batch, against DeviceData serving
the same (materialised) real CIFAR-10 JPEGs: the same batches bit for bit, whatever the
workers, the order of the calls, the holdout or the shard; and training fed by it."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from hooktrain import Ref
from hooktrain.config.overrides import apply_overrides
from hooktrain.config.recipe import CIFAR10_MEAN, CIFAR10_STD
from hooktrain.config.registry import load_recipe
from hooktrain.data.augment import Normalize, RandomCrop, RandomFlip
from hooktrain.data.device import CIFAR10_CLASSES, DeviceData
from hooktrain.data.in_memory import DatasetSplits, from_datasets
from hooktrain.data.loader import LoaderData
from hooktrain.errors import HooktrainError
from hooktrain.run.checkpoints import load_checkpoint
from hooktrain.run.loop import train, train_seeds

CPU = torch.device("cpu")
SEED_CHAIN = (RandomCrop(32, 4, "reflect"), RandomFlip(), Normalize(CIFAR10_MEAN, CIFAR10_STD))
TRAIN_PER_CLASS, TEST_PER_CLASS, BATCH = 30, 10, 50
# Two steps per epoch on 80 of the 300 training images.
TINY = ["model.width=4", "batch_size=40", "train_limit=80", "eval_batch_size=100", "epochs=2"]


class Jpegs(Dataset):
    """The first `per_class` JPEGs of each class of one split, decoded per item (PIL): a CHW
    uint8 tensor, or the PIL image; ``targets`` lists the labels, as ImageFolder's."""

    def __init__(self, root: Path, per_class: int, pil: bool = False) -> None:
        self.files = [
            (root / name / f"{number:04d}.jpg", label)
            for label, name in enumerate(CIFAR10_CLASSES)
            for number in range(per_class)
        ]
        self.targets = [label for _, label in self.files]
        self.pil = pil

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[object, int]:
        path, label = self.files[index]
        image = Image.open(path)
        return (image if self.pil else TF.pil_to_tensor(image)), label


class OneResized(Jpegs):
    """Jpegs whose item `odd` is resized to 28x28 pixels."""

    odd = 7

    def __getitem__(self, index: int) -> tuple[object, int]:
        image, label = super().__getitem__(index)
        return (TF.resize(image, [28, 28]) if index == self.odd else image), label


class Brightness(Dataset):
    """Features of real images, no ``targets`` attribute: each channel's mean in [0, 1], and
    their sum as the regression target."""

    def __init__(self, images: Jpegs) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, float]:
        image, _ = self.images[index]
        features = image.float().mean(dim=(1, 2)) / 255
        return features, float(features.sum())


def cifar_subset(root: str, workers: int = 0, materialise: bool = False) -> object:
    """The data source of the runs below: 300 training and 100 test JPEGs of real CIFAR-10."""
    train_set = Jpegs(Path(root) / "train", TRAIN_PER_CLASS)
    test_set = Jpegs(Path(root) / "test", TEST_PER_CLASS)
    return from_datasets(
        train_set, test_set, CIFAR10_CLASSES, materialise=materialise, workers=workers
    )


@pytest.fixture(scope="module")
def materialised(cifar_dir: Path) -> object:
    return cifar_subset(str(cifar_dir), materialise=True)


def kept(cifar_dir: Path, workers: int) -> DatasetSplits:
    splits = cifar_subset(str(cifar_dir), workers)
    assert isinstance(splits, DatasetSplits)
    return splits


def assert_same(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, ...]) -> None:
    """Equal bit for bit, in the same memory layout (the model sees the same tensors)."""
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.device == b.device and a.stride() == b.stride()
        assert torch.equal(a, b)


def assert_same_eval(loader: LoaderData, device: DeviceData, split: str) -> None:
    pairs = zip(loader.eval_batches(split), device.eval_batches(split), strict=True)
    for got, want in pairs:
        assert_same(got, want)


@pytest.mark.parametrize(
    ("workers", "val_split", "train_limit"),
    [(0, 0.0, None), (2, 0.0, None), (2, 0.2, 150)],
    ids=["no-workers", "2-workers", "2-workers-holdout"],
)
def test_an_epoch_equals_device_data_bit_for_bit(
    cifar_dir: Path, materialised: object, workers: int, val_split: float, train_limit: int | None
) -> None:
    """The seed chain's whole epoch, then the eval splits; the holdout keeps the same images."""
    options = {"val_split": val_split, "train_limit": train_limit, "eval_batch_size": 30}
    device = DeviceData(materialised, CPU, BATCH, SEED_CHAIN, **options)
    loader = LoaderData(kept(cifar_dir, workers), CPU, BATCH, SEED_CHAIN, **options)
    for name in ("n_train", "n_val", "n_test", "steps_per_epoch", "input_shape", "num_outputs"):
        assert getattr(loader, name) == getattr(device, name), name
    assert torch.equal(loader.train.targets, device.train.targets)
    assert torch.equal(loader.val.targets, device.val.targets)
    assert loader.classes == CIFAR10_CLASSES and loader.train.is_image
    generators = [torch.Generator().manual_seed(5) for _ in range(2)]
    plans = [data.epoch_plan(g) for data, g in zip((loader, device), generators, strict=True)]
    # The same draws from the generator, which ends in the same state: resume is unchanged.
    assert torch.equal(generators[0].get_state(), generators[1].get_state())
    for index in range(device.steps_per_epoch):
        assert_same(loader.train_batch(plans[0], index), device.train_batch(plans[1], index))
    for split in ("val", "test") if val_split else ("test",):
        assert_same_eval(loader, device, split)


def test_out_of_order_calls_restart_at_the_batch_asked_for(
    cifar_dir: Path, materialised: object
) -> None:
    """A jump ahead (a resume inside an epoch), a step back, an evaluation in between, and
    two plans read in turn (seeds trained together) each give DeviceData's batches."""
    device = DeviceData(materialised, CPU, BATCH, SEED_CHAIN)
    loader = LoaderData(kept(cifar_dir, 2), CPU, BATCH, SEED_CHAIN)

    def plan_pair(seed: int) -> tuple[object, object]:
        return (
            loader.epoch_plan(torch.Generator().manual_seed(seed)),
            device.epoch_plan(torch.Generator().manual_seed(seed)),
        )

    ours, theirs = plan_pair(1)
    for index in (0, 1, 4, 5, 1, 2):
        assert_same(loader.train_batch(ours, index), device.train_batch(theirs, index))
    assert_same_eval(loader, device, "test")
    assert_same(loader.train_batch(ours, 3), device.train_batch(theirs, 3))
    lanes = [plan_pair(seed) for seed in (2, 3)]
    for index in range(2, device.steps_per_epoch):
        for ours, theirs in lanes:
            assert_same(loader.train_batch(ours, index), device.train_batch(theirs, index))


def test_each_shard_reads_its_slice(cifar_dir: Path, materialised: object) -> None:
    """Two processes' shards: DeviceData's shards, which together make the whole batch."""
    whole = DeviceData(materialised, CPU, BATCH, SEED_CHAIN, eval_batch_size=30)
    whole_plan = whole.epoch_plan(torch.Generator().manual_seed(7))
    parts = []
    for shard in range(2):
        options = {"eval_batch_size": 30, "shard": shard, "shards": 2}
        device = DeviceData(materialised, CPU, BATCH, SEED_CHAIN, **options)
        loader = LoaderData(kept(cifar_dir, 0), CPU, BATCH, SEED_CHAIN, **options)
        plans = [d.epoch_plan(torch.Generator().manual_seed(7)) for d in (loader, device)]
        batches = [loader.train_batch(plans[0], i) for i in range(loader.steps_per_epoch)]
        for index, batch in enumerate(batches):
            assert batch[0].shape[0] == BATCH // 2
            assert_same(batch, device.train_batch(plans[1], index))
        assert_same_eval(loader, device, "test")
        parts.append(batches)
    for index, (first, second) in enumerate(zip(*parts, strict=True)):
        together = [torch.cat(pair) for pair in zip(first, second, strict=True)]
        assert all(map(torch.equal, together, whole.train_batch(whole_plan, index)))


def test_features_without_a_targets_attribute(cifar_dir: Path) -> None:
    """Float features and float targets: read item by item, served unaugmented in float32."""
    images = [Jpegs(cifar_dir / split, 10) for split in ("train", "test")]
    train_set, test_set = Brightness(images[0]), Brightness(images[1])
    splits = from_datasets(train_set, test_set, materialise=False, workers=0)
    device = DeviceData(from_datasets(train_set, test_set), CPU, 20)
    loader = LoaderData(splits, CPU, 20)
    assert splits.classes is None and loader.num_outputs == 1 and loader.input_shape == (3,)
    assert torch.equal(loader.train.targets, device.train.targets)
    plans = [d.epoch_plan(torch.Generator().manual_seed(0)) for d in (loader, device)]
    for index in range(device.steps_per_epoch):
        assert_same(loader.train_batch(plans[0], index), device.train_batch(plans[1], index))
    assert_same_eval(loader, device, "test")


def test_pil_items_without_class_names(cifar_dir: Path) -> None:
    """PIL images (HWC once converted) serve as materialised; labels without names are named
    "0" to "9"."""
    train_set = Jpegs(cifar_dir / "train", TRAIN_PER_CLASS, pil=True)
    test_set = Jpegs(cifar_dir / "test", TEST_PER_CLASS, pil=True)
    splits = from_datasets(train_set, test_set, materialise=False, workers=0)
    assert splits.classes == tuple(str(label) for label in range(10))
    loader = LoaderData(splits, CPU, BATCH, SEED_CHAIN)
    device = DeviceData(from_datasets(train_set, test_set), CPU, BATCH, SEED_CHAIN)
    plans = [d.epoch_plan(torch.Generator().manual_seed(0)) for d in (loader, device)]
    assert_same(loader.train_batch(plans[0], 2), device.train_batch(plans[1], 2))


@pytest.mark.parametrize("workers", [0, 2])
def test_an_item_of_another_size_is_named(cifar_dir: Path, workers: int) -> None:
    train_set = OneResized(cifar_dir / "train", TRAIN_PER_CLASS)
    test_set = Jpegs(cifar_dir / "test", TEST_PER_CLASS)
    splits = from_datasets(train_set, test_set, CIFAR10_CLASSES, materialise=False, workers=workers)
    loader = LoaderData(splits, CPU, BATCH, SEED_CHAIN)
    plan = loader.epoch_plan(torch.Generator().manual_seed(0))
    expected = "Item 7 of the train dataset has 28x28 RGB pixels as its input but item 0 has 32x32"
    with pytest.raises(HooktrainError, match=expected):
        for index in range(loader.steps_per_epoch):
            loader.train_batch(plan, index)


def test_dataset_splits_refuse_what_they_cannot_serve(cifar_dir: Path) -> None:
    images = Jpegs(cifar_dir / "test", 2)
    features = Brightness(images)
    with pytest.raises(HooktrainError, match="regression values"):
        DatasetSplits(features, features, ("a", "b"))
    with pytest.raises(HooktrainError, match="workers is a number"):
        DatasetSplits(images, images, CIFAR10_CLASSES, workers=-1)
    with pytest.raises(HooktrainError, match="the test inputs are 3 float32 values"):
        DatasetSplits(images, features)
    wrong = Jpegs(cifar_dir / "test", 2)
    wrong.targets = [0.5] * len(wrong)
    with pytest.raises(HooktrainError, match="targets attribute holds 1 float32 value"):
        DatasetSplits(wrong, images)


# --------------------------------------------------------------------------------------------
# Training fed by the workers


def recipe_on(cifar_dir: Path, **data: object) -> object:
    recipe = apply_overrides(
        load_recipe("resnet9_cifar10"),
        [*TINY, "metrics.progress=false", "metrics.tensorboard=false"],
    )
    return attrs.evolve(recipe, data=Ref(cifar_subset, root=str(cifar_dir), **data))


def final_state(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    state = load_checkpoint(folder / "checkpoints" / "last.pt")["state"]
    return {kind: state[kind] for kind in ("params", "buffers")}


@pytest.mark.usefixtures("float64_training")
def test_training_fed_by_workers_resumes_exactly(cifar_dir: Path, tmp_path: Path) -> None:
    """In float64: a run fed by two workers trains as the same run on DeviceData (the batches
    are equal bit for bit; the kernels may meet them at other memory addresses, which float64
    keeps below 1e-10), and stopped after epoch 1 then resumed it ends bit-identical."""
    options = {"device": "cpu", "echo": lambda _: None}
    on_device = train(recipe_on(cifar_dir, materialise=True), out_dir=tmp_path / "d", **options)
    recipe = recipe_on(cifar_dir, workers=2)
    straight = train(recipe, out_dir=tmp_path / "straight", **options)
    assert straight.report.epoch == 2 and straight.state.step == 4
    torch.testing.assert_close(straight.state.params, on_device.state.params, rtol=1e-10, atol=0)
    assert straight.report.metrics == pytest.approx(on_device.report.metrics, rel=1e-10)

    train(recipe, out_dir=tmp_path / "split", stop_after_epoch=1, **options)
    payload = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert payload["state"]["epoch"] == 1
    resumed = train(recipe, out_dir=tmp_path / "split", resume=payload, **options)
    assert resumed.report == attrs.evolve(straight.report, seconds=resumed.report.seconds)
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    for kind in a:
        for name in a[kind]:
            assert torch.equal(a[kind][name], b[kind][name]), (kind, name)


@pytest.mark.usefixtures("float64_training")
def test_seeds_trained_together_read_their_own_batches(cifar_dir: Path, tmp_path: Path) -> None:
    """Two seeds in lockstep, each lane's plan read in turn: as on DeviceData (float64, as
    above)."""
    options = {"device": "cpu", "echo": lambda _: None}
    runs = {}
    for name, data in {"device": {"materialise": True}, "loader": {"workers": 2}}.items():
        folders = [tmp_path / name / str(seed) for seed in (0, 1)]
        runs[name] = train_seeds(recipe_on(cifar_dir, **data), [0, 1], out_dirs=folders, **options)
    for ours, theirs in zip(runs["loader"], runs["device"], strict=True):
        assert ours.report.epoch == 2
        torch.testing.assert_close(ours.state.params, theirs.state.params, rtol=1e-10, atol=0)
    assert not torch.equal(*(t.state.params["0.0.weight"] for t in runs["loader"]))
