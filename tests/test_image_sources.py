"""Tests for data sources beyond CIFAR-10: image folders of any classes and size, torchvision
datasets by name, and tensors or Datasets already in memory.

Image folders are built from the real CIFAR-10 copy (3 classes upscaled to 48x48, JPEG and
PNG) and checked against Pillow's and torchvision's decoding of the same files.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import pickle
import pickletools
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from test_sources import jpeg_claiming, png_bytes
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2.functional import resize

from hooktrain.data import image_folders
from hooktrain.data.device import CIFAR10_CLASSES, Splits
from hooktrain.data.image_files import MAX_IMAGE_PIXELS
from hooktrain.data.image_folders import load_image_folder
from hooktrain.data.in_memory import from_datasets, from_tensors
from hooktrain.data.sources import load_cifar10
from hooktrain.data.torchvision_sets import dataset_names, load_torchvision
from hooktrain.errors import HooktrainError

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

CLASSES = ("airplane", "cat", "ship")
PER_CLASS = {"train": 60, "test": 20}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A decoded-image cache of this test alone, so its files can be counted."""
    monkeypatch.setenv("HOOKTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "decoded"


@pytest.fixture(scope="module")
def three_classes(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 train and 20 test real images each of airplane, cat and ship, upscaled to 48x48:
    train/ all JPEG (decoded in batches), test/ PNG and JPEG alternating (one by one)."""
    root = tmp_path_factory.mktemp("three") / "data"
    for split, count in PER_CLASS.items():
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i, source in enumerate(sorted((cifar_dir / split / name).glob("*.jpg"))[:count]):
                with Image.open(source) as image:
                    big = image.convert("RGB").resize((48, 48), Image.Resampling.BICUBIC)
                form = "png" if split == "test" and i % 2 else "jpg"
                big.save(root / split / name / f"{i:03d}.{form}")
    return root


def split_files(root: Path, split: str) -> list[Path]:
    """The images of one split in label order, as the loader orders them."""
    return [
        f
        for name in sorted(os.listdir(root / split))
        for f in sorted((root / split / name).iterdir())
    ]


def torchvision_rgb(path: Path) -> Tensor:
    return decode_image(str(path), mode=ImageReadMode.RGB)


def pillow_array(path: Path, mode: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image.convert(mode))


def copy_of(folder: Path, tmp_path: Path) -> Path:
    shutil.copytree(folder, tmp_path / "data")
    return tmp_path / "data"


# ---------------------------------------------------------------------------------------------
# Image folders of any classes and size


def test_three_classes_of_48x48_decode_as_pillow_and_torchvision_do(three_classes: Path) -> None:
    dataset = load_image_folder(three_classes, echo=lambda line: None)

    assert dataset.classes == CLASSES
    assert dataset.train.inputs.shape == (180, 48, 48, 3)
    assert dataset.test.inputs.shape == (60, 48, 48, 3)
    for split, part in (("train", dataset.train), ("test", dataset.test)):
        count = PER_CLASS[split]
        assert part.targets.dtype == torch.int64
        assert part.targets.tolist() == [label for label in range(3) for _ in range(count)]
        for i, path in enumerate(split_files(three_classes, split)):
            assert np.array_equal(part.inputs[i].numpy(), pillow_array(path, "RGB")), path
            assert torch.equal(part.inputs[i], torchvision_rgb(path).permute(1, 2, 0)), path


def test_grayscale_is_one_channel_of_pillows_luma(three_classes: Path) -> None:
    dataset = load_image_folder(three_classes, grayscale=True, echo=lambda line: None)

    assert dataset.train.inputs.shape == (180, 48, 48, 1)
    assert dataset.test.inputs.shape == (60, 48, 48, 1)
    for split, part in (("train", dataset.train), ("test", dataset.test)):
        for i, path in enumerate(split_files(three_classes, split)):
            assert np.array_equal(part.inputs[i, :, :, 0].numpy(), pillow_array(path, "L")), path


@pytest.fixture
def mixed_sizes(three_classes: Path, cifar_dir: Path, tmp_path: Path) -> Path:
    """The three classes with a 30x20 PNG among the train ships and a real 32x32 CIFAR JPEG in
    place of a test cat."""
    folder = copy_of(three_classes, tmp_path)
    Image.fromarray(pillow_array(folder / "train" / "ship" / "003.jpg", "RGB")[:20, :30]).save(
        folder / "train" / "ship" / "odd.png"
    )
    shutil.copyfile(cifar_dir / "test" / "cat" / "0000.jpg", folder / "test" / "cat" / "004.jpg")
    return folder


def test_mixed_sizes_are_refused_without_image_size(mixed_sizes: Path) -> None:
    with pytest.raises(HooktrainError) as info:
        load_image_folder(mixed_sizes, echo=lambda line: None)

    first = mixed_sizes / "train" / "airplane" / "000.jpg"
    assert str(info.value) == (
        f"Image {mixed_sizes / 'train' / 'ship' / 'odd.png'} is 30x20 pixels but {first}, the "
        "first image, is 48x48; resize it, or pass image_size to resize every image as it is "
        "loaded."
    )


@pytest.mark.parametrize("grayscale", [False, True])
def test_image_size_resizes_every_image_as_torchvision_does(
    mixed_sizes: Path, grayscale: bool
) -> None:
    lines: list[str] = []
    dataset = load_image_folder(
        mixed_sizes, image_size=(40, 36), grayscale=grayscale, echo=lines.append
    )

    channels = 1 if grayscale else 3
    assert dataset.train.inputs.shape == (181, 40, 36, channels)
    assert dataset.test.inputs.shape == (60, 40, 36, channels)
    assert "resized to 36x40" in lines[0]
    for split, part in (("train", dataset.train), ("test", dataset.test)):
        for i, path in enumerate(split_files(mixed_sizes, split)):
            rgb = resize(
                torchvision_rgb(path), [40, 36], InterpolationMode.BILINEAR, antialias=True
            )
            rgb = rgb.permute(1, 2, 0).numpy()
            if grayscale:  # luma after resizing, exactly as Pillow converts
                expected = np.array(Image.fromarray(rgb).convert("L"))[..., None]
                assert np.array_equal(part.inputs[i].numpy(), expected), path
                continue
            assert np.array_equal(part.inputs[i].numpy(), rgb), path
            # Pillow's bilinear filter, also antialiased, rounds its fixed-point sums its own way.
            with Image.open(path) as image:
                pillow = np.array(image.convert("RGB").resize((36, 40), Image.Resampling.BILINEAR))
            assert np.abs(part.inputs[i].numpy().astype(int) - pillow).max() <= 1, path


def test_image_size_keeps_images_already_that_size(three_classes: Path) -> None:
    resized = load_image_folder(three_classes, image_size=(48, 48), echo=lambda line: None)
    native = load_image_folder(three_classes, echo=lambda line: None)
    assert torch.equal(resized.train.inputs, native.train.inputs)


def test_cache_keys_on_size_and_channels(
    three_classes: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = [
        {},
        {"image_size": (32, 32)},
        {"grayscale": True},
        {"image_size": (32, 32), "grayscale": True},
    ]
    lines: list[str] = []
    first = [load_image_folder(three_classes, echo=lines.append, **o) for o in options]
    assert len(lines) == 4 and all(line.startswith("decoding 240 images") for line in lines)
    assert len(list(cache_dir.glob("*.pt"))) == 4

    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded again although the cache was warm")

    monkeypatch.setattr(image_folders, "_decode_files", no_decoding)
    again = [load_image_folder(three_classes, echo=lines.append, **o) for o in options]

    assert len(lines) == 4
    shapes = [(48, 48, 3), (32, 32, 3), (48, 48, 1), (32, 32, 1)]
    for before, after, shape in zip(first, again, shapes, strict=True):
        assert after.train.inputs.shape[1:] == shape
        assert_same(before, after)


def assert_same(a: Splits, b: Splits) -> None:
    assert a.classes == b.classes
    for part_a, part_b in ((a.train, b.train), (a.test, b.test)):
        assert torch.equal(part_a.inputs, part_b.inputs)
        assert torch.equal(part_a.targets, part_b.targets)


def test_cache_file_of_another_decoding_is_not_used(three_classes: Path, cache_dir: Path) -> None:
    native = load_image_folder(three_classes, echo=lambda line: None)
    load_image_folder(three_classes, image_size=(32, 32), echo=lambda line: None)
    by_size = {
        torch.load(f, weights_only=True)["train_images"].shape[1]: f for f in cache_dir.glob("*.pt")
    }
    # An intact cache file (its checksum matches) under the other decoding's name.
    shutil.copyfile(by_size[32], by_size[48])
    lines: list[str] = []

    again = load_image_folder(three_classes, echo=lines.append)

    assert (
        lines[0]
        == f"warning: the decoded cache {by_size[48]} was damaged; decoding the images again"
    )
    assert_same(native, again)


def test_cifar10_loader_shares_the_folder_code_and_keeps_its_checks(
    three_classes: Path, cifar_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(
        HooktrainError,
        match=r"has 3 class folders but CIFAR-10 has 10 \(extra: none; missing: automobile, bird, ",
    ):
        load_cifar10(three_classes)
    ten = tmp_path / "ten"
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            (ten / split / name).mkdir(parents=True)
            for image in sorted((cifar_dir / split / name).glob("*.jpg"))[:2]:
                shutil.copyfile(image, ten / split / name / image.name)
    assert_same(
        load_cifar10(ten, echo=lambda line: None), load_image_folder(ten, echo=lambda line: None)
    )


def test_one_class_is_refused(three_classes: Path, tmp_path: Path) -> None:
    folder = copy_of(three_classes, tmp_path)
    for split in ("train", "test"):
        shutil.rmtree(folder / split / "airplane")
        shutil.rmtree(folder / split / "ship")
    with pytest.raises(
        HooktrainError, match=r"has 1 class folder \(cat\) but a classifier needs at least 2"
    ):
        load_image_folder(folder)


def test_test_split_must_have_the_train_classes(three_classes: Path, tmp_path: Path) -> None:
    folder = copy_of(three_classes, tmp_path)
    shutil.rmtree(folder / "test" / "ship")
    (folder / "test" / "dog").mkdir()
    shutil.copyfile(folder / "test" / "cat" / "000.jpg", folder / "test" / "dog" / "000.jpg")
    with pytest.raises(
        HooktrainError,
        match=r"different class folders \(only in train/: ship; only in test/: dog\)",
    ):
        load_image_folder(folder)


def test_folder_layout_and_options_are_checked(three_classes: Path, tmp_path: Path) -> None:
    with pytest.raises(HooktrainError, match=r"Image folder .*nowhere does not exist"):
        load_image_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HooktrainError, match=r"empty has no train/ and test/ folders"):
        load_image_folder(tmp_path / "empty")
    folder = copy_of(three_classes, tmp_path)
    for bad in [(0, 32), (32,), "32", (32.0, 32), (True, 32), (8193, 8192)]:
        with pytest.raises(HooktrainError, match=r"image_size must be \(height, width\) in pixels"):
            load_image_folder(folder, image_size=bad)  # type: ignore[arg-type]
    with pytest.raises(HooktrainError, match="grayscale must be True or False"):
        load_image_folder(folder, grayscale="yes")  # type: ignore[arg-type]
    shutil.rmtree(folder / "test")
    with pytest.raises(HooktrainError, match="has a train/ folder but no test/ folder"):
        load_image_folder(folder)


@pytest.mark.parametrize("form", ["png", "jpg"])
@pytest.mark.parametrize("image_size", [None, (32, 32)])
def test_decompression_bomb_is_refused_from_its_header(
    three_classes: Path, tmp_path: Path, form: str, image_size: tuple[int, int] | None
) -> None:
    folder = copy_of(three_classes, tmp_path)
    # Named to be the first image: it would set the size every other image must have.
    bomb = folder / "train" / "airplane" / f"-bomb.{form}"
    side = 60_000  # 10 GB of pixels once decoded, from a file of a few hundred bytes
    bomb.write_bytes(
        png_bytes(side, side, b"\x00" * 7) if form == "png" else jpeg_claiming(side, side)
    )

    with pytest.raises(HooktrainError) as info:
        load_image_folder(folder, image_size=image_size, echo=lambda line: None)

    assert str(info.value) == (
        f"Image {bomb} is 60000x60000 pixels, more than the {MAX_IMAGE_PIXELS:,} an image may "
        "have; remove or replace it with a smaller one."
    )


def test_byte_limit_scales_with_the_image(three_classes: Path, tmp_path: Path) -> None:
    folder = copy_of(three_classes, tmp_path)
    # Noise does not compress: 6.75 MB of PNG, over the 4 MB that bounds a 32x32 image's file.
    noise = np.random.default_rng(0).integers(0, 256, (1500, 1500, 3), dtype=np.uint8)
    large = folder / "train" / "cat" / "large.png"
    Image.fromarray(noise).save(large, compress_level=1)
    assert large.stat().st_size > 6 << 20

    dataset = load_image_folder(folder, image_size=(48, 48), echo=lambda line: None)

    index = split_files(folder, "train").index(large)
    expected = resize(torch.from_numpy(noise).permute(2, 0, 1), [48, 48], antialias=True)
    assert torch.equal(dataset.train.inputs[index], expected.permute(1, 2, 0))
    padded = folder / "test" / "ship" / "001.png"  # still a valid PNG: decoders stop at its end
    with padded.open("ab") as file:
        file.write(b"\x00" * (5 << 20))
    with pytest.raises(
        HooktrainError,
        match=r"001\.png is 5,2\d\d,\d\d\d bytes, more than the 4,203,520 a 48x48 image takes",
    ):
        load_image_folder(folder, image_size=(48, 48), echo=lambda line: None)


def test_images_that_cannot_fit_in_memory_are_refused_before_decoding(tmp_path: Path) -> None:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    count = memory // (8192 * 8192 * 3) + 1
    header = png_bytes(8192, 8192, b"")  # a valid size, but no pixels to decode
    for split, name in [("train", "a"), ("train", "b"), ("test", "a"), ("test", "b")]:
        (tmp_path / "data" / split / name).mkdir(parents=True)
        (tmp_path / "data" / split / name / "0.png").write_bytes(header)
    for i in range(count - 4):
        (tmp_path / "data" / "train" / "a" / f"{i + 1}.png").write_bytes(header)

    with pytest.raises(
        HooktrainError,
        match=rf"The {count:,} images in .* GiB decoded at 8192x8192, more than the .* GiB of",
    ):
        load_image_folder(tmp_path / "data", echo=lambda line: None)


# ---------------------------------------------------------------------------------------------
# torchvision datasets by name


def fake_items(offset: int, **options: object) -> tuple[Tensor, Tensor]:
    fake = torchvision.datasets.FakeData(random_offset=offset, **options)  # type: ignore[arg-type]
    images, labels = zip(*(fake[i] for i in range(len(fake))), strict=True)
    arrays = [np.array(image).reshape(image.height, image.width, -1) for image in images]
    return torch.from_numpy(np.stack(arrays)), torch.tensor(labels)


@pytest.mark.parametrize("channels", [3, 1])
def test_fakedata_splits_are_its_items_at_disjoint_seeds(channels: int) -> None:
    options = {"size": 24, "image_size": (channels, 20, 18), "num_classes": 4}

    dataset = load_torchvision("FakeData", None, **options)

    assert dataset.classes == ("0", "1", "2", "3")
    assert dataset.train.inputs.shape == (24, 20, 18, channels)
    for part, offset in ((dataset.train, 0), (dataset.test, 24)):
        images, labels = fake_items(offset, **options)
        assert torch.equal(part.inputs, images)
        assert torch.equal(part.targets, labels)
    assert not torch.equal(dataset.train.inputs, dataset.test.inputs)


def python2_pickle(content: dict, texts: set[str]) -> bytes:
    """``content`` pickled as Python 2 wrote the official batches: protocol 2 with ``texts``
    (keys, class names) as Python 2 strings, which torchvision reads as str (encoding latin1)
    and load_cifar10 as bytes."""
    raw = pickle.dumps(content, protocol=2)
    ops = list(pickletools.genops(raw))
    out, copied = bytearray(), 0
    for (op, arg, position), (_, _, end) in itertools.pairwise(ops):
        if op.name == "BINUNICODE" and arg in texts:  # becomes SHORT_BINSTRING
            out += raw[copied:position] + b"U" + bytes([len(arg)]) + arg.encode()
            copied = end
    return bytes(out + raw[copied:])


@pytest.fixture
def official_cifar(cifar_dir: Path, tmp_path: Path) -> tuple[Path, Tensor, Tensor]:
    """cifar-10-batches-py of real images (5 per class in train, 2 in test) in the official
    Python 2 format; the root, and the test images and labels written."""
    batches = tmp_path / "root" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    keys = {"data", "labels", "label_names"}
    for names, split, count in [(TRAIN_BATCHES, "train", 5), (["test_batch"], "test", 2)]:
        images, labels = [], []
        for label, name in enumerate(CIFAR10_CLASSES):
            for path in sorted((cifar_dir / split / name).glob("*.jpg"))[:count]:
                images.append(pillow_array(path, "RGB"))
                labels.append(label)
        rows = np.stack(images).transpose(0, 3, 1, 2).reshape(len(images), -1)
        for part, name in enumerate(names):  # each batch its share, in the official dict
            chosen = slice(part, None, len(names))
            content = {"data": rows[chosen], "labels": labels[chosen]}
            (batches / name).write_bytes(python2_pickle(content, keys))
    meta = {"label_names": list(CIFAR10_CLASSES)}
    (batches / "batches.meta").write_bytes(python2_pickle(meta, keys | set(CIFAR10_CLASSES)))
    return tmp_path / "root", torch.from_numpy(np.stack(images)), torch.tensor(labels)


TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


def with_real_md5s(monkeypatch: pytest.MonkeyPatch, batches: Path) -> None:
    """torchvision's CIFAR10 checks each batch against the official archive's MD5: give it
    those of the batches written here, so that its own reader reads them."""

    def md5(name: str) -> str:
        return hashlib.md5((batches / name).read_bytes()).hexdigest()

    cifar = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cifar, "train_list", [[n, md5(n)] for n, _ in cifar.train_list])
    monkeypatch.setattr(cifar, "test_list", [[n, md5(n)] for n, _ in cifar.test_list])
    monkeypatch.setattr(cifar, "meta", {**cifar.meta, "md5": md5(cifar.meta["filename"])})


def test_cifar10_through_torchvision_equals_load_cifar10(
    official_cifar: tuple[Path, Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, test_images, test_labels = official_cifar
    with_real_md5s(monkeypatch, root / "cifar-10-batches-py")

    dataset = load_torchvision("CIFAR10", root, download=False)

    assert dataset.classes == CIFAR10_CLASSES
    assert dataset.train.inputs.shape == (50, 32, 32, 3)
    assert torch.equal(dataset.test.inputs, test_images)
    assert torch.equal(dataset.test.targets, test_labels)
    assert_same(dataset, load_cifar10(root))


def write_mnist(root: Path, images: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> None:
    """MNIST's raw idx files (big-endian dimensions, then the bytes) as torchvision reads them."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        pixels, targets = images[split], labels[split]
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x803, *pixels.shape) + pixels.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x801, len(targets)) + targets.tobytes()
        )


@pytest.fixture
def mnist_root(
    cifar_dir: Path, tmp_path: Path
) -> tuple[Path, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """MNIST-format files of real images: CIFAR-10 cats and ships, grayscale, 28x28."""
    images, labels = {}, {}
    for split, count in (("train", 30), ("test", 10)):
        arrays, names = [], []
        for label, name in ((3, "cat"), (8, "ship")):
            for path in sorted((cifar_dir / split / name).glob("*.jpg"))[:count]:
                with Image.open(path) as image:
                    arrays.append(np.array(image.convert("L").resize((28, 28))))
                names.append(label)
        images[split], labels[split] = np.stack(arrays), np.array(names, dtype=np.uint8)
    write_mnist(tmp_path / "root", images, labels)
    return tmp_path / "root", images, labels


def test_mnist_gives_one_channel_from_its_stored_arrays(mnist_root: tuple) -> None:
    root, images, labels = mnist_root

    dataset = load_torchvision("MNIST", root)

    assert dataset.classes == tuple(torchvision.datasets.MNIST.classes)
    assert dataset.train.inputs.shape == (60, 28, 28, 1)
    for split, part in (("train", dataset.train), ("test", dataset.test)):
        assert torch.equal(part.inputs[..., 0], torch.from_numpy(images[split]))
        assert part.targets.tolist() == labels[split].tolist()


def test_a_transform_the_stored_arrays_lack_is_honoured(mnist_root: tuple) -> None:
    root, images, _ = mnist_root

    def mirror(image: Image.Image) -> Image.Image:
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    dataset = load_torchvision("MNIST", root, transform=mirror)

    assert torch.equal(
        dataset.test.inputs[..., 0], torch.from_numpy(images["test"][:, :, ::-1].copy())
    )


def test_torchvision_names_and_options_are_checked(tmp_path: Path) -> None:
    assert {"CIFAR10", "MNIST", "FakeData"} <= set(dataset_names())
    assert "VisionDataset" not in dataset_names()
    cases = [
        (("FakeDta", None), {}, r"no dataset class named FakeDta \(close matches: FakeData\)"),
        (
            ("torchvision.datasets.CIFAR10", None),
            {},
            r"CIFAR10.* \(close matches: CIFAR10, .*not an import path",
        ),
        (("os.system", None), {}, r"named os.system \(close matches: none\)"),
        (("SEMEION", tmp_path), {}, r"SEMEION has no train/test split .*from_datasets"),
        (
            ("CIFAR10", tmp_path),
            {"train": True},
            "loads both splits of CIFAR10 itself; drop the train option",
        ),
        (("FakeData", tmp_path), {}, "FakeData takes no root argument; pass root=None"),
        (
            ("CIFAR10", tmp_path),
            {},
            r"Cannot load the train split of torchvision's CIFAR10 from .*\(Dataset not found or "
            r"corrupted.*\); pass download=True to fetch it",
        ),
        (
            ("FakeData", None),
            {"colour": 3},
            r"Cannot load the train split of torchvision's FakeData \(.*colour",
        ),
    ]
    for arguments, options, message in cases:
        with pytest.raises(HooktrainError, match=message):
            load_torchvision(*arguments, **options)


# ---------------------------------------------------------------------------------------------
# Tensors and Datasets in memory


def test_regression_from_float_tensors() -> None:
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    values = torch.randn(50, 2, generator=gen)

    dataset = from_tensors((features[:40], values[:40]), (features[40:], values[40:]))

    assert dataset.classes is None
    assert (
        torch.equal(dataset.train.inputs, features[:40])
        and dataset.train.inputs.dtype == torch.float64
    )
    assert torch.equal(dataset.test.targets, values[40:])
    single = from_tensors((features[:40], values[:40, 0]), (features[40:], values[40:, 0]))
    assert single.train.targets.shape == (40,)


@pytest.fixture(scope="module")
def real_images(cifar_dir: Path) -> tuple[Tensor, Tensor, list[Path]]:
    """40 real CIFAR-10 images (uint8 NHWC, Pillow-decoded), labels 0-3, and their files."""
    paths = [
        p
        for name in CIFAR10_CLASSES[:4]
        for p in sorted((cifar_dir / "test" / name).glob("*.jpg"))[:10]
    ]
    images = torch.from_numpy(np.stack([pillow_array(p, "RGB") for p in paths]))
    return images, torch.arange(4).repeat_interleave(10), paths


def test_images_from_tensors_with_and_without_names(real_images: tuple) -> None:
    images, labels, _ = real_images

    named = from_tensors(
        (images[:30], labels[:30]), (images[30:], labels[30:]), ["a", "b", "c", "d"]
    )
    numbered = from_tensors((images, labels.int()), (images[:5], labels[:5].int()))

    assert named.classes == ("a", "b", "c", "d") and numbered.classes == ("0", "1", "2", "3")
    assert torch.equal(named.train.inputs, images[:30]) and torch.equal(
        named.test.targets, labels[30:]
    )
    assert numbered.train.targets.dtype == torch.int64 and torch.equal(
        numbered.train.targets, labels
    )


def test_from_tensors_refuses_what_training_cannot_use(real_images: tuple) -> None:
    images, labels, _ = real_images
    floats = torch.zeros(4, 3)
    nan = floats.clone()
    nan[2, 1] = float("nan")
    cases = [
        (
            (images[:4], labels[:3]),
            (images, labels),
            None,
            "train split has 4 inputs but targets of shape \\(3,\\)",
        ),
        (
            (floats, floats[:, 0]),
            (floats, floats[:, 0]),
            ["x", "y"],
            "classes name class labels, but the targets are float32",
        ),
        (
            (images[:20], labels[:20]),
            (images, labels),
            ["a", "b"],
            "test targets hold label 3, but only 2 classes are named",
        ),
        (
            (images, labels - 1),
            (images, labels),
            None,
            "train targets hold label -1; class labels count from 0",
        ),
        (
            (nan, floats[:, 0]),
            (floats, floats[:, 0]),
            None,
            r"train inputs hold NaN or infinite values \(first in row 2\)",
        ),
        (
            (images.long(), labels),
            (images, labels),
            None,
            "train inputs are int64; pass uint8 images",
        ),
        (
            (images.permute(0, 3, 1, 2), labels),
            (images, labels),
            None,
            r"uint8 of shape \(40, 3, 32, 32\), but images must be",
        ),
        (
            (images, labels),
            (images[:, :16], labels),
            None,
            "train inputs are 32x32 RGB pixels per sample but the test inputs are 32x16 RGB",
        ),
        (
            (images.numpy(), labels),
            (images, labels),
            None,
            "train inputs are a uint8 array of shape .* not a torch.Tensor",
        ),
        (
            (images, labels * 0),
            (images, labels * 0),
            None,
            r"at least 2 classes, but there is 1 \(0\)",
        ),
        ((images, labels), (images, labels), "abcd", "classes must be a list of class names"),
    ]
    for train, test, classes, message in cases:
        with pytest.raises(HooktrainError, match=message):
            from_tensors(train, test, classes)


class Items(Dataset):
    """A user's own map-style Dataset: whatever items it is given."""

    def __init__(self, items: list[object]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> object:
        return self.items[index]


def test_datasets_of_pil_images_tensors_and_arrays_give_the_same_splits(real_images: tuple) -> None:
    images, labels, paths = real_images
    pil = Items([(Image.open(p), int(y)) for p, y in zip(paths, labels, strict=True)])
    chw = Items(
        [(torchvision_rgb(p), torch.tensor(int(y))) for p, y in zip(paths, labels, strict=True)]
    )
    hwc = Items([(image.numpy(), np.int64(y)) for image, y in zip(images, labels, strict=True)])
    expected = from_tensors((images, labels), (images, labels))

    for items in (pil, chw, hwc):
        assert_same(from_datasets(items, items), expected)
    gray = Items([(Image.open(p).convert("L"), int(y)) for p, y in zip(paths, labels, strict=True)])
    luma = torch.from_numpy(np.stack([pillow_array(p, "L") for p in paths]))[..., None]
    assert torch.equal(from_datasets(gray, gray).train.inputs, luma)


def test_regression_dataset_of_float_items() -> None:
    gen = torch.Generator().manual_seed(1)
    features, values = torch.randn(30, 5, generator=gen), torch.randn(30, generator=gen)
    items = Items([(features[i], float(values[i])) for i in range(30)])

    dataset = from_datasets(items, Items(items.items[:10]))

    assert dataset.classes is None
    assert torch.equal(dataset.train.inputs, features) and torch.equal(
        dataset.train.targets, values
    )


def test_items_of_the_wrong_kind_are_named_by_index(real_images: tuple) -> None:
    images, _, _ = real_images
    good = [(images[i].numpy(), 1 + i % 2) for i in range(4)]
    normalized = images[3].permute(2, 0, 1).float() / 255
    cases = [
        (
            [*good[:3], (normalized, 0)],
            r"Item 3 of the train dataset has a float32 tensor of shape \(3, 32, 32\) as its "
            "input, but images must be uint8; drop ToTensor",
        ),
        (
            [*good[:2], images[2].numpy()],
            r"Item 2 of the train dataset is a uint8 array of shape \(32, 32, 3\), not an \(input, "
            r"target\) pair",
        ),
        (
            [*good[:1], (images[1, :20, :30].numpy(), 0)],
            r"Item 1 of the train dataset has 30x20 RGB pixels as its input but item 0 has 32x32 "
            "RGB pixels",
        ),
        (
            [*good[:2], (images[2].numpy(), "cat")],
            r"Item 2 of the train dataset has a str as its target; use an int",
        ),
        (
            [*good[:2], (images[2].numpy(), 0.5)],
            r"Item 2 of the train dataset has 1 float32 value as its target but item 0 has a class "
            "label",
        ),
        (
            [*good[:1], ("x.jpg", 0)],
            r"Item 1 of the train dataset has a str as its input; use a PIL image",
        ),
    ]
    for items, message in cases:
        with pytest.raises(HooktrainError, match=message):
            from_datasets(Items(items), Items(good))

    class Stream(IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(good)

    with pytest.raises(HooktrainError, match="test dataset is a Stream, not a map-style Dataset"):
        from_datasets(Items(good), Stream())
