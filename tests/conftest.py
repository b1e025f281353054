"""Shared fixtures: real CIFAR-10 images, small synthetic data sets, a private cache folder."""

from __future__ import annotations

import functools
import importlib
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import Result

from hooktrain.data import augment

# The module, not the function hooktrain.models exports under the same name.
resnet9_module = importlib.import_module("hooktrain.models.resnet9")

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.xz"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep decoded data sets in a folder of this test session, never in the user's cache."""
    folder = tmp_path_factory.mktemp("cache")
    os.environ["HOOKTRAIN_CACHE_DIR"] = str(folder)
    os.environ["HOOKTRAIN_DATA_DIR"] = str(folder / "no-default-data")
    return folder


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real CIFAR-10 copy (JPEG, image folders): $HOOKTRAIN_TEST_DATA or ../shared's archive.

    Missing data skips the tests that need it, unless HOOKTRAIN_REQUIRE_DATA=1 (as in CI).
    """
    if os.environ.get("HOOKTRAIN_TEST_DATA"):
        return Path(os.environ["HOOKTRAIN_TEST_DATA"])
    if ARCHIVE.is_file():
        folder = tmp_path_factory.mktemp("cifar10")
        with tarfile.open(ARCHIVE) as archive:
            archive.extractall(folder, filter="data")
        return folder
    message = f"real CIFAR-10 not found: set HOOKTRAIN_TEST_DATA or provide {ARCHIVE}"
    if os.environ.get("HOOKTRAIN_REQUIRE_DATA") == "1":
        pytest.fail(message)
    pytest.skip(message)


def write_cifar_batches(folder: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A small data set in the official ``cifar-10-batches-py`` format, random pixels.

    Pixels depend on the label (a per-class tint) so a model can learn something from them.
    """
    rng = np.random.default_rng(seed)
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    tints = rng.integers(0, 256, size=(10, 3072))

    def batch(count: int) -> dict:
        labels = rng.integers(0, 10, size=count)
        noise = rng.integers(0, 256, size=(count, 3072))
        data = ((tints[labels] + noise) // 2).astype(np.uint8)
        return {b"data": data, b"labels": labels.tolist()}

    per_batch = [n_train // 5 + (1 if i < n_train % 5 else 0) for i in range(5)]
    for index, count in enumerate(per_batch, start=1):
        (batches / f"data_batch_{index}").write_bytes(pickle.dumps(batch(count)))
    (batches / "test_batch").write_bytes(pickle.dumps(batch(n_test)))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    (batches / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return folder


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 training and 100 test images in the official format."""
    return write_cifar_batches(tmp_path_factory.mktemp("tiny_cifar"), n_train=240, n_test=100)


def assert_user_error(result: Result, *fragments: str) -> str:
    """Exit code 2, no traceback, and exactly one sentence on stderr: 'Error: ...'."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("Error: "), line
    assert line.endswith("."), line
    for fragment in fragments:
        assert fragment in line, line
    return line


@pytest.fixture
def float64_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs started in this test train in float64: the model's tensors and the batches.

    Float32 comparisons between two code paths (vmapped and one-by-one seeds, compiled and
    eager) cannot be tight on every CPU: a ReLU input or two max-pool inputs that differ by
    rounding (~1e-6) send the gradient elsewhere, and tiny runs amplify that about tenfold per
    step. In float64 such near-ties are 1e8 times rarer, so the paths must agree to 1e-7.
    """
    resnet9, apply = resnet9_module.resnet9, augment.Normalize.apply

    @functools.wraps(resnet9)  # the same signature: the run passes it the facts it declares
    def double_resnet9(**options: object) -> torch.nn.Module:
        return resnet9(**options).double()

    monkeypatch.setattr(resnet9_module, "resnet9", double_resnet9)
    monkeypatch.setattr(
        augment.Normalize, "apply", lambda self, images, draws: apply(self, images, draws).double()
    )
