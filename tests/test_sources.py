"""Tests for reading CIFAR-10 from disk (hooktrain.data.sources, image_folders, cache).

Hostile files are real: FIFOs, links to /dev/zero, crafted pickles and PNGs, bit flips
in a real cache file; loads that could hang or fill memory run in a forked child.
"""

from __future__ import annotations

import io
import os
import pickle
import resource
import select
import shutil
import signal
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.io import write_jpeg, write_png

from hooktrain.data import image_folders
from hooktrain.data.cache import default_cache_dir
from hooktrain.data.device import CIFAR10_CLASSES, Splits
from hooktrain.data.sources import default_data_dir, load_cifar10
from hooktrain.errors import HooktrainError

# The tests write and decode images with torchvision.io, deprecated (but working) since 0.29.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)


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


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# ---------------------------------------------------------------------------------------------
# Official python format


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("point_at_batches_dir", [False, True])
def test_official_format_round_trips(tmp_path: Path, protocol: int, point_at_batches_dir: bool):
    batches = tmp_path / "data" / "cifar-10-batches-py"
    written = write_batches(batches, protocol=protocol)

    dataset = load_cifar10(batches if point_at_batches_dir else tmp_path / "data")

    assert dataset.classes == CIFAR10_CLASSES
    assert dataset.train.inputs.shape == (100, 32, 32, 3)
    assert dataset.test.inputs.shape == (20, 32, 32, 3)
    assert dataset.train.inputs.is_contiguous()
    assert dataset.train.targets.dtype == torch.int64
    rows = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = [label for i in range(1, 6) for label in written[f"data_batch_{i}"][1]]
    for i in (0, 19, 20, 57, 99):
        expected = torch.from_numpy(rows[i]).reshape(3, 32, 32).permute(1, 2, 0)
        assert torch.equal(dataset.train.inputs[i], expected)
    assert dataset.train.targets.tolist() == labels
    test_rows, test_labels = written["test_batch"]
    expected_test = torch.from_numpy(test_rows).reshape(-1, 3, 32, 32).permute(0, 2, 3, 1)
    assert torch.equal(dataset.test.inputs, expected_test)
    assert dataset.test.targets.tolist() == test_labels


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
    assert dataset.train.inputs.shape == (20, 32, 32, 3)
    assert dataset.test.inputs.shape == (20, 32, 32, 3)
    assert dataset.train.targets.tolist() == [label for label in range(10) for _ in range(2)]
    for split_name, split in (("train", dataset.train), ("test", dataset.test)):
        for label, name in enumerate(CIFAR10_CLASSES):
            for i, image in enumerate(written[split_name][name]):
                assert torch.equal(split.inputs[2 * label + i], image.permute(1, 2, 0))


def test_image_folder_jpeg_decodes_like_torchvision(tmp_path: Path) -> None:
    written = write_tree(tmp_path / "data", list(CIFAR10_CLASSES), per_class=2, ext="jpg")

    dataset = load_cifar10(tmp_path / "data")

    path = tmp_path / "data" / "test" / "cat" / "0001.jpg"
    expected = torchvision.io.decode_image(str(path), mode=torchvision.io.ImageReadMode.RGB)
    assert torch.equal(dataset.test.inputs[3 * 2 + 1], expected.permute(1, 2, 0))
    # Lossy, but the decoded pixels must still be the ones written.
    original = written["test"]["cat"][1].permute(1, 2, 0).float()
    assert (dataset.test.inputs[7].float() - original).abs().mean() < 8


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


def assert_same_dataset(a: Splits, b: Splits) -> None:
    assert a.classes == b.classes
    for split_a, split_b in ((a.train, b.train), (a.test, b.test)):
        assert torch.equal(split_a.inputs, split_b.inputs)
        assert torch.equal(split_a.targets, split_b.targets)


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

    monkeypatch.setattr(image_folders, "_decode_files", no_decoding)
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

    assert torch.equal(dataset.train.inputs[2], new_image.permute(1, 2, 0))
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
    assert torch.equal(restored["train_images"], first.train.inputs)


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

    lines: list[str] = []
    dataset = load_cifar10(data_dir, echo=lines.append)

    assert dataset.train.inputs.shape == (10, 32, 32, 3)
    assert blocker.is_file()
    assert lines[-1].startswith(f"warning: cannot cache the decoded images in {blocker}/cache/")
    assert lines[-1].endswith("; the next run decodes them again")


def test_first_decode_says_what_and_where_it_is_cached(tmp_path: Path, isolated_dirs: Path):
    data_dir = tmp_path / "data"
    write_tree(data_dir, list(CIFAR10_CLASSES), per_class=2)
    lines: list[str] = []

    load_cifar10(data_dir, echo=lines.append)
    load_cifar10(data_dir, echo=lines.append)

    assert lines == [
        f"decoding 40 images from {data_dir} (once; cached in {isolated_dirs}/decoded)"
    ]


def flip_bit_in_cached_labels(cache_file: Path, labels: torch.Tensor) -> None:
    """Flip one bit of the first label stored in the cache archive, in place on disk."""
    with zipfile.ZipFile(cache_file) as archive:
        entry = next(e for e in archive.infolist() if archive.read(e) == labels.numpy().tobytes())
    content = bytearray(cache_file.read_bytes())
    # torch.save stores entries uncompressed: after the 30-byte local header, name and extra.
    name_length, extra_length = struct.unpack_from("<HH", content, entry.header_offset + 26)
    first_label = entry.header_offset + 30 + name_length + extra_length
    content[first_label + 1] ^= 1  # label 0 becomes 256: past the classes, as in the bug
    cache_file.write_bytes(content)


def test_flipped_bit_in_cached_labels_is_detected_and_decoded_again(
    tmp_path: Path, isolated_dirs: Path
) -> None:
    data_dir = tmp_path / "data"
    write_tree(data_dir, list(CIFAR10_CLASSES), per_class=2)
    first = load_cifar10(data_dir)
    (cache_file,) = (isolated_dirs / "decoded").glob("*.pt")
    flip_bit_in_cached_labels(cache_file, first.train.targets)
    lines: list[str] = []

    second = load_cifar10(data_dir, echo=lines.append)

    assert_same_dataset(first, second)
    assert lines[0] == (
        f"warning: the decoded cache {cache_file} was damaged; decoding the images again"
    )
    assert lines[1].startswith("decoding 40 images")
    assert_same_dataset(first, load_cifar10(data_dir, echo=lines.append))  # rewritten intact
    assert len(lines) == 2


# ---------------------------------------------------------------------------------------------
# Files that are not what their names say


def load_in_child(data_dir: Path) -> tuple[int, str]:
    """load_cifar10 in a forked child with a time limit and 2 GiB more address space: its exit
    status (2 for a HooktrainError, negative for a signal) and its message.

    A load that would hang or fill memory then fails the test instead of stalling the suite.
    """
    with open("/proc/self/status") as status:
        used_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = used_kb * 1024 + (2 << 30)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        code, text = 0, ""
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            load_cifar10(data_dir, echo=lambda line: None)
        except HooktrainError as error:
            code, text = 2, str(error)
        except BaseException as error:
            code, text = 1, f"{type(error).__name__}: {error}"
        os.write(write_end, text.encode(errors="backslashreplace"))
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        ready, _, _ = select.select([pipe], [], [], 60)
        if not ready:
            os.kill(child, signal.SIGKILL)
        output = pipe.read().decode() if ready else "(killed after 60 s)"
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status), output


def assert_refused(result: tuple[int, str], *fragments: str) -> None:
    code, message = result
    assert code == 2, result
    assert len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message


def test_fifo_named_like_an_image_is_refused_not_read(tmp_path: Path) -> None:
    write_tree(tmp_path / "data", list(CIFAR10_CLASSES), per_class=1)
    fifo = tmp_path / "data" / "train" / "dog" / "x.jpg"
    os.mkfifo(fifo)  # opening it to read would wait for a writer forever

    result = load_in_child(tmp_path / "data")

    assert_refused(result, f"Image {fifo} is a FIFO (named pipe), not a regular file")


def test_link_to_dev_zero_is_refused_not_read(tmp_path: Path) -> None:
    write_tree(tmp_path / "data", list(CIFAR10_CLASSES), per_class=1)
    link = tmp_path / "data" / "test" / "frog" / "zero.png"
    link.symlink_to("/dev/zero")  # reading it never ends

    result = load_in_child(tmp_path / "data")

    assert_refused(result, f"Image {link} is a character device, not a regular file")


def png_bytes(width: int, height: int, rows: bytes, bit_depth: int = 8) -> bytes:
    """A PNG of RGB samples from raw filtered rows, written chunk by chunk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, bit_depth, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real 32x32 JPEG whose start-of-frame segment is patched to claim another size."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buffer, format="JPEG")
    content = bytearray(buffer.getvalue())
    frame = content.index(b"\xff\xc0")
    struct.pack_into(">HH", content, frame + 5, height, width)
    return bytes(content)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_decompression_bomb_is_refused_from_its_header(tmp_path: Path, suffix: str) -> None:
    write_tree(tmp_path / "data", list(CIFAR10_CLASSES), per_class=1)
    bomb = tmp_path / "data" / "train" / "ship" / f"bomb.{suffix}"
    # 10 GB of pixels once decoded, from a file of a few hundred bytes.
    side = 60_000
    if suffix == "png":
        bomb.write_bytes(png_bytes(side, side, b"\x00" * (1 + 3 * side)))
    else:
        bomb.write_bytes(jpeg_claiming(side, side))

    result = load_in_child(tmp_path / "data")

    assert_refused(result, f"Image {bomb} is {side}x{side} pixels but CIFAR-10 images are 32x32")


def test_image_file_of_megabytes_is_refused(tmp_path: Path) -> None:
    write_tree(tmp_path / "data", list(CIFAR10_CLASSES), per_class=1)
    big = tmp_path / "data" / "train" / "horse" / "0000.png"
    with big.open("ab") as file:  # still a valid PNG: decoders stop at its end chunk
        file.write(b"\x00" * (5 << 20))

    with pytest.raises(HooktrainError, match=r"0000\.png is 5,2\d\d,\d\d\d bytes, more than"):
        load_cifar10(tmp_path / "data")


def test_truncated_jpeg_is_named_without_torchvision_internals(tmp_path: Path) -> None:
    write_tree(tmp_path / "data", list(CIFAR10_CLASSES), per_class=1, ext="jpg")
    cut = tmp_path / "data" / "test" / "deer" / "0000.jpg"
    cut.write_bytes(cut.read_bytes()[:300])

    with pytest.raises(HooktrainError) as info:
        load_cifar10(tmp_path / "data")

    assert str(info.value) == (
        f"Cannot decode image {cut} (Image is incomplete or truncated); remove or replace it."
    )


def test_image_names_that_are_not_utf8_load(tmp_path: Path) -> None:
    written = write_tree(tmp_path / "data", list(CIFAR10_CLASSES), per_class=1)
    folder = os.fsencode(tmp_path / "data" / "train" / "cat")
    os.rename(folder + b"/0000.png", folder + b"/0000\xff.png")

    dataset = load_cifar10(tmp_path / "data")

    assert torch.equal(dataset.train.inputs[3], written["train"]["cat"][0].permute(1, 2, 0))


def test_messages_about_names_that_are_not_utf8_can_be_printed(tmp_path: Path) -> None:
    write_tree(tmp_path / "data", list(CIFAR10_CLASSES), per_class=1)
    folder = os.fsencode(tmp_path / "data" / "train")
    os.rename(folder + b"/cat", folder + b"/cat\xff")

    with pytest.raises(HooktrainError, match="only in test/: cat\\)") as info:
        load_cifar10(tmp_path / "data")

    message = str(info.value)
    message.encode("utf-8")  # what a terminal gets: a lone surrogate here would not encode
    assert "only in train/: 'cat\\udcff';" in message


def test_16_bit_grayscale_png_is_rounded_to_8_bits(tmp_path: Path) -> None:
    write_tree(tmp_path / "data", list(CIFAR10_CLASSES), per_class=1)
    samples = np.random.default_rng(0).integers(0, 65536, (32, 32), dtype=np.uint16)
    samples[0, :5] = [0, 128, 129, 32767, 65535]
    Image.fromarray(samples).save(tmp_path / "data" / "train" / "bird" / "0000.png")

    dataset = load_cifar10(tmp_path / "data")

    # The PNG specification's scaling: round(v * 255 / 65535).
    expected = torch.from_numpy(np.round(samples / 257).astype(np.uint8))
    assert torch.equal(dataset.train.inputs[2], expected[..., None].expand(32, 32, 3))
    assert dataset.train.inputs[2, 0, :5, 0].tolist() == [0, 0, 1, 127, 255]


def test_16_bit_rgb_png_is_rounded_to_8_bits(tmp_path: Path) -> None:
    write_tree(tmp_path / "data", list(CIFAR10_CLASSES), per_class=1)
    samples = np.random.default_rng(1).integers(0, 65536, (32, 32, 3), dtype=np.uint16)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples)
    (tmp_path / "data" / "test" / "truck" / "0000.png").write_bytes(png_bytes(32, 32, rows, 16))

    dataset = load_cifar10(tmp_path / "data")

    expected = torch.from_numpy(np.round(samples / 257).astype(np.uint8))
    assert torch.equal(dataset.test.inputs[9], expected)


@pytest.mark.parametrize(
    ("mode", "form"),
    [
        ("L", "PNG"),
        ("LA", "PNG"),
        ("RGBA", "PNG"),
        ("P", "PNG"),
        ("1", "PNG"),
        ("L", "JPEG"),
        ("CMYK", "JPEG"),
        ("P", "GIF"),
        ("RGBA", "WEBP"),
    ],
)
def test_every_color_mode_decodes_to_rgb_as_pillow_converts_it(
    tmp_path: Path, mode: str, form: str
) -> None:
    write_tree(tmp_path / "data", list(CIFAR10_CLASSES), per_class=1)
    pixels = np.random.default_rng(2).integers(0, 256, (32, 32, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "CMYK" if mode == "CMYK" else "RGBA")
    image = image if mode in ("CMYK", "RGBA") else image.convert("RGB").convert(mode)
    target = tmp_path / "data" / "train" / "cat" / f"0000.{form.lower()}"
    (tmp_path / "data" / "train" / "cat" / "0000.png").unlink()
    image.save(target, format=form, **({"lossless": True} if form == "WEBP" else {}))

    dataset = load_cifar10(tmp_path / "data")

    with Image.open(target) as saved:
        expected = torch.from_numpy(np.array(saved.convert("RGB")))
    assert torch.equal(dataset.train.inputs[3], expected)


def write_batch_file(tmp_path: Path, content: bytes) -> Path:
    batches = tmp_path / "data" / "cifar-10-batches-py"
    write_batches(batches, per_batch=2)
    (batches / "data_batch_1").write_bytes(content)
    return batches / "data_batch_1"


def shared_nested_labels(levels: int = 40) -> bytes:
    """A batch whose labels are lists nested `levels` deep, each holding the one below twice.

    The pickle's memo makes that a few hundred bytes; written out it has 2**levels entries.
    """
    head = pickle.dumps({b"data": np.zeros((0, 3072), np.uint8)}, protocol=3)
    lists = b"]q\x64"  # an empty list, memo slot 100
    for level in range(1, levels):
        below = bytes([99 + level])
        # POP the one below (the memo keeps it), a new list in the next slot, both halves.
        lists += b"0]q" + bytes([100 + level]) + b"(h" + below + b"h" + below + b"e"
    return head[:-2] + b"C\x06labels" + lists + b"s."  # replace the final SETITEM, STOP


def shared_tuple_key(levels: int = 60) -> bytes:
    """A batch whose dict key is a tuple holding the one below twice, 60 deep: hashing it
    visits 2**60 tuples."""
    tuples = b")q\x00"
    for level in range(1, levels):
        below = bytes([level - 1])
        tuples += b"0h" + below + b"h" + below + b"\x86q" + bytes([level])
    return b"\x80\x02}(" + tuples + b"Nu."


def tuple_nested_a_million_deep() -> bytes:
    """A batch whose dict key is a 1-tuple of a 1-tuple ... a million deep: hashing it
    recurses in C past the end of the stack."""
    return b"\x80\x02}(N" + b"\x85" * 1_000_000 + b"Nu."


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (shared_nested_labels, "it reuses one list, dict or large tuple in several places"),
        (shared_tuple_key, "it reuses one list, dict or large tuple in several places"),
        (tuple_nested_a_million_deep, "its objects nest more than 32 levels deep"),
    ],
)
def test_batch_file_describing_huge_objects_is_refused_before_unpickling(
    tmp_path: Path, build: Any, reason: str
) -> None:
    batch = write_batch_file(tmp_path, build())

    result = load_in_child(tmp_path / "data")

    assert_refused(result, f"CIFAR-10 batch file {batch} is malformed ({reason})")


@pytest.mark.parametrize("protocol", [0, 2])
def test_long_lists_in_batch_files_are_not_mistaken_for_deep_ones(tmp_path: Path, protocol: int):
    # Protocol 0 appends each of the 300 labels on its own, protocol 2 in groups of 1000.
    written = write_batches(tmp_path / "cifar-10-batches-py", per_batch=300, protocol=protocol)
    dataset = load_cifar10(tmp_path)
    assert dataset.test.targets.tolist() == written["test_batch"][1]


def test_batch_labels_must_be_a_flat_list_of_integers(tmp_path: Path) -> None:
    rows = np.zeros((2, 3072), np.uint8)
    write_batch_file(tmp_path, pickle.dumps({b"data": rows, b"labels": [[0], [1]]}, protocol=2))
    with pytest.raises(HooktrainError, match=r"b'labels' is not a flat list of integers"):
        load_cifar10(tmp_path / "data")


def test_meta_file_naming_other_than_ten_classes_is_refused(tmp_path: Path) -> None:
    batches = tmp_path / "data" / "cifar-10-batches-py"
    write_batches(batches, per_batch=2)
    # Each name would become one of the model's outputs.
    names = [f"class {i}".encode() for i in range(100_000)]
    (batches / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    with pytest.raises(HooktrainError, match=r"batches\.meta is malformed \(it names 100000 cl"):
        load_cifar10(tmp_path / "data")


def test_fifo_as_batch_file_is_refused_not_read(tmp_path: Path) -> None:
    batches = tmp_path / "data" / "cifar-10-batches-py"
    write_batches(batches, per_batch=2)
    (batches / "test_batch").unlink()
    os.mkfifo(batches / "test_batch")
    with pytest.raises(HooktrainError, match=r"test_batch is a FIFO \(named pipe\), not a regul"):
        load_cifar10(tmp_path / "data")


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
