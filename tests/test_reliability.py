"""Nothing a user started is lost: damaged checkpoints, failed saves, divergence, signals.

Every run here is tiny (width 4, 240 images in batches of 40: 6 steps an epoch) and saves a
checkpoint every 2 steps, so resumes start inside epochs. Failed writes and signals come for
real, to `hooktrain` in a child process: a file-size limit, a full tmpfs, a read-only mount,
a signal sent at the moment the child announces. The kill -9 fault script is
``fault_kill_resume.py`` beside this file (``test_kill_resume.py`` runs its short version).
"""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import assert_user_error

from hooktrain.cli import main
from hooktrain.plugins.checkpoint import BEST, CHECKPOINT_FOLDER, LAST, PREVIOUS
from hooktrain.run import checkpoints
from hooktrain.run.checkpoints import (
    CheckpointUnusable,
    load_checkpoint,
    save_checkpoint,
)
from hooktrain.run.files import CONFIG_FILE, METRICS_FILE, TENSORBOARD_FOLDER

FLAGSHIP = "resnet9_cifar10"
TINY = [
    *("--set", "model.width=4", "--set", "epochs=2", "--set", "batch_size=40"),
    *("--set", "checkpoint.every_steps=2", "--set", "metrics.progress=false"),
    *("--device", "cpu"),
]
STEPS = 12


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args])


def run_tiny(data: Path, out: Path, *extra: str | Path) -> Result:
    result = invoke("run", FLAGSHIP, *TINY, "--data-dir", data, "--out", out, *extra)
    return result


def final_state(folder: Path) -> dict[str, Any]:
    return load_checkpoint(folder / CHECKPOINT_FOLDER / LAST)["state"]


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Bit-identical parameters, buffers and optimizer state, at the same step."""
    assert a["step"] == b["step"]
    for kind in ("params", "buffers"):
        for name, tensor in a[kind].items():
            assert torch.equal(tensor, b[kind][name]), f"{kind} {name}"
    flat_a, flat_b = _tensors(a["opt_state"]), _tensors(b["opt_state"])
    assert len(flat_a) == len(flat_b)
    assert all(torch.equal(x, y) for x, y in zip(flat_a, flat_b, strict=True))


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in sorted(value) for t in _tensors(value[key])]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors(item)]
    return []


@pytest.fixture(scope="module")
def reference(tiny_cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted tiny run: 2 epochs, a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run_tiny(tiny_cifar, out)
    assert result.exit_code == 0, result.output
    return out


def unfinished_copy(run: Path, tmp_path: Path) -> Path:
    """A copy of a finished run as if it had been killed before its end was recorded."""
    folder = Path(shutil.copytree(run, tmp_path / "run"))
    config = json.loads((folder / CONFIG_FILE).read_text())
    del config["run"]["finished"]
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    return folder


# ---------------------------------------------------------------------------------------------
# 1. Checksums: every damaged byte is caught before unpickling


def test_every_flipped_byte_and_every_cut_is_detected(reference: Path, tmp_path: Path) -> None:
    original = (reference / CHECKPOINT_FOLDER / LAST).read_bytes()
    rng = random.Random(0)
    positions = [*rng.sample(range(len(original)), 200), 0, len(original) - 1]
    path = tmp_path / "damaged.pt"
    for position in positions:
        damaged = bytearray(original)
        damaged[position] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointUnusable):
            load_checkpoint(path)
    for length in [0, 1, 100, len(original) // 2, len(original) - 73, len(original) - 1]:
        path.write_bytes(original[:length])
        with pytest.raises(CheckpointUnusable):
            load_checkpoint(path)
    path.write_bytes(original)
    assert load_checkpoint(path)["state"]["step"] == STEPS


def test_a_checkpoint_is_a_plain_torch_file_with_its_checksum_in_the_zip_comment(
    reference: Path,
) -> None:
    import zipfile

    path = reference / CHECKPOINT_FOLDER / LAST
    with zipfile.ZipFile(path) as archive:
        assert archive.comment.startswith(checkpoints.CHECKSUM_PREFIX)
        assert archive.testzip() is None
    assert torch.load(path, weights_only=True)["version"] == checkpoints.VERSION


@pytest.mark.parametrize("version", [1, 2])
def test_checkpoints_of_older_versions_are_refused_in_a_sentence(
    tmp_path: Path, version: int
) -> None:
    """Versions 1 and 2 have no gradient-chain state or step key: nothing to resume from."""
    state = {key: {} for key in checkpoints.STATE_KEYS}
    payload = {"format": checkpoints.FORMAT, "version": version, "recipe": "r", "config": {}}
    torch.save(payload | {"plugins": {}, "state": state}, tmp_path / "old.pt")
    with pytest.raises(CheckpointUnusable, match=f"format version {version} and this hooktrain"):
        load_checkpoint(tmp_path / "old.pt")


def test_a_checkpoint_stripped_of_its_checksum_is_refused(reference: Path, tmp_path: Path) -> None:
    payload = load_checkpoint(reference / CHECKPOINT_FOLDER / LAST)
    torch.save(payload, tmp_path / "stripped.pt")
    with pytest.raises(CheckpointUnusable, match="lost the checksum"):
        load_checkpoint(tmp_path / "stripped.pt")


# ---------------------------------------------------------------------------------------------
# 2. Resume falls back to the newest usable checkpoint


def _flip_bytes(path: Path, other: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path, other: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _another_recipes(path: Path, other: Path) -> None:
    payload = load_checkpoint(other)
    payload["recipe"] = "resnet9_fast"
    save_checkpoint(payload, path)


def _newer_format(path: Path, other: Path) -> None:
    save_checkpoint(load_checkpoint(path) | {"version": checkpoints.VERSION + 1}, path)


def _other_settings(path: Path, other: Path) -> None:
    payload = load_checkpoint(path)
    payload["config"]["recipe"]["max_lr"] = 0.5
    save_checkpoint(payload, path)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_flip_bytes, "checksum does not match"),
        (_truncate, "corrupt, truncated"),
        (_another_recipes, "written by the recipe 'resnet9_fast'"),
        (_newer_format, f"format version {checkpoints.VERSION + 1}"),
        (_other_settings, "a run with other settings"),
    ],
)
def test_resume_passes_over_a_damaged_last_checkpoint(
    reference: Path, tmp_path: Path, damage: Any, reason: str
) -> None:
    """last.pt (step 12) is damaged: resume takes previous.pt (step 10) and ends bit-identical."""
    folder = unfinished_copy(reference, tmp_path)
    last = folder / CHECKPOINT_FOLDER / LAST
    assert load_checkpoint(folder / CHECKPOINT_FOLDER / PREVIOUS)["state"]["step"] == 10
    # Step 12 ended the run: mark it unfinished so there is something left to resume.
    (folder / CHECKPOINT_FOLDER / BEST).unlink()
    damage(last, reference / CHECKPOINT_FOLDER / PREVIOUS)
    result = invoke("resume", folder)
    assert result.exit_code == 0, result.output
    assert f"warning: passed over {last}: it" in result.output
    assert reason in result.output
    assert f"resuming from {folder / CHECKPOINT_FOLDER / PREVIOUS} instead (step 10)" in (
        result.output
    )
    assert_same_state(final_state(folder), final_state(reference))


def test_resume_refuses_when_no_checkpoint_is_usable(reference: Path, tmp_path: Path) -> None:
    folder = unfinished_copy(reference, tmp_path)
    for path in (folder / CHECKPOINT_FOLDER).glob("*.pt"):
        _truncate(path, path)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    result = invoke("resume", folder)
    assert_user_error(result, "No checkpoint in", "can be resumed", "best.pt: it is corrupt")
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_resume_of_a_damaged_config(reference: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(reference, tmp_path / "run"))
    (folder / CONFIG_FILE).write_text('{"recipe": ')
    assert_user_error(invoke("resume", folder), f"{folder / CONFIG_FILE} is damaged")


# ---------------------------------------------------------------------------------------------
# 3. A checkpoint that would run code is refused before any of it runs


class _Payload:
    """Unpickling this calls open(target, "w"): the file appears if pickled code runs."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("with_checksum", [False, True])
def test_a_malicious_checkpoint_runs_no_code(
    reference: Path, tmp_path: Path, with_checksum: bool
) -> None:
    target = tmp_path / "pwned"
    payload = load_checkpoint(reference / CHECKPOINT_FOLDER / LAST)
    payload["plugins"]["metrics"] = {"history": _Payload(target)}
    path = tmp_path / "evil.pt"
    if with_checksum:  # a forged checksum does not make it loadable
        with path.open("wb") as file:
            checkpoints.write_checksummed(payload, file)
    else:
        torch.save(payload, path)
    assert_user_error(invoke("eval", path), "asks to import", "no code can run")
    assert not target.exists()
    # In a run folder, resume passes over it to the previous checkpoint.
    folder = unfinished_copy(reference, tmp_path)
    (folder / CHECKPOINT_FOLDER / BEST).unlink()
    shutil.copy(path, folder / CHECKPOINT_FOLDER / LAST)
    result = invoke("resume", folder)
    assert result.exit_code == 0, result.output
    assert "asks to import" in result.output
    assert not target.exists()
    assert_same_state(final_state(folder), final_state(reference))


# ---------------------------------------------------------------------------------------------
# 4. A failed save keeps the previous checkpoint and the run


class _DiskWithRoom:
    """The file of a checkpoint being saved on a disk with ``room`` bytes left: ENOSPC past it."""

    def __init__(self, file: Any, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def _full_disk_while(monkeypatch: pytest.MonkeyPatch, failing_saves: set[int]) -> None:
    """Checkpoint writes number ``failing_saves`` (from 1) run out of disk after 1000 bytes.

    The error comes from inside ``torch.save``'s own writes, as a full disk's does (torch's
    zip writer turns it into a RuntimeError of its own unless hooktrain looks past it); the
    subprocess tests in section 9 fill real disks.
    """
    real_write = checkpoints.write_checksummed
    count = {"saves": 0}

    def write(payload: dict[str, Any], file: Any) -> None:
        count["saves"] += 1
        real_write(payload, _DiskWithRoom(file, 1000) if count["saves"] in failing_saves else file)

    monkeypatch.setattr(checkpoints, "write_checksummed", write)


def test_a_full_disk_for_a_while_loses_nothing(
    reference: Path, tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Saves: step 2, 4, 6 (epoch end; best.pt is a link), 8, 10, 12: the 2nd and 3rd fail.
    _full_disk_while(monkeypatch, {2, 3})
    out = tmp_path / "run"
    result = run_tiny(tiny_cifar, out)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "could not save" in line]
    assert len(warnings) == 2, result.output
    assert "could not save step 4" in warnings[0]
    assert "No space left on device" in warnings[0]
    assert (
        f"the checkpoint saved before it is intact in {out / CHECKPOINT_FOLDER / LAST}"
        in (warnings[0])
    )
    assert_same_state(final_state(out), final_state(reference))
    assert list((out / CHECKPOINT_FOLDER).glob(".*")) == []


def test_a_disk_that_stays_full_ends_with_the_last_good_checkpoint(
    tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _full_disk_while(monkeypatch, set(range(3, 100)))
    out = tmp_path / "run"
    result = run_tiny(tiny_cifar, out)
    assert_user_error(result, "its last checkpoint could not be written", "No space left")
    assert f"hooktrain resume {out}" in result.stderr
    assert final_state(out)["step"] == 4  # saves 1 and 2: steps 2 and 4
    monkeypatch.undo()
    assert invoke("resume", out).exit_code == 0
    assert final_state(out)["step"] == STEPS


# ---------------------------------------------------------------------------------------------
# 5. nan_guard stops a diverged run and names the step


NAN_RECIPE = """
import attrs
import torch
from hooktrain import Plugin, hookimpl
from hooktrain.config.registry import load_recipe


@attrs.define
class PoisonedLR(Plugin):
    '''The learning rate turns NaN from step index AT on: the parameters follow.'''

    default_name = "poisoned_lr"

    @hookimpl
    def hooktrain_lr_schedule(self, build):
        return lambda step: torch.where(step >= AT, float("nan"), 0.01)


@attrs.define
class InfiniteGradients(Plugin):
    '''A loss whose value is finite but whose gradients are not (sqrt at 0).'''

    default_name = "infinite_gradients"

    @hookimpl
    def hooktrain_loss(self, build):
        ce = torch.nn.functional.cross_entropy
        return lambda logits, y: ce(logits, y) + 0.0 * torch.sqrt(logits.sum() * 0.0)


base = load_recipe("resnet9_cifar10")
plugins = [p for p in base.plugins if p.name != "onecycle"]
recipe = attrs.evolve(base, name="diverging", plugins=(PLUGIN, *plugins))
"""


@pytest.mark.parametrize("check_every", [1, 25])
def test_nan_guard_stops_at_the_first_bad_loss(
    tiny_cifar: Path, tmp_path: Path, check_every: int
) -> None:
    recipe = tmp_path / "diverging.py"
    recipe.write_text(NAN_RECIPE.replace("AT", "5").replace("PLUGIN", "PoisonedLR()"))
    out = tmp_path / "run"
    result = invoke(
        "run", recipe, *TINY, "--set", f"nan_guard.check_every={check_every}",
        "--data-dir", tiny_cifar, "--out", out,
    )  # fmt: skip
    # The 6th step (index 5) makes the parameters NaN; the 7th step's loss is the first NaN.
    assert result.exit_code == 3, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Error: Training diverged: the loss became nan at step 7 (epoch 2)" in result.stderr
    assert f"{out / CHECKPOINT_FOLDER / LAST} holds the last good state" in result.stderr
    assert "step 6's parameters are not finite numbers, so they were not saved" in result.output
    saved = final_state(out)
    assert saved["step"] == 4
    assert all(torch.isfinite(t).all() for t in saved["params"].values())


def test_nan_guard_catches_infinite_gradients_under_a_finite_loss(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    recipe = tmp_path / "diverging.py"
    recipe.write_text(NAN_RECIPE.replace("AT", "5").replace("PLUGIN", "InfiniteGradients()"))
    result = invoke("run", recipe, *TINY, "--data-dir", tiny_cifar, "--out", tmp_path / "run")
    assert result.exit_code == 3, result.output
    assert "the gradient norm became NaN or infinite at step 1 (epoch 1)" in result.stderr
    assert "no checkpoint was saved" in result.stderr


def test_nan_guard_leaves_a_healthy_run_alone(reference: Path) -> None:
    assert final_state(reference)["step"] == STEPS


# ---------------------------------------------------------------------------------------------
# 6. Ctrl-C and SIGTERM save the state and say how to continue

# The command in a process slow enough to be interrupted where a test wants, saying on stdout
# when it gets there. Slowing it changes no number. Environment variables set the moments:
# SLOW_BATCH: seconds every batch takes (the 4th says "step 4 starts"; 0.3 s by default);
# SLOW_STEP_4: seconds the 4th batch takes instead; SLOW_SAVE=N: the N-th checkpoint save says
# "save N is under way" in the write that passes its first 10 kB, and stays there for 30 s;
# SLOW_DATA=1: loading the data says "loading data" and takes 30 s. Each signal handler that
# returns says "received NAME" (os.write: a print in a handler could re-enter stdout's buffer).
SLOW_COMMAND = """
import os
import signal
import sys
import time
from hooktrain.run import checkpoints
from hooktrain.data import device as data
from hooktrain.data import sources

batch_seconds = float(os.environ.get("SLOW_BATCH", "0.3"))
step_4_seconds = float(os.environ.get("SLOW_STEP_4", batch_seconds))
slow_save = int(os.environ.get("SLOW_SAVE", "0"))
real_train_batch = data.DeviceData.train_batch
real_write = checkpoints._HashingWriter.write
real_load = sources.load_cifar10
real_signal = signal.signal
saves = []

def slow_train_batch(self, plan, index):
    if index == 3:
        print("step 4 starts", flush=True)
    time.sleep(step_4_seconds if index == 3 else batch_seconds)
    return real_train_batch(self, plan, index)

def slow_write(self, chunk):
    if not hasattr(self, "written"):
        self.written = 0
        saves.append(self)
    if len(saves) == slow_save and self.written < 10000 <= self.written + len(chunk):
        print(f"save {slow_save} is under way", flush=True)
        time.sleep(30)
    self.written += len(chunk)
    return real_write(self, chunk)

def slow_load(*args, **kwargs):
    print("loading data", flush=True)
    time.sleep(30)
    return real_load(*args, **kwargs)

def announcing_signal(number, handler):
    if not callable(handler):
        return real_signal(number, handler)

    def announce(received, frame):
        handler(received, frame)
        os.write(1, f"received {signal.Signals(received).name}\\n".encode())

    return real_signal(number, announce)

data.DeviceData.train_batch = slow_train_batch
checkpoints._HashingWriter.write = slow_write
if os.environ.get("SLOW_DATA"):
    sources.load_cifar10 = slow_load
signal.signal = announcing_signal
from hooktrain.cli import main
main(sys.argv[1:])
"""


class SlowRun:
    """``hooktrain`` in a child process slowed by SLOW_COMMAND; the test signals it."""

    def __init__(self, *args: str | Path, **slow: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", SLOW_COMMAND, *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **slow},
        )
        self.lines: list[str] = []

    def wait_for(self, line: str) -> None:
        assert self.process.stdout is not None
        for received in self.process.stdout:
            self.lines.append(received)
            if received.strip() == line:
                return
        raise AssertionError(f"{line!r} never came:\n{''.join(self.lines)}")

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    def finish(self) -> subprocess.CompletedProcess[str]:
        stdout, stderr = self.process.communicate(timeout=120)
        stdout = "".join(self.lines) + stdout
        return subprocess.CompletedProcess(
            self.process.args, self.process.returncode, stdout, stderr
        )


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_state_and_resume_finishes_the_same_run(
    reference: Path, tiny_cifar: Path, tmp_path: Path, signal_number: int
) -> None:
    out = tmp_path / "run"
    # No step checkpoints: what is saved inside the first epoch comes from the signal.
    args = [*TINY, "--set", "checkpoint.every_steps=0", "--data-dir", tiny_cifar, "--out", out]
    run = SlowRun("run", FLAGSHIP, *args)
    run.wait_for("step 4 starts")
    run.signal(signal_number)
    process = run.finish()
    stdout, stderr = process.stdout, process.stderr
    name = signal.Signals(signal_number).name
    assert process.returncode == 128 + signal_number, stdout + stderr
    assert "Traceback" not in stderr
    assert stderr.startswith(f"Error: Stopped by {name} at step ")
    assert stderr.strip().endswith(
        f"; continue from the last checkpoint with `hooktrain resume {out}`."
    )
    stopped_at = final_state(out)["step"]
    assert 3 < stopped_at < 6  # inside the first epoch, where no checkpoint was due
    assert f"at step {stopped_at} of {STEPS}" in stderr
    resumed = invoke("resume", out)
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming {out} at step {stopped_at} (epoch 0 done)" in resumed.output
    assert_same_state(final_state(out), final_state(reference))


# ---------------------------------------------------------------------------------------------
# 7. Bad input ends in one sentence; a run folder is only replaced with --overwrite
# (tests/test_fuzz_cli.py throws random input at the same doors)


@pytest.mark.parametrize(
    "args",
    [
        ["run", FLAGSHIP, "--seed", "x"],
        ["run", FLAGSHIP, "extra"],
        ["run", FLAGSHIP, "--bogus"],
        ["eval"],
    ],
)
def test_usage_mistakes_are_one_sentence(args: list[str]) -> None:
    assert_user_error(invoke(*args), f"see `hooktrain {args[0]} --help`")


@pytest.mark.parametrize(
    "setting",
    [
        "metrics.log_every=0",
        "onecycle.div_factor=0",
        "onecycle.pct_start=1.5",
        "grad_clip.max=-1",
        "grad_clip.max=1e300",
        "weight_decay.rate=-1",
        "checkpoint.every=0",
        "checkpoint.every_steps=-1",
        "nan_guard.check_every=0",
    ],
)
def test_plugin_settings_out_of_range_are_refused(tmp_path: Path, setting: str) -> None:
    key = setting.partition("=")[0]
    result = invoke("run", FLAGSHIP, "--set", setting, "--out", tmp_path / "run")
    assert_user_error(result, f"{key} must be", f"--set {key}=VALUE")
    assert not (tmp_path / "run").exists()


def test_a_run_folder_is_replaced_only_with_overwrite(
    reference: Path, tiny_cifar: Path, tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(reference, tmp_path / "run"))
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert_user_error(run_tiny(tiny_cifar, folder), "is not empty", "--overwrite")
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    torn = folder / f".{CONFIG_FILE}.x1.tmp"  # a write the old run was killed in
    torn.write_text("{")
    result = run_tiny(tiny_cifar, folder, "--overwrite", "--set", "epochs=1")
    assert result.exit_code == 0, result.output
    assert not torn.exists()
    assert final_state(folder)["step"] == STEPS // 2


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    result = run_tiny(tiny_cifar, folder, "--overwrite")
    assert_user_error(result, "holds files but no hooktrain run", "leaves it alone")
    assert (folder / "thesis.tex").read_text() == "years of work"


def test_a_run_folder_below_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = invoke("run", FLAGSHIP, "--out", tmp_path / "file" / "run")
    assert_user_error(result, "Cannot make the run folder", "pass another --out")


# ---------------------------------------------------------------------------------------------
# 8. What a kill in the middle of a write leaves behind is cleaned up, never in the way


def test_linking_a_checkpoint_onto_itself_leaves_no_temporary_name(tmp_path: Path) -> None:
    """After a kill inside a save, previous.pt and last.pt can be one file (the rotation ran)."""
    last, previous = tmp_path / LAST, tmp_path / PREVIOUS
    save_checkpoint({"w": torch.ones(2)}, last)
    os.link(last, previous)
    checkpoints.copy_checkpoint(last, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST, PREVIOUS]


def test_a_folder_left_with_only_a_half_written_config_takes_a_new_run(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".config.json.k1ll3d.tmp").write_text('{"reci')
    result = run_tiny(tiny_cifar, folder, "--set", "epochs=1")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.glob(".*")) == []


def test_resume_clears_half_written_files_of_the_killed_process(
    reference: Path, tmp_path: Path
) -> None:
    folder = unfinished_copy(reference, tmp_path)
    (folder / CHECKPOINT_FOLDER / BEST).unlink()
    (folder / CHECKPOINT_FOLDER / LAST).unlink()  # resume from previous.pt, step 10
    stale = [folder / ".metrics.json.k1ll3d.tmp", folder / CHECKPOINT_FOLDER / ".last.pt.x.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    assert invoke("resume", folder).exit_code == 0
    assert not any(path.exists() for path in stale)
    assert_same_state(final_state(folder), final_state(reference))


# ---------------------------------------------------------------------------------------------
# 9. Writes that really fail: a file-size limit, a full tmpfs, a read-only file system
#
# Each test runs the real `hooktrain` in a child process. RLIMIT_FSIZE makes write() fail with
# EFBIG (SIGXFSZ ignored) inside torch.save's own writes, where a full disk fails too; it works
# everywhere. A tmpfs and a read-only bind mount are mounted in a private mount namespace
# (`unshare --mount`, or `--map-root-user` when not root), which no other process sees; where
# this machine allows neither, those tests are skipped.


def hooktrain_process(
    *args: str | Path, prefix: tuple[str, ...] = (), file_size_limit: int | None = None
) -> subprocess.CompletedProcess[str]:
    """``hooktrain ARGS`` in a child process, after ``prefix``, with at most that file size."""

    def limit_file_size() -> None:
        if file_size_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    command = [*prefix, sys.executable, "-m", "hooktrain", *map(str, args)]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, preexec_fn=limit_file_size
    )


def assert_one_sentence(process: subprocess.CompletedProcess[str], exit_code: int) -> str:
    """The exit code, no traceback and one sentence on stderr: 'Error: ...'."""
    assert process.returncode == exit_code, process.stdout + process.stderr
    assert "Traceback" not in process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1, process.stderr
    assert lines[0].startswith("Error: ") and lines[0].endswith("."), lines[0]
    return lines[0]


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def stopped(tiny_cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference run stopped by SIGTERM after step 4: last.pt holds step 4, previous.pt 2."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    run = SlowRun(
        "run", FLAGSHIP, *TINY, "--data-dir", tiny_cifar, "--out", out, SLOW_BATCH="0",
        SLOW_STEP_4="2",
    )  # fmt: skip
    run.wait_for("step 4 starts")
    run.signal(signal.SIGTERM)
    process = run.finish()
    assert process.returncode == 128 + signal.SIGTERM, process.stdout + process.stderr
    assert final_state(out)["step"] == 4
    return out


def checkpoint_size(reference: Path) -> int:
    return (reference / CHECKPOINT_FOLDER / LAST).stat().st_size


def test_a_save_that_cannot_be_written_keeps_the_checkpoint_before_it(
    reference: Path, stopped: Path, tmp_path: Path
) -> None:
    """Every save after step 4 fails inside torch.save (EFBIG): last.pt (step 4) stays."""
    folder = Path(shutil.copytree(stopped, tmp_path / "run"))
    last = folder / CHECKPOINT_FOLDER / LAST
    before = last.read_bytes()
    # Room for config.json, metrics.json and TensorBoard's file, not for a checkpoint.
    process = hooktrain_process(
        "resume", folder, file_size_limit=checkpoint_size(reference) * 3 // 4
    )
    sentence = assert_one_sentence(process, 2)
    assert "its last checkpoint could not be written (File too large)" in sentence
    assert f"the checkpoint saved before it is intact in {last}" in sentence
    for step in (6, 8, 10, 12):
        assert f"warning: could not save step {step} to {last} (File too large)" in process.stdout
    assert last.read_bytes() == before
    assert load_checkpoint(last)["state"]["step"] == 4
    assert not list((folder / CHECKPOINT_FOLDER).glob(".*"))
    resumed = invoke("resume", folder)  # with room: nothing was lost
    assert resumed.exit_code == 0, resumed.output
    assert_same_state(final_state(folder), final_state(reference))


def test_a_config_that_cannot_be_written_stops_run_before_training(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = ["run", FLAGSHIP, *TINY, "--data-dir", tiny_cifar, "--out", out]
    sentence = assert_one_sentence(hooktrain_process(*args, file_size_limit=1000), 2)
    assert sentence.startswith(f"Error: Cannot write {out / CONFIG_FILE} (File too large)")
    assert not out.exists()  # run removes the folder it made


def test_a_config_that_cannot_be_written_leaves_a_resumed_run_as_it_was(
    stopped: Path, tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(stopped, tmp_path / "run"))
    before = contents(folder)
    sentence = assert_one_sentence(hooktrain_process("resume", folder, file_size_limit=1000), 2)
    assert sentence.startswith(f"Error: Cannot write {folder / CONFIG_FILE} (File too large)")
    assert "the files already there are as they were" in sentence
    assert contents(folder) == before


def test_logs_that_cannot_be_written_warn_and_training_goes_on(
    reference: Path, stopped: Path, tmp_path: Path
) -> None:
    """TensorBoard's folder is a file and metrics.json a folder, so both writes really fail
    (FileExistsError, IsADirectoryError): two warnings, and the run ends as it would have."""
    folder = Path(shutil.copytree(stopped, tmp_path / "run"))
    shutil.rmtree(folder / TENSORBOARD_FOLDER)
    (folder / TENSORBOARD_FOLDER).write_text("not a folder")
    (folder / METRICS_FILE).unlink(missing_ok=True)  # stopped before its first epoch ended
    (folder / METRICS_FILE).mkdir()
    process = hooktrain_process("resume", folder)
    assert process.returncode == 0, process.stdout + process.stderr
    assert process.stdout.count("warning: TensorBoard logging stopped") == 1
    assert f"warning: could not write {folder / METRICS_FILE}" in process.stdout
    assert "final test accuracy" in process.stdout
    assert (folder / TENSORBOARD_FOLDER).read_text() == "not a folder"
    assert_same_state(final_state(folder), final_state(reference))


@pytest.fixture(scope="module")
def private_mounts(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ...]:
    """The command prefix of a private mount namespace in which mounting works; else skip."""
    point = tmp_path_factory.mktemp("mount-probe")
    options = [("unshare", "--mount")] if os.geteuid() == 0 else []
    options.append(("unshare", "--mount", "--map-root-user"))
    for prefix in options:
        probe = [*prefix, "mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(point)]
        try:
            if subprocess.run(probe, capture_output=True, timeout=30).returncode == 0:
                return prefix
        except OSError:  # no unshare
            break
    pytest.skip("this machine lets this process mount nothing, even in a private namespace")


def in_private_mounts(prefix: tuple[str, ...], setup: str, after: str = "") -> tuple[str, ...]:
    """A prefix for :func:`hooktrain_process`: ``setup`` mounts, the command, then ``after``."""
    script = f'set -e; {setup}; set +e; "$@"; code=$?; {after or "true"}; exit $code'
    return (*prefix, "bash", "-c", script, "bash")


def test_a_full_disk_keeps_the_first_checkpoint_to_the_end(
    reference: Path, tiny_cifar: Path, tmp_path: Path, private_mounts: tuple[str, ...]
) -> None:
    """A tmpfs with room for one checkpoint: each save after the first fails and says so."""
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    size = checkpoint_size(reference) * 3 // 2
    prefix = in_private_mounts(
        private_mounts, f"mount -t tmpfs -o size={size} tmpfs {disk}", f"cp -a {disk} {kept}"
    )
    out = disk / "run"
    args = [*TINY, "--set", "metrics.tensorboard=false", "--data-dir", tiny_cifar, "--out", out]
    process = hooktrain_process("run", FLAGSHIP, *args, prefix=prefix)
    last = out / CHECKPOINT_FOLDER / LAST
    sentence = assert_one_sentence(process, 2)
    assert "its last checkpoint could not be written (No space left on device)" in sentence
    assert f"the checkpoint saved before it is intact in {last}" in sentence
    warnings = [line for line in process.stdout.splitlines() if "could not save" in line]
    assert warnings[0].startswith(f"warning: could not save step 4 to {last} (No space left")
    assert len(warnings) >= 5  # steps 4, 6 (best.pt too, if better), 8, 10, 12
    folder = kept / "run"
    assert load_checkpoint(folder / CHECKPOINT_FOLDER / LAST)["state"]["step"] == 2
    assert not list((folder / CHECKPOINT_FOLDER).glob(".*"))
    resumed = invoke("resume", folder)  # with room: nothing was lost
    assert resumed.exit_code == 0, resumed.output
    assert_same_state(final_state(folder), final_state(reference))


def test_a_full_disk_when_resuming_leaves_the_run_as_it_was(
    stopped: Path, tmp_path: Path, private_mounts: tuple[str, ...]
) -> None:
    """A tmpfs that holds the run and is full: the resume writes nothing, says so and stops."""
    source = Path(shutil.copytree(stopped, tmp_path / "source"))
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    setup = (
        f"mount -t tmpfs -o size=4m tmpfs {disk}; cp -a {source} {disk}/run; "
        f"cat /dev/zero > {disk}/filler 2>/dev/null || true"
    )
    prefix = in_private_mounts(private_mounts, setup, f"cp -a {disk}/run {kept}")
    process = hooktrain_process("resume", disk / "run", prefix=prefix)
    sentence = assert_one_sentence(process, 2)
    # config.json is the first file written, unless a lock on the folder is made before it.
    assert f"{disk / 'run'}" in sentence and "(No space left on device)" in sentence
    assert contents(kept) == contents(source)


@pytest.mark.parametrize("command", ["run", "resume"])
def test_a_read_only_run_folder_is_one_sentence(
    stopped: Path,
    tiny_cifar: Path,
    tmp_path: Path,
    private_mounts: tuple[str, ...],
    command: str,
) -> None:
    """An empty --out or a run to resume on a read-only file system: exit 2, files unchanged."""
    folder = tmp_path / "run"
    if command == "run":
        folder.mkdir()
        args: list[str | Path] = ["run", FLAGSHIP, *TINY, "--data-dir", tiny_cifar]
        args += ["--out", folder]
    else:
        shutil.copytree(stopped, folder)
        (folder / ".metrics.json.k1ll3d.tmp").write_text("left by a killed run")
        args = ["resume", folder]
    before = contents(folder)
    setup = f"mount --bind {folder} {folder}; mount -o remount,ro,bind {folder}"
    process = hooktrain_process(*args, prefix=in_private_mounts(private_mounts, setup))
    sentence = assert_one_sentence(process, 2)
    assert f"{folder}" in sentence and "(Read-only file system)" in sentence
    assert contents(folder) == before


# ---------------------------------------------------------------------------------------------
# 10. Signals that come at the worst moments: a second one, one before training


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_inside_the_save_the_first_started(
    reference: Path, tiny_cifar: Path, tmp_path: Path, signal_number: int
) -> None:
    """Saves at step 3 and at the stop after step 4; the second signal lands inside the write."""
    out = tmp_path / "run"
    args = [*TINY, "--set", "checkpoint.every_steps=3", "--data-dir", tiny_cifar, "--out", out]
    run = SlowRun("run", FLAGSHIP, *args, SLOW_STEP_4="2", SLOW_SAVE="2")
    name = signal.Signals(signal_number).name
    run.wait_for("step 4 starts")
    run.signal(signal_number)
    run.wait_for(f"received {name}")
    run.wait_for("save 2 is under way")
    run.signal(signal_number)
    sentence = assert_one_sentence(run.finish(), 128 + signal_number)
    assert sentence == (
        f"Error: Stopped at once by a second {name}; continue from the last checkpoint with "
        f"`hooktrain resume {out}`."
    )
    assert load_checkpoint(out / CHECKPOINT_FOLDER / LAST)["state"]["step"] == 3
    assert load_checkpoint(out / CHECKPOINT_FOLDER / PREVIOUS)["state"]["step"] == 3
    assert not list((out / CHECKPOINT_FOLDER).glob(".*"))
    resumed = invoke("resume", out)
    assert resumed.exit_code == 0, resumed.output
    assert_same_state(final_state(out), final_state(reference))


def test_two_sigterms_in_one_step_exit_as_sigterm(tiny_cifar: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [*TINY, "--data-dir", tiny_cifar, "--out", out]
    run = SlowRun("run", FLAGSHIP, *args, SLOW_BATCH="0", SLOW_STEP_4="30")
    run.wait_for("step 4 starts")
    run.signal(signal.SIGTERM)
    run.wait_for("received SIGTERM")
    run.signal(signal.SIGTERM)
    sentence = assert_one_sentence(run.finish(), 128 + signal.SIGTERM)
    assert sentence.startswith("Error: Stopped at once by a second SIGTERM; continue from")
    assert final_state(out)["step"] == 2  # the step 4 it was in was not saved


@pytest.mark.parametrize(
    ("moment", "signal_number"),
    [("recipe", signal.SIGINT), ("recipe", signal.SIGTERM), ("data", signal.SIGINT)],
)
def test_a_signal_before_training_is_one_sentence(
    tiny_cifar: Path, tmp_path: Path, moment: str, signal_number: int
) -> None:
    """Inside a recipe file being run, or while the data loads: nothing to save, nothing left."""
    recipe = tmp_path / "slow_recipe.py"
    recipe.write_text('import time\nprint("recipe runs", flush=True)\ntime.sleep(30)\n')
    out = tmp_path / "run"
    name = FLAGSHIP if moment == "data" else recipe
    run = SlowRun("run", name, *TINY, "--data-dir", tiny_cifar, "--out", out, SLOW_DATA="1")
    run.wait_for("loading data" if moment == "data" else "recipe runs")
    run.signal(signal_number)
    sentence = assert_one_sentence(run.finish(), 128 + signal_number)
    assert sentence == (
        f"Error: Interrupted by {signal.Signals(signal_number).name} before training started; "
        "nothing was saved, so run the same command again."
    )
    assert not out.exists()
