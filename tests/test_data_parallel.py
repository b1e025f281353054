"""Data parallelism under torchrun: 2 processes on the CPU (gloo) against 1.

The torchrun tests start real jobs (`python -m torch.distributed.run --standalone`), about
10 to 20 s each on 2 cores; the pieces they rest on (buckets, synchronised BatchNorm, sharded
data and dropout) are also checked in-process against torch's own implementations.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner
from torch import nn
from torch.utils._pytree import tree_leaves

from hooktrain.cli import main
from hooktrain.config.overrides import apply_overrides
from hooktrain.config.registry import load_recipe
from hooktrain.core.plugin import make_plugin_manager
from hooktrain.data.augment import Normalize, RandomCrop, RandomFlip
from hooktrain.data.device import DeviceData
from hooktrain.data.sources import load_cifar10
from hooktrain.errors import HooktrainError
from hooktrain.models import Dropout, hashed_uniform
from hooktrain.plugins.checkpoint import CHECKPOINT_FOLDER
from hooktrain.plugins.data_parallel import buckets, replica_mean, with_sync_batchnorm
from hooktrain.plugins.metrics import METRICS_FILE
from hooktrain.run.build import build_models
from hooktrain.run.checkpoints import load_checkpoint
from hooktrain.run.distributed import Topology
from hooktrain.run.loop import train

# Small and quick: 240 images in batches of 40 (2 processes x 20), 6 steps an epoch.
SMALL = ("--device", "cpu", "--set", "model.width=8", "--set", "batch_size=40")
SYNC = ("--set", "data_parallel.sync_batchnorm=true")
# For comparing numbers: SGD at a constant rate, without the conv biases BatchNorm cancels
# (their gradients are rounding noise), over a few steps: ResNet-9's max-pools pass the
# gradient to one of two values equal up to rounding, so two summation orders part ways after
# some steps on any two set-ups (seen from step 4 on here, one process against two), while
# the loss stays equal to the last digit.
COMPARABLE = ("model.conv_bias=false", "optimizer=sgd", "max_lr=0.002", "model.dropout=0.2")
FACTS = {"num_classes": 10, "num_outputs": 10, "input_shape": [3, 32, 32], "in_channels": 3}
# The flagship's augmentation: crop and flip draw per image, so a shard that took the wrong
# rows of the epoch's draws would differ from its part of the whole batch.
AUGMENT = (
    RandomCrop(size=32, pad=4, mode="reflect"),
    RandomFlip(),
    Normalize((0.5,) * 3, (0.25,) * 3),
)


def torchrun(*args: object, processes: int = 2, restarts: int = 0) -> subprocess.Popen:
    """A torchrun job of ``hooktrain ARGS`` on this machine, started and not waited for."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={processes}", f"--max-restarts={restarts}"]
    command += ["-m", "hooktrain", *map(str, args)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finished(job: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    output, _ = job.communicate(timeout=timeout)
    return job.returncode, output


def run_alone(*args: object) -> None:
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output


def final_state(run_dir: Path) -> dict:
    path = run_dir / CHECKPOINT_FOLDER / "last.pt"
    return torch.load(path, weights_only=True)["state"]


def assert_same_training(got: dict, expected: dict, tolerance: float = 1e-3) -> None:
    """Every parameter moved from its initial value as in ``expected``, within ``tolerance`` of
    the move (a wrong average, unsynchronised statistics or other dropout masks are off by
    tens of percent); BatchNorm's statistics within ``tolerance`` of their size."""
    assert got["step"] == expected["step"]
    recipe = apply_overrides(load_recipe("resnet9_cifar10"), ["model.width=8", *COMPARABLE])
    manager = make_plugin_manager(recipe.plugins)
    initial, _ = build_models(recipe, FACTS, torch.device("cpu"), manager)
    for name, start in initial.named_parameters():
        moved, want = got["params"][name] - start, expected["params"][name] - start
        error = ((moved - want).norm() / want.norm()).item()
        assert error <= tolerance, (name, error)
    for name, want in expected["buffers"].items():
        have = got["buffers"][name]
        if want.is_floating_point():
            error = ((have - want).norm() / want.norm()).item()
            assert error <= tolerance, (name, error)
        else:
            assert torch.equal(have, want), name


def _epochs(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / METRICS_FILE).read_text())["epochs"]


def files_of(run_dir: Path) -> list[tuple[str, int]]:
    """(folder, number of files) for every folder of a run: a second writer adds files."""
    counts: dict[str, int] = {}
    for path in run_dir.rglob("*"):
        if path.is_file():
            folder = str(path.parent.relative_to(run_dir))
            counts[folder] = counts.get(folder, 0) + 1
    return sorted(counts.items())


# ---------------------------------------------------------------------------------------------
# torchrun jobs


def test_two_processes_train_what_one_process_trains(tiny_cifar: Path, tmp_path: Path) -> None:
    """Synchronised BatchNorm and sharded dropout: the same numbers as one process, and the
    same files (rank 1 writes none)."""
    # Test batches of 30: each process evaluates two of the four and the sums are shared.
    settings = _options("epochs=1", "train_limit=120", "eval_batch_size=30", *COMPARABLE)
    common = ("run", "resnet9_cifar10", "--data-dir", tiny_cifar, *SMALL, *SYNC)
    common += ("--without", "onecycle", *settings)
    code, output = finished(torchrun(*common, "--out", tmp_path / "two"))
    assert code == 0, output
    assert "(2 processes x 20)" in output
    run_alone(*common, "--out", tmp_path / "one")
    assert_same_training(final_state(tmp_path / "two"), final_state(tmp_path / "one"))
    (two,), (one,) = (_epochs(tmp_path / name) for name in ("two", "one"))
    assert two["test_accuracy"] == one["test_accuracy"]
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-4)
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
    assert files_of(tmp_path / "two") == files_of(tmp_path / "one")
    assert output.count("epoch 1/1  train loss") == 1  # one process prints


def test_processes_hold_one_state_with_per_process_batchnorm(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    """BatchNorm normalises each shard alone, and the running statistics are averaged: every
    process ends with exactly the state rank 0 saved."""
    recipe_file = tmp_path / "fingerprints.py"
    recipe_file.write_text(
        textwrap.dedent(
            """
            import os

            import attrs
            import torch

            from hooktrain import Plugin, hookimpl
            from hooktrain.recipes.resnet9_cifar10 import recipe as flagship


            @attrs.define
            class SaveEveryRank(Plugin):
                default_name = "save_every_rank"

                @hookimpl
                def hooktrain_fit_end(self, run, state):
                    folder = os.environ["FINGERPRINTS"]
                    torch.save(state.to_dict(), f"{folder}/rank{run.rank}.pt")


            recipe = attrs.evolve(flagship, plugins=(*flagship.plugins, SaveEveryRank()))
            """
        )
    )
    os.environ["FINGERPRINTS"] = str(tmp_path)
    try:
        job = torchrun(
            "run",
            recipe_file,
            "--data-dir",
            tiny_cifar,
            *SMALL,
            "--set",
            "epochs=1",
            "--out",
            tmp_path / "run",
        )
        code, output = finished(job)
    finally:
        del os.environ["FINGERPRINTS"]
    assert code == 0, output
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    saved = final_state(tmp_path / "run")
    for state in ranks:
        for kind in ("params", "buffers", "opt_state"):
            assert torch.equal(
                torch.cat([t.flatten().double() for t in tree_leaves(state[kind])]),
                torch.cat([t.flatten().double() for t in tree_leaves(saved[kind])]),
            ), kind


def test_a_run_resumes_with_another_number_of_processes(tiny_cifar: Path, tmp_path: Path) -> None:
    """One process trains epoch 1 of 2, two processes resume it: the end matches one process
    running both epochs."""
    settings = ["model.width=8", "batch_size=40", "epochs=2", "train_limit=80", *COMPARABLE]
    recipe = apply_overrides(
        load_recipe("resnet9_cifar10"),
        [*settings, "data_parallel.sync_batchnorm=true"],
        without_plugins=["onecycle"],
    )
    options = {"data_dir": tiny_cifar, "device": "cpu", "echo": lambda line: None}
    train(recipe, out_dir=tmp_path / "split", stop_after_epoch=1, **options)
    code, output = finished(torchrun("resume", tmp_path / "split"))
    assert code == 0, output
    assert "resuming" in output
    train(recipe, out_dir=tmp_path / "whole", **options)
    assert_same_training(final_state(tmp_path / "split"), final_state(tmp_path / "whole"))


def _options(*settings: str) -> tuple[str, ...]:
    return tuple(part for setting in settings for part in ("--set", setting))


def test_a_killed_process_ends_the_job_within_seconds(tiny_cifar: Path, tmp_path: Path) -> None:
    """SIGKILL one process mid-run: the job ends (no hang), says so, and its last checkpoint
    resumes."""
    run_dir = tmp_path / "run"
    killed: list[float] = []

    def kill_rank_1(job: subprocess.Popen) -> None:
        os.kill(_process_of_rank(job.pid, 1), signal.SIGKILL)
        killed.append(time.monotonic())

    code, output = _interrupt_long_job(tiny_cifar, run_dir, kill_rank_1)
    ended_after = time.monotonic() - killed[0]
    assert code != 0
    assert ended_after < 60, ended_after
    assert "rank      : 1" in output and "SIGKILL" in output  # torchrun names the dead process
    assert "lost contact with the others" in output or "Stopped by SIGTERM" in output
    assert load_checkpoint(run_dir / CHECKPOINT_FOLDER / "last.pt")["state"]["step"] > 0


def test_torchrun_restarts_continue_the_run(tiny_cifar: Path, tmp_path: Path) -> None:
    """With --max-restarts, a killed process makes torchrun restart the job, and the
    restarted processes continue the run in --out from its last checkpoint to the end."""
    run_dir = tmp_path / "run"
    job = torchrun("run", "resnet9_cifar10", "--data-dir", tiny_cifar, *SMALL,
                   "--set", "epochs=40", "--out", run_dir, restarts=1)  # fmt: skip
    try:
        _wait_for_checkpoint(job, run_dir)
        os.kill(_process_of_rank(job.pid, 1), signal.SIGKILL)
        code, output = finished(job, timeout=300)
    finally:
        job.kill()
    assert code == 0, output
    assert f"resuming {run_dir} at step" in output
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    assert metrics["finished"] and [e["epoch"] for e in metrics["epochs"]] == list(range(1, 41))
    assert final_state(run_dir)["step"] == 40 * 6


def test_sigterm_to_torchrun_saves_where_the_processes_stopped(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    """torchrun passes SIGTERM on; the processes stop at the step they agree on, rank 0 saves
    there (mid-epoch) and the message says how to continue under torchrun."""
    run_dir = tmp_path / "run"
    code, output = _interrupt_long_job(
        tiny_cifar, run_dir, lambda job: job.send_signal(signal.SIGTERM)
    )
    assert code != 0
    stopped = re.search(r"Stopped by SIGTERM at step (\d+) of 3000", output)
    assert stopped, output
    assert f"`torchrun ... -m hooktrain resume {run_dir}`" in output
    saved = load_checkpoint(run_dir / CHECKPOINT_FOLDER / "last.pt")["state"]
    assert saved["step"] == int(stopped.group(1)), output


def test_a_signal_to_one_process_stops_all_at_one_step(tiny_cifar: Path, tmp_path: Path) -> None:
    """SIGTERM to rank 1 alone: the processes agree on the stop (every few steps), so rank 0
    stops at the same step and saves it, instead of waiting in the next step's all-reduce for
    a process that has gone (what a signal reaching two processes on either side of a step
    boundary did before)."""
    run_dir = tmp_path / "run"
    code, output = _interrupt_long_job(
        tiny_cifar, run_dir, lambda job: os.kill(_process_of_rank(job.pid, 1), signal.SIGTERM)
    )
    assert code != 0
    assert "lost contact" not in output, output
    stops = re.findall(r"Stopped by SIGTERM at step (\d+) of 3000", output)
    assert len(stops) == 2 and len(set(stops)) == 1, output  # both ranks, one step
    saved = load_checkpoint(run_dir / CHECKPOINT_FOLDER / "last.pt")["state"]
    assert saved["step"] == int(stops[0]), output


def _interrupt_long_job(
    data: Path, run_dir: Path, interrupt: Callable[[subprocess.Popen], None]
) -> tuple[int, str]:
    """Start a 2-process job of 500 epochs, ``interrupt`` it once it has saved, and return its
    exit code and output."""
    job = torchrun("run", "resnet9_cifar10", "--data-dir", data, *SMALL,
                   "--set", "epochs=500", "--out", run_dir)  # fmt: skip
    try:
        _wait_for_checkpoint(job, run_dir)
        interrupt(job)
        return finished(job, timeout=120)
    finally:
        job.kill()


def _wait_for_checkpoint(job: subprocess.Popen, run_dir: Path) -> None:
    deadline = time.monotonic() + 120
    while not (run_dir / CHECKPOINT_FOLDER / "last.pt").exists():
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0]
        time.sleep(0.2)


def _process_of_rank(launcher: int, rank: int) -> int:
    """The pid of the worker torchrun (pid ``launcher``) started as ``rank``."""
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for child in (task / "children").read_text().split():
            environment = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environment:
                return int(child)
    raise AssertionError(f"torchrun has no process of rank {rank}")


def test_a_recipe_without_data_parallel_is_refused_under_torchrun(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    job = torchrun("run", "resnet9_cifar10", "--data-dir", tiny_cifar, *SMALL,
                   "--without", "data_parallel", "--out", tmp_path / "run")  # fmt: skip
    code, output = finished(job)
    assert code != 0
    assert "has no plugin that keeps their replicas in agreement" in output
    assert "--with data_parallel" in output
    assert "[rank0]: Traceback" not in output  # torchrun prints its own when a worker fails
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


# ---------------------------------------------------------------------------------------------
# The pieces, in one process


@pytest.fixture
def group_of_one(tmp_path: Path) -> Iterator[dist.ProcessGroup]:
    """A gloo process group of this process alone, so the collectives run for real."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_matches_torch_batchnorm(group_of_one: dist.ProcessGroup) -> None:
    """Outputs, gradients and running statistics of torch's BatchNorm2d, over 3 steps."""
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(5, momentum=0.3)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    synced = with_sync_batchnorm(reference, group_of_one)
    for _ in range(3):
        x = torch.randn(6, 5, 4, 4) * 3 + 7  # far from zero mean, as activations are
        x_ref, x_sync = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_ref, out_sync = reference(x_ref), synced(x_sync)
        torch.testing.assert_close(out_sync, out_ref, rtol=1e-5, atol=1e-5)
        weights = torch.randn_like(out_ref)
        (out_ref * weights).sum().backward()
        (out_sync * weights).sum().backward()
        torch.testing.assert_close(x_sync.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(synced, name).grad, getattr(reference, name).grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(synced, name), getattr(reference, name))
    synced.eval(), reference.eval()
    torch.testing.assert_close(synced(x), reference(x))


def test_replica_mean_returns_the_tensors_in_their_shapes_and_layouts(
    group_of_one: dist.ProcessGroup,
) -> None:
    tensors = [
        torch.randn(8, 3, 3, 3).contiguous(memory_format=torch.channels_last),
        torch.randn(7),
        torch.tensor(2.5),
        torch.randn(4, 4, dtype=torch.float64),
    ]
    averaged = replica_mean(group_of_one, bucket_bytes=200)(tensors)
    for got, want in zip(averaged, tensors, strict=True):
        assert torch.equal(got, want)
        assert got.stride() == want.stride() and got.dtype == want.dtype


def test_buckets_keep_order_dtype_and_size() -> None:
    floats = [torch.zeros(10), torch.zeros(10), torch.zeros(30), torch.zeros(5)]
    mixed = [*floats, torch.zeros(3, dtype=torch.float64)]
    # 40, 40, 120, 20 bytes under a cap of 100: a tensor larger than the cap goes alone.
    assert buckets(mixed, bucket_bytes=100) == [[0, 1], [2], [3], [4]]
    assert buckets(floats, bucket_bytes=10**6) == [[0, 1, 2, 3]]


def test_shards_of_a_batch_are_the_batch(tiny_cifar: Path) -> None:
    dataset = load_cifar10(tiny_cifar)
    options = {"batch_size": 40, "augment": AUGMENT}
    whole = DeviceData(dataset, torch.device("cpu"), **options)
    halves = [
        DeviceData(dataset, torch.device("cpu"), **options, shard=r, shards=2) for r in (0, 1)
    ]
    plan = whole.epoch_plan(torch.Generator().manual_seed(3))
    for index in range(whole.steps_per_epoch):
        x, y = whole.train_batch(plan, index)
        parts = [half.train_batch(plan, index) for half in halves]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_a_batch_that_does_not_split_is_refused(tiny_cifar: Path) -> None:
    with pytest.raises(HooktrainError, match=r"does not split evenly over 3 processes.*=42 or 39"):
        DeviceData(load_cifar10(tiny_cifar), torch.device("cpu"), batch_size=40,
                   augment=AUGMENT, shards=3)  # fmt: skip


def test_sharded_dropout_draws_the_global_mask() -> None:
    seed, counter = torch.tensor(12345), torch.tensor(7)
    whole = hashed_uniform(seed, counter, torch.Size([6, 5]))
    parts = [hashed_uniform(seed, counter, torch.Size([2, 5]), shard, 3) for shard in range(3)]
    assert torch.equal(torch.cat(parts), whole)
    assert Dropout(0.5).shards == 1


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({}, Topology(0, 1, 0)),
        (
            {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
            | {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"},
            Topology(3, 4, 1),
        ),
    ],
)
def test_topology_from_torchrun_environment(environment: dict, expected: Topology) -> None:
    assert Topology.from_environment(environment) == expected


@pytest.mark.parametrize(
    "environment", [{"RANK": "x", "WORLD_SIZE": "2"}, {"RANK": "2", "WORLD_SIZE": "2"}]
)
def test_a_broken_torchrun_environment_is_refused(environment: dict) -> None:
    with pytest.raises(HooktrainError, match="start hooktrain with torchrun"):
        Topology.from_environment(environment)
