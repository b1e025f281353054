"""Tests for hooktrain.engine.data: loaders, decode cache, batched augmentation, DeviceData."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from torchvision.io import write_jpeg, write_png

from hooktrain.engine import data as data_module
from hooktrain.engine.data import (
    CIFAR10_CLASSES,
    DeviceData,
    ImageDataset,
    ImageSplit,
    crop_flip,
    default_cache_dir,
    default_data_dir,
    load_cifar10,
    normalize,
)
from hooktrain.errors import HooktrainError

# The tests write and decode images with torchvision.io, deprecated (but working) since 0.29.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every default location into tmp_path so no test touches ~/.cache."""
    monkeypatch.setenv("HOOKTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HOOKTRAIN_DATA_DIR", str(tmp_path / "default-data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "cache"


# ---------------------------------------------------------------------------------------------
# Builders


def write_batches(folder: Path, per_batch: int = 20, protocol: int = 2, seed: int = 0) -> dict:
    """Write a tiny cifar-10-batches-py with the official dict layout; return what was written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        rows = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        content = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": rows,
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(content, protocol=protocol))
        written[name] = (rows, labels)
    meta = {
        b"num_cases_per_batch": per_batch,
        b"label_names": [c.encode() for c in CIFAR10_CLASSES],
        b"num_vis": 3072,
    }
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return written


def write_tree(
    root: Path,
    classes: list[str],
    per_class: int = 2,
    ext: str = "png",
    size: tuple[int, int] = (32, 32),
    seed: int = 0,
) -> dict[str, dict[str, list[torch.Tensor]]]:
    """Write train/ and test/ class folders of random images; return the CHW tensors written."""
    gen = torch.Generator().manual_seed(seed)
    written: dict[str, dict[str, list[torch.Tensor]]] = {}
    for split in ("train", "test"):
        written[split] = {}
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            images = []
            for i in range(per_class):
                if ext == "png":
                    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=gen)
                    write_png(image, str(folder / f"{i:04d}.png"))
                else:
                    # 8x8 flat blocks survive JPEG almost unchanged, unlike pixel noise.
                    shape = (3, size[0] // 8, size[1] // 8)
                    blocks = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
                    image = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)
                    write_jpeg(image, str(folder / f"{i:04d}.jpg"), quality=95)
                images.append(image)
            written[split][name] = images
    return written


def synthetic_dataset(n_train: int = 50, n_test: int = 23, seed: int = 0) -> ImageDataset:
    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> ImageSplit:
        images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=gen)
        return ImageSplit(images, torch.randint(0, 10, (n,), generator=gen))

    return ImageDataset(split(n_train), split(n_test), CIFAR10_CLASSES)


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# ---------------------------------------------------------------------------------------------
# Augmentation


def reference_crop_flip(
    images: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    flip: torch.Tensor,
    pad: int,
    mode: str,
) -> torch.Tensor:
    out = []
    height, width = images.shape[1:3]
    for i, image in enumerate(images.permute(0, 3, 1, 2)):
        if mode == "reflect":
            padded = TF.pad(image, [pad] * 4, padding_mode="reflect")
        else:
            padded = TF.pad(image, [pad] * 4, fill=0, padding_mode="constant")
        cropped = TF.crop(padded, int(top[i]), int(left[i]), height, width)
        if flip[i]:
            cropped = TF.horizontal_flip(cropped)
        out.append(cropped.permute(1, 2, 0))
    return torch.stack(out)


@pytest.mark.parametrize("pad_mode", ["reflect", "zeros"])
@pytest.mark.parametrize(
    ("pad", "size"), [(0, (32, 32)), (1, (32, 32)), (4, (32, 32)), (7, (20, 28))]
)
def test_crop_flip_matches_torchvision(pad_mode: str, pad: int, size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(pad)
    batch = 64
    images = torch.randint(0, 256, (batch, *size, 3), dtype=torch.uint8, generator=gen)
    top = torch.randint(0, 2 * pad + 1, (batch,), generator=gen)
    left = torch.randint(0, 2 * pad + 1, (batch,), generator=gen)
    flip = torch.rand(batch, generator=gen) < 0.5
    # Make sure the extreme offsets are exercised, where the padding is actually visible.
    top[:4] = torch.tensor([0, 2 * pad, 0, 2 * pad])
    left[:4] = torch.tensor([0, 2 * pad, 2 * pad, 0])

    got = crop_flip(images, top, left, flip, pad, pad_mode)

    assert got.dtype == torch.uint8
    assert got.shape == images.shape
    assert torch.equal(got, reference_crop_flip(images, top, left, flip, pad, pad_mode))


def test_crop_flip_zeros_really_pads_with_zeros() -> None:
    images = torch.full((1, 32, 32, 3), 200, dtype=torch.uint8)
    out = crop_flip(images, torch.tensor([0]), torch.tensor([8]), torch.tensor([False]), 4, "zeros")
    assert out[0, :4].eq(0).all() and out[0, 4:, :28].eq(200).all() and out[0, :, 28:].eq(0).all()


def test_crop_flip_rejects_unknown_pad_mode() -> None:
    images = torch.zeros((2, 32, 32, 3), dtype=torch.uint8)
    offsets = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(HooktrainError, match="Unknown pad mode 'edge'"):
        crop_flip(images, offsets, offsets, torch.zeros(2, dtype=torch.bool), 4, "edge")


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_matches_torchvision(channels_last: bool) -> None:
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    got = normalize(images, torch.tensor(MEAN), torch.tensor(STD), channels_last)

    chw = images.permute(0, 3, 1, 2).contiguous()
    expected = TF.normalize(TF.to_dtype(chw, torch.float32, scale=True), list(MEAN), list(STD))
    assert got.dtype == torch.float32
    assert got.shape == (8, 3, 32, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    if channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert not got.is_contiguous()
    else:
        assert got.is_contiguous()


# ---------------------------------------------------------------------------------------------
# Official python format


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("point_at_batches_dir", [False, True])
def test_official_format_round_trips(tmp_path: Path, protocol: int, point_at_batches_dir: bool):
    batches = tmp_path / "data" / "cifar-10-batches-py"
    written = write_batches(batches, protocol=protocol)

    dataset = load_cifar10(batches if point_at_batches_dir else tmp_path / "data")

    assert dataset.classes == CIFAR10_CLASSES
    assert dataset.train.images.shape == (100, 32, 32, 3)
    assert dataset.test.images.shape == (20, 32, 32, 3)
    assert dataset.train.images.is_contiguous()
    assert dataset.train.labels.dtype == torch.int64
    rows = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = [label for i in range(1, 6) for label in written[f"data_batch_{i}"][1]]
    for i in (0, 19, 20, 57, 99):
        expected = torch.from_numpy(rows[i]).reshape(3, 32, 32).permute(1, 2, 0)
        assert torch.equal(dataset.train.images[i], expected)
    assert dataset.train.labels.tolist() == labels
    test_rows, test_labels = written["test_batch"]
    expected_test = torch.from_numpy(test_rows).reshape(-1, 3, 32, 32).permute(0, 2, 3, 1)
    assert torch.equal(dataset.test.images, expected_test)
    assert dataset.test.labels.tolist() == test_labels


class OpenExploit:
    """Unpickling this with a plain Unpickler creates `target`."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.target), "w"))


class SystemExploit(OpenExploit):
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("exploit", [OpenExploit, SystemExploit])
@pytest.mark.parametrize("victim", ["batches.meta", "data_batch_3", "test_batch"])
def test_official_format_refuses_code_in_pickles(tmp_path: Path, exploit: type, victim: str):
    batches = tmp_path / "cifar-10-batches-py"
    write_batches(batches)
    target = tmp_path / "pwned"
    payload = {b"data": exploit(target), b"labels": [], b"label_names": exploit(target)}
    (batches / victim).write_bytes(pickle.dumps(payload, protocol=2))

    with pytest.raises(HooktrainError, match="is not a CIFAR-10 batch file") as info:
        load_cifar10(tmp_path)

    assert victim in str(info.value)
    assert not target.exists()


def test_exploit_is_real_under_a_plain_unpickler(tmp_path: Path) -> None:
    # Guards the test above: the payload must do harm when nothing stops it.
    target = tmp_path / "created"
    pickle.loads(pickle.dumps(OpenExploit(target), protocol=2)).close()
    assert target.exists()


def test_official_format_missing_batch_is_named(tmp_path: Path) -> None:
    batches = tmp_path / "cifar-10-batches-py"
    write_batches(batches)
    (batches / "data_batch_4").unlink()
    with pytest.raises(HooktrainError, match=r"data_batch_4 is missing"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\x00not a pickle at all", "malformed"),
        (pickle.dumps([1, 2, 3], protocol=2), "not a dict"),
        (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), "100 values"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "1 labels"),
        (pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}), "outside"),
        (pickle.dumps({b"data": np.zeros((1, 3072), np.float32), b"labels": [0]}), "uint8"),
    ],
)
def test_official_format_malformed_batch_is_named(tmp_path: Path, content: bytes, reason: str):
    batches = tmp_path / "cifar-10-batches-py"
    write_batches(batches)
    (batches / "data_batch_2").write_bytes(content)
    with pytest.raises(HooktrainError, match=reason) as info:
        load_cifar10(tmp_path)
    assert "data_batch_2" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Image folders


def test_image_folder_png_is_exact_and_labels_follow_sorted_names(tmp_path: Path) -> None:
    # Created out of order on purpose: labels must come from the sorted names.
    classes = list(reversed(CIFAR10_CLASSES))
    written = write_tree(tmp_path / "data", classes, per_class=2)

    dataset = load_cifar10(tmp_path / "data")

    assert dataset.classes == CIFAR10_CLASSES
    assert dataset.train.images.shape == (20, 32, 32, 3)
    assert dataset.test.images.shape == (20, 32, 32, 3)
    assert dataset.train.labels.tolist() == [label for label in range(10) for _ in range(2)]
    for split_name, split in (("train", dataset.train), ("test", dataset.test)):
        for label, name in enumerate(CIFAR10_CLASSES):
            for i, image in enumerate(written[split_name][name]):
                assert torch.equal(split.images[2 * label + i], image.permute(1, 2, 0))


def test_image_folder_jpeg_decodes_like_torchvision(tmp_path: Path) -> None:
    written = write_tree(tmp_path / "data", list(CIFAR10_CLASSES), per_class=2, ext="jpg")

    dataset = load_cifar10(tmp_path / "data")

    path = tmp_path / "data" / "test" / "cat" / "0001.jpg"
    expected = torchvision.io.decode_image(str(path), mode=torchvision.io.ImageReadMode.RGB)
    assert torch.equal(dataset.test.images[3 * 2 + 1], expected.permute(1, 2, 0))
    # Lossy, but the decoded pixels must still be the ones written.
    original = written["test"]["cat"][1].permute(1, 2, 0).float()
    assert (dataset.test.images[7].float() - original).abs().mean() < 8


def test_missing_folder_is_reported(tmp_path: Path) -> None:
    with pytest.raises(HooktrainError, match="does not exist; pass --data-dir"):
        load_cifar10(tmp_path / "nowhere")


def test_wrong_layout_names_both_layouts(tmp_path: Path) -> None:
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "README").write_text("hello")
    with pytest.raises(HooktrainError) as info:
        load_cifar10(tmp_path / "data")
    message = str(info.value)
    assert str(tmp_path / "data") in message
    assert "cifar-10-batches-py/" in message and "train/ and test/" in message
    assert "--data-dir" in message


def test_train_without_test_is_reported(tmp_path: Path) -> None:
    write_tree(tmp_path / "data", list(CIFAR10_CLASSES), per_class=1)
    shutil.rmtree(tmp_path / "data" / "test")
    with pytest.raises(HooktrainError, match="has a train/ folder but no test/ folder"):
        load_cifar10(tmp_path / "data")


def test_extra_class_in_train_only_is_reported(tmp_path: Path) -> None:
    write_tree(tmp_path / "data", list(CIFAR10_CLASSES), per_class=1)
    extra = tmp_path / "data" / "train" / "zebra"
    extra.mkdir()
    write_png(torch.zeros((3, 32, 32), dtype=torch.uint8), str(extra / "0.png"))
    with pytest.raises(HooktrainError, match=r"only in train/: zebra; only in test/: none"):
        load_cifar10(tmp_path / "data")


def test_eleven_classes_are_reported(tmp_path: Path) -> None:
    write_tree(tmp_path / "data", [*CIFAR10_CLASSES, "zebra"], per_class=1)
    with pytest.raises(HooktrainError, match=r"11 class folders .*extra: zebra; missing: none"):
        load_cifar10(tmp_path / "data")


def test_nine_classes_name_the_missing_one(tmp_path: Path) -> None:
    write_tree(tmp_path / "data", list(CIFAR10_CLASSES[:-1]), per_class=1)
    with pytest.raises(HooktrainError, match=r"9 class folders .*missing: truck"):
        load_cifar10(tmp_path / "data")


def test_empty_class_folder_is_reported(tmp_path: Path) -> None:
    write_tree(tmp_path / "data", list(CIFAR10_CLASSES), per_class=1)
    (tmp_path / "data" / "test" / "dog" / "0000.png").unlink()
    with pytest.raises(HooktrainError, match=r"test/dog has no images"):
        load_cifar10(tmp_path / "data")


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_corrupt_image_is_named(tmp_path: Path, ext: str) -> None:
    write_tree(tmp_path / "data", list(CIFAR10_CLASSES), per_class=2, ext=ext)
    bad = tmp_path / "data" / "train" / "frog" / "0001.jpg"
    bad.write_bytes(b"this is not an image" * 10)
    with pytest.raises(HooktrainError, match="Cannot decode image") as info:
        load_cifar10(tmp_path / "data")
    assert str(bad) in str(info.value)
    assert "remove or replace it" in str(info.value)


def test_wrong_image_size_is_named(tmp_path: Path) -> None:
    write_tree(tmp_path / "data", list(CIFAR10_CLASSES), per_class=1)
    odd = tmp_path / "data" / "test" / "ship" / "0007.png"
    write_png(torch.zeros((3, 28, 30), dtype=torch.uint8), str(odd))
    with pytest.raises(HooktrainError, match=r"is 30x28 pixels but CIFAR-10 images are 32x32") as i:
        load_cifar10(tmp_path / "data")
    assert str(odd) in str(i.value)


# ---------------------------------------------------------------------------------------------
# Decoded-image cache


def assert_same_dataset(a: ImageDataset, b: ImageDataset) -> None:
    assert a.classes == b.classes
    for split_a, split_b in ((a.train, b.train), (a.test, b.test)):
        assert torch.equal(split_a.images, split_b.images)
        assert torch.equal(split_a.labels, split_b.labels)


def test_second_load_comes_from_cache_and_data_dir_is_untouched(
    tmp_path: Path, isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    write_tree(data_dir, list(CIFAR10_CLASSES), per_class=2)
    before = files_under(data_dir)

    first = load_cifar10(data_dir)
    cache_files = list((isolated_dirs / "decoded").glob("*.pt"))
    assert len(cache_files) == 1
    assert not list((isolated_dirs / "decoded").glob(".*"))  # no temp file left behind

    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded again although the cache was warm")

    monkeypatch.setattr(data_module, "_decode_files", no_decoding)
    second = load_cifar10(data_dir)

    assert_same_dataset(first, second)
    assert files_under(data_dir) == before


def test_changed_file_invalidates_cache(tmp_path: Path, isolated_dirs: Path) -> None:
    data_dir = tmp_path / "data"
    write_tree(data_dir, list(CIFAR10_CLASSES), per_class=1)
    load_cifar10(data_dir)
    changed = data_dir / "train" / "bird" / "0000.png"
    new_image = torch.full((3, 32, 32), 7, dtype=torch.uint8)
    write_png(new_image, str(changed))
    os.utime(changed, ns=(1, 1))  # a distinct mtime even on coarse-clock filesystems

    dataset = load_cifar10(data_dir)

    assert torch.equal(dataset.train.images[2], new_image.permute(1, 2, 0))
    assert len(list((isolated_dirs / "decoded").glob("*.pt"))) == 2


@pytest.mark.parametrize("garbage", [b"", b"definitely not a torch file", b"PK\x03\x04broken"])
def test_corrupt_cache_is_rebuilt(tmp_path: Path, isolated_dirs: Path, garbage: bytes) -> None:
    data_dir = tmp_path / "data"
    write_tree(data_dir, list(CIFAR10_CLASSES), per_class=1)
    first = load_cifar10(data_dir)
    (cache_file,) = (isolated_dirs / "decoded").glob("*.pt")
    cache_file.write_bytes(garbage)

    second = load_cifar10(data_dir)

    assert_same_dataset(first, second)
    assert cache_file.stat().st_size > 10_000
    restored = torch.load(cache_file, weights_only=True)
    assert torch.equal(restored["train_images"], first.train.images)


def test_cache_with_wrong_contents_is_rebuilt(tmp_path: Path, isolated_dirs: Path) -> None:
    data_dir = tmp_path / "data"
    write_tree(data_dir, list(CIFAR10_CLASSES), per_class=1)
    first = load_cifar10(data_dir)
    (cache_file,) = (isolated_dirs / "decoded").glob("*.pt")
    torch.save({"train_images": torch.zeros(3)}, cache_file)

    assert_same_dataset(first, load_cifar10(data_dir))


def test_unwritable_cache_dir_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A regular file where the cache folder should be: mkdir fails even when running as root.
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    monkeypatch.setenv("HOOKTRAIN_CACHE_DIR", str(blocker / "cache"))
    data_dir = tmp_path / "data"
    write_tree(data_dir, list(CIFAR10_CLASSES), per_class=1)

    dataset = load_cifar10(data_dir)

    assert dataset.train.images.shape == (10, 32, 32, 3)
    assert blocker.is_file()


# ---------------------------------------------------------------------------------------------
# Default locations and download


def test_default_dirs_follow_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_data_dir() == tmp_path / "default-data"
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("HOOKTRAIN_DATA_DIR")
    monkeypatch.delenv("HOOKTRAIN_CACHE_DIR")
    assert default_data_dir() == tmp_path / "xdg" / "hooktrain" / "cifar10"
    assert default_cache_dir() == tmp_path / "xdg" / "hooktrain"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".cache" / "hooktrain" / "cifar10"


def test_default_dir_with_data_does_not_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_batches(tmp_path / "default-data" / "cifar-10-batches-py")

    def no_download(**kwargs: object) -> None:
        raise AssertionError("downloaded although the data was there")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_download)
    assert len(load_cifar10(None).train) == 100


def test_failed_download_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(**kwargs: object) -> None:
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(HooktrainError) as info:
        load_cifar10(None)
    message = str(info.value)
    assert f"not found in {tmp_path / 'default-data'} and could not be downloaded" in message
    assert "Temporary failure in name resolution" in message
    assert "--data-dir" in message


def test_successful_download_is_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_download(root: str, train: bool, download: bool) -> None:
        calls.append((root, train, download))
        write_batches(Path(root) / "cifar-10-batches-py", per_batch=3)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_download)
    dataset = load_cifar10(None)
    assert calls == [(str(tmp_path / "default-data"), True, True)]
    assert len(dataset.train) == 15 and len(dataset.test) == 3


# ---------------------------------------------------------------------------------------------
# DeviceData


def make_device_data(**kwargs: Any) -> DeviceData:
    options: dict[str, Any] = {"batch_size": 8, "mean": MEAN, "std": STD}
    options.update(kwargs)
    dataset = options.pop("dataset", None) or synthetic_dataset()
    return DeviceData(dataset, torch.device("cpu"), **options)


@pytest.mark.parametrize("channels_last", [False, True])
def test_train_batch_shapes_and_dtypes(channels_last: bool) -> None:
    data = make_device_data(channels_last=channels_last)
    plan = data.epoch_plan(torch.Generator().manual_seed(1))
    x, y = data.train_batch(plan, 0)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (8,) and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert data.num_classes == 10 and data.n_train == 50 and data.n_test == 23
    assert plan.order.shape == (50,) and plan.flip.dtype == torch.bool


def test_steps_per_epoch_drops_partial_batch() -> None:
    data = make_device_data(batch_size=8)  # 50 images
    assert data.steps_per_epoch == 6
    plan = data.epoch_plan(torch.Generator().manual_seed(0))
    data.train_batch(plan, 5)
    with pytest.raises(IndexError):
        data.train_batch(plan, 6)


def test_epoch_is_a_permutation_with_matching_labels() -> None:
    dataset = synthetic_dataset()
    data = make_device_data(dataset=dataset, pad=0, flip=False, batch_size=10)
    plan = data.epoch_plan(torch.Generator().manual_seed(3))
    seen = []
    for step in range(data.steps_per_epoch):
        x, y = data.train_batch(plan, step)
        order = plan.order[step * 10 : (step + 1) * 10]
        pixels = (data.denormalize(x) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        assert torch.equal(pixels, dataset.train.images[order])
        assert torch.equal(y, dataset.train.labels[order])
        seen.extend(order.tolist())
    assert sorted(seen) == list(range(50))


def test_train_batch_applies_the_planned_augmentation() -> None:
    dataset = synthetic_dataset()
    data = make_device_data(dataset=dataset, pad=4, pad_mode="zeros")
    plan = data.epoch_plan(torch.Generator().manual_seed(5))
    x, _ = data.train_batch(plan, 2)
    batch = slice(16, 24)
    expected = crop_flip(
        dataset.train.images[plan.order[batch]],
        plan.top[batch],
        plan.left[batch],
        plan.flip[batch],
        4,
        "zeros",
    )
    assert torch.equal(x, normalize(expected, torch.tensor(MEAN), torch.tensor(STD), False))
    assert plan.flip.any() and not plan.flip.all()
    assert int(plan.top.min()) >= 0 and int(plan.top.max()) <= 8


def test_same_generator_seed_gives_identical_batches() -> None:
    data = make_device_data()
    plans = [data.epoch_plan(torch.Generator().manual_seed(42)) for _ in range(2)]
    for step in range(data.steps_per_epoch):
        (xa, ya), (xb, yb) = (data.train_batch(plan, step) for plan in plans)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = data.epoch_plan(torch.Generator().manual_seed(43))
    assert not torch.equal(other.order, plans[0].order)


def test_flip_disabled_never_flips() -> None:
    data = make_device_data(flip=False)
    assert not data.epoch_plan(torch.Generator().manual_seed(0)).flip.any()


def test_train_limit_subset_is_fixed_and_independent_of_generator() -> None:
    dataset = synthetic_dataset(n_train=50)
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(0))[:20]
    torch.manual_seed(123)  # the global RNG must not matter either
    data_a = make_device_data(dataset=dataset, train_limit=20)
    torch.manual_seed(456)
    data_b = make_device_data(dataset=dataset, train_limit=20)
    assert data_a.n_train == 20 and data_a.steps_per_epoch == 2
    assert torch.equal(data_a.train_images, dataset.train.images[expected])
    assert torch.equal(data_a.train_labels, dataset.train.labels[expected])
    assert torch.equal(data_b.train_images, data_a.train_images)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_limit": 4}, "Train limit 4"),
        ({"train_limit": 51}, "Train limit 51"),
        ({"batch_size": 0}, "Batch size must be at least 1"),
        ({"batch_size": 51}, "larger than the 50 training images"),
        ({"pad_mode": "wrap"}, "Unknown pad mode"),
        ({"pad": 32}, "Reflect padding of 32"),
    ],
)
def test_device_data_rejects_bad_settings(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(HooktrainError, match=match):
        make_device_data(**kwargs)


@pytest.mark.parametrize("eval_batch_size", [5, 23, 1000])
def test_test_batches_cover_every_image_once(eval_batch_size: int) -> None:
    dataset = synthetic_dataset(n_test=23)
    data = make_device_data(dataset=dataset, eval_batch_size=eval_batch_size)
    batches = list(data.test_batches())
    assert [len(y) for _, y in batches][:-1] == [eval_batch_size] * (len(batches) - 1)
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert torch.equal(ys, dataset.test.labels)
    pixels = (data.denormalize(xs) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(pixels, dataset.test.images)


def test_denormalize_is_clamped_to_unit_range() -> None:
    data = make_device_data()
    out = data.denormalize(torch.tensor([-10.0, 0.0, 10.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2))
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
