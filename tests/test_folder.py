"""The run folder: one process writes it, and --overwrite replaces only a hooktrain run.

Other processes here are real ones: a training run held at its 4th step, a second
``python -m hooktrain``, a small process that holds a folder. The folders --overwrite must
refuse are real crafted ones, and each is checked byte for byte afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import assert_user_error

from hooktrain.cli import main
from hooktrain.errors import HooktrainError
from hooktrain.run.files import CONFIG_FILE
from hooktrain.run.folder import LOCK_FILE, hold_run_folder, not_a_run

FLAGSHIP = "resnet9_cifar10"
TINY = [
    *("--set", "model.width=4", "--set", "epochs=1", "--set", "batch_size=40"),
    *("--set", "checkpoint.every_steps=2", "--set", "metrics.progress=false"),
    *("--device", "cpu"),
]


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args])


def run_tiny(data: Path, out: str | Path, *extra: str) -> Result:
    return invoke("run", FLAGSHIP, *TINY, "--data-dir", data, "--out", out, *extra)


def in_use(folder: Path | str, pid: int) -> str:
    return (
        f"Error: {folder} is in use by another hooktrain process (pid {pid}); wait for it to end, "
        "or use another folder."
    )


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root``: a file's bytes, a link's target or "folder" (never followed)."""
    entries: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            entries[name] = f"link to {os.readlink(path)}"
        elif path.is_dir():
            entries[name] = "folder"
        else:
            entries[name] = path.read_bytes()
    return entries


@pytest.fixture(scope="module")
def finished_run(tiny_cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny run: config.json, metrics.json, tensorboard/ and checkpoints/."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = run_tiny(tiny_cifar, out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run", symlinks=True))


# ---------------------------------------------------------------------------------------------
# One folder, one process


# A real run that holds its folder at the 4th step until it is killed (checkpoints at steps 2).
HELD_RUN = """
import sys
import time
from hooktrain.data import device as data

real_train_batch = data.DeviceData.train_batch

def held_train_batch(self, plan, index):
    if index == 3:
        print("step 4 starts", flush=True)
        time.sleep(600)
    return real_train_batch(self, plan, index)

data.DeviceData.train_batch = held_train_batch
from hooktrain.cli import main
main(sys.argv[1:])
"""


@pytest.fixture
def held_run(tiny_cifar: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    out = tmp_path / "run"
    args = ["run", FLAGSHIP, *TINY, "--data-dir", str(tiny_cifar), "--out", str(out)]
    with subprocess.Popen(
        [sys.executable, "-c", HELD_RUN, *args], stdout=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            for line in process.stdout:
                if line.startswith("step 4 starts"):
                    break
            assert process.poll() is None, "the run ended before its 4th step"
            yield process, out
        finally:
            process.kill()


def test_a_folder_in_use_refuses_another_run_resume_and_overwrite_until_its_process_dies(
    held_run: tuple[subprocess.Popen[str], Path], tiny_cifar: Path
) -> None:
    process, out = held_run
    command = ["run", FLAGSHIP, *TINY, "--data-dir", str(tiny_cifar), "--out", str(out)]
    second = subprocess.run(
        [sys.executable, "-m", "hooktrain", *command],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 2, second.stdout + second.stderr
    assert second.stderr.strip() == in_use(out, process.pid)

    before = snapshot(out)
    checkpoints = {name: data for name, data in before.items() if name.startswith("checkpoints")}
    assert f"checkpoints{os.sep}last.pt" in checkpoints
    result = assert_user_error(run_tiny(tiny_cifar, out, "--overwrite"))
    assert result == in_use(out, process.pid)
    assert assert_user_error(invoke("resume", out)) == in_use(out, process.pid)
    after = snapshot(out)  # TensorBoard may still flush into its event file: names only there
    assert after.keys() == before.keys()
    assert {name: after[name] for name in checkpoints} == checkpoints
    assert after[CONFIG_FILE] == before[CONFIG_FILE]

    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (out / LOCK_FILE).read_text() == f"{process.pid}\n"  # left by the killed process
    resumed = invoke("resume", out)
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming {out} at step 2" in resumed.output
    assert not (out / LOCK_FILE).exists()  # a run that ends lets go of its folder


HOLDER = """
import sys, time
from pathlib import Path
from hooktrain.run.folder import hold_run_folder

with hold_run_folder(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """Another real process holding the folder ``tmp_path/held``."""
    folder = tmp_path / "held"
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            assert process.stdout.readline() == "held\n"
            yield process, folder
        finally:
            process.kill()


def test_holding_nests_in_one_process_and_refuses_other_processes(
    holder: tuple[subprocess.Popen[str], Path], tmp_path: Path
) -> None:
    process, held = holder
    with pytest.raises(HooktrainError) as refused, hold_run_folder(held):
        pass
    assert f"Error: {refused.value}" == in_use(held, process.pid)

    mine = tmp_path / "mine"
    with hold_run_folder(mine), hold_run_folder(mine / ".." / "mine"):
        assert (mine / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        check = subprocess.run(
            [sys.executable, "-c", HOLDER, str(mine)], capture_output=True, text=True, timeout=60
        )
        assert check.returncode == 1
        assert f"{mine} is in use by another hooktrain process (pid {os.getpid()})" in check.stderr
    assert list(mine.iterdir()) == []  # released: the lock file is gone with it


def test_seeds_trained_together_hold_every_folder(
    holder: tuple[subprocess.Popen[str], Path], tmp_path: Path, tiny_cifar: Path
) -> None:
    from hooktrain.config.overrides import apply_overrides
    from hooktrain.config.registry import load_recipe
    from hooktrain.run.loop import train_seeds

    process, held = holder
    recipe = apply_overrides(load_recipe(FLAGSHIP), ["model.width=4", "epochs=1", "batch_size=40"])
    free = tmp_path / "free"
    with pytest.raises(HooktrainError) as refused:
        train_seeds(recipe, [0, 1], out_dirs=[free, held], data_dir=tiny_cifar, device="cpu")
    assert f"Error: {refused.value}" == in_use(held, process.pid)
    assert list(free.iterdir()) == []  # nothing was written into the folder it did hold


# ---------------------------------------------------------------------------------------------
# --overwrite replaces a hooktrain run and nothing else


def test_overwrite_replaces_a_real_run(run_copy: Path, tiny_cifar: Path) -> None:
    (run_copy / LOCK_FILE).write_text("12345\n")  # left by a run that was killed
    (run_copy / "checkpoints" / ".last.pt.abc.tmp").write_bytes(b"torn")
    old = snapshot(run_copy)
    assert not_a_run(run_copy) is None
    result = run_tiny(tiny_cifar, run_copy, "--overwrite", "--seed", "7")
    assert result.exit_code == 0, result.output
    assert json.loads((run_copy / CONFIG_FILE).read_text())["recipe"]["seed"] == 7
    new = snapshot(run_copy)
    assert new[f"checkpoints{os.sep}last.pt"] != old[f"checkpoints{os.sep}last.pt"]
    assert LOCK_FILE not in new and f"checkpoints{os.sep}.last.pt.abc.tmp" not in new


def craft_model_folder(root: Path) -> Path:
    folder = root / "model"
    folder.mkdir()
    (folder / CONFIG_FILE).write_text('{"architectures": ["BertModel"], "hidden_size": 768}\n')
    (folder / "pytorch_model.bin").write_bytes(os.urandom(64))
    return folder


def craft_hooktrain_like_model_folder(root: Path) -> Path:
    folder = craft_model_folder(root)
    (folder / CONFIG_FILE).write_text('{"recipe": {}, "plugins": [], "run": {}}\n')
    return folder


def craft_foreign_config(root: Path) -> Path:
    folder = root / "other"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / CONFIG_FILE).write_text('{"recipe": {"name": "resnet9_cifar10"}}\n')
    (folder / "checkpoints" / "last.pt").write_bytes(os.urandom(64))
    return folder


def craft_run_with_notes(root: Path) -> Path:
    (root / "run" / "notes.txt").write_text("what I tried\n")
    return root / "run"


def craft_run_with_linked_checkpoint(root: Path) -> Path:
    (root / "precious.pt").write_bytes(os.urandom(64))
    last = root / "run" / "checkpoints" / "last.pt"
    last.unlink()
    last.symlink_to(root / "precious.pt")
    return root / "run"


def craft_run_with_linked_tensorboard_folder(root: Path) -> Path:
    (root / "logs").mkdir()
    (root / "logs" / "events.out.tfevents.1").write_bytes(b"mine")
    (root / "run" / "tensorboard" / "old").symlink_to(root / "logs")
    return root / "run"


def craft_link_to_run(root: Path) -> Path:
    (root / "link").symlink_to(root / "run")
    return root / "link"


def craft_damaged_config(root: Path) -> Path:
    (root / "run" / CONFIG_FILE).write_text('{"recipe": ')
    return root / "run"


@pytest.mark.parametrize(
    ("craft", "fragment"),
    [
        (craft_model_folder, "pytorch_model.bin is not a file hooktrain writes"),
        (craft_hooktrain_like_model_folder, "pytorch_model.bin is not a file hooktrain writes"),
        (craft_foreign_config, f"{CONFIG_FILE} is not a run's"),
        (craft_run_with_notes, "notes.txt is not a file hooktrain writes"),
        (craft_run_with_linked_checkpoint, "checkpoints/last.pt is a symbolic link"),
        (craft_run_with_linked_tensorboard_folder, "tensorboard/old is a symbolic link"),
        (craft_link_to_run, "is a symbolic link, and --overwrite deletes only in a real run"),
        (craft_damaged_config, f"{CONFIG_FILE} is not a run's"),
    ],
)
def test_overwrite_refuses_what_is_not_provably_a_run(
    run_copy: Path,
    tiny_cifar: Path,
    tmp_path: Path,
    craft: Callable[[Path], Path],
    fragment: str,
) -> None:
    out = craft(tmp_path)
    before = snapshot(tmp_path)
    assert_user_error(run_tiny(tiny_cifar, out, "--overwrite"), fragment, "another --out")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("cwd", "out", "what"),
    [
        ("plain", ".", "the working directory"),
        ("plain", "", "the working directory"),
        ("run", ".", "the working directory"),
        ("run", "..", "a folder above the working directory"),
        ("run/checkpoints", "..", "a folder above the working directory"),
        ("run/checkpoints", "{tmp}", "a folder above the working directory"),
    ],
)
def test_overwrite_never_empties_the_working_directory_or_above(
    run_copy: Path,
    tiny_cifar: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cwd: str,
    out: str,
    what: str,
) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "thesis.tex").write_text("years of work")
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"recipe": {}, "plugins": [], "run": {}}))
    monkeypatch.chdir(tmp_path / cwd)
    before = snapshot(tmp_path)
    result = run_tiny(tiny_cifar, out.format(tmp=tmp_path), "--overwrite")
    assert_user_error(result, f"is {what}, which --overwrite never empties")
    assert snapshot(tmp_path) == before


def test_overwrite_never_empties_the_home_folder(
    run_copy: Path, tiny_cifar: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(run_copy))
    before = snapshot(run_copy)
    result = run_tiny(tiny_cifar, run_copy, "--overwrite")
    assert_user_error(result, "is the home folder, which --overwrite never empties")
    assert snapshot(run_copy) == before


def test_a_folder_left_by_a_run_killed_at_its_start_is_reused(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("12345\n")
    (out / f".{CONFIG_FILE}.x1.tmp").write_text("{")
    result = run_tiny(tiny_cifar, out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints",
        CONFIG_FILE,
        "metrics.json",
        "tensorboard",
    ]


# ---------------------------------------------------------------------------------------------
# Ablation folders: a seed folder left by an interrupted attempt is replaced like a run


def test_an_ablation_never_deletes_through_a_linked_cell_folder(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    """An ablation continued after cells/baseline became a link to someone's folder stops in
    a sentence before replacing the unfinished seed, and the linked folder keeps its files."""
    args = ["ablate", "resnet9_cifar10", "--vary", "grad_clip=on,off", "--seeds", "2"]
    args += [*TINY, "--data-dir", str(tiny_cifar), "--out", str(tmp_path / "abl")]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    results = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    baseline = next(cell for cell in results["cells"] if cell["name"] == "baseline")
    del baseline["runs"]["1"]  # seed 1 of the baseline is to be trained again
    (tmp_path / "abl" / "ablation.json").write_text(json.dumps(results))
    victim = tmp_path / "someone"
    shutil.move(tmp_path / "abl" / "cells" / baseline["folder"], victim)
    (victim / "seed-1" / "notes.txt").write_text("mine")
    before = snapshot(victim)
    (tmp_path / "abl" / "cells" / baseline["folder"]).symlink_to(victim)
    assert_user_error(invoke(*args), "is not a folder of this ablation", "a link")
    assert snapshot(victim) == before
