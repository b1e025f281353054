"""Data parallelism under torchrun: which process this is, the process group, agreement at start.

``torchrun --nproc-per-node N -m hooktrain run RECIPE`` starts N processes and tells each its
place through environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). Each process
trains one replica of the model on its shard of every global batch; the ``data_parallel``
plugin averages what the replicas compute inside the step (see
:func:`hooktrain.core.hookspecs.hooktrain_replicas`). This module holds only what torch does
not: reading the environment, choosing the backend and the device, and checking that every
process starts from the same state. Launching, rendezvous and restarts are torchrun's.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import attrs

from hooktrain.errors import HooktrainError

if TYPE_CHECKING:  # torch loads with the engine, not with the command line's --help
    import torch

# How long a collective waits for the other processes before failing, unless the environment
# sets HOOKTRAIN_COLLECTIVE_TIMEOUT (seconds). A process that dies is noticed at once (its
# sockets close, and torchrun stops the others); this bounds the wait for one that hangs.
DEFAULT_TIMEOUT_S = 300
TIMEOUT_VARIABLE = "HOOKTRAIN_COLLECTIVE_TIMEOUT"


@attrs.frozen
class Topology:
    """This process's place among the ones torchrun started (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """Whether several processes train the run together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files and prints its progress (rank 0)."""
        return self.rank == 0

    def echo(self, echo: Callable[[str], None]) -> Callable[[str], None]:
        """``echo`` in the main process; elsewhere a function that prints nothing, so a run
        of N processes prints each line once."""
        return echo if self.is_main else _print_nothing

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Topology:
        """The topology torchrun's environment variables describe (one process without them)."""
        environ = os.environ if environ is None else environ
        defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
        try:
            rank, world_size, local_rank = (int(environ.get(k, v)) for k, v in defaults.items())
        except ValueError as error:
            given = ", ".join(f"{k}={environ.get(k)!r}" for k in defaults)
            raise HooktrainError(
                f"The environment says {given}, which are not all whole numbers; start "
                "hooktrain with torchrun, or unset them."
            ) from error
        if not (world_size >= 1 and 0 <= rank < world_size and local_rank >= 0):
            raise HooktrainError(
                f"The environment says this is process {rank} of {world_size}, which cannot be; "
                "start hooktrain with torchrun, or unset RANK and WORLD_SIZE."
            )
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
        if world_size > 1 and missing:
            raise HooktrainError(
                f"The environment says WORLD_SIZE={world_size} but not {', '.join(missing)}, "
                "which torchrun sets for every process; start hooktrain with torchrun, or unset "
                "WORLD_SIZE."
            )
        return cls(rank, world_size, local_rank)


def _print_nothing(line: str) -> None:
    """The echo of the processes other than rank 0."""


def elastic_restart() -> bool:
    """Whether torchrun restarted this process after a failure (``--max-restarts``)."""
    count = os.environ.get("TORCHELASTIC_RESTART_COUNT", "")
    return count.isdecimal() and int(count) > 0


def collective_timeout() -> float:
    """Seconds a collective waits for the other processes (see ``DEFAULT_TIMEOUT_S``)."""
    text = os.environ.get(TIMEOUT_VARIABLE, "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise HooktrainError(
            f"{TIMEOUT_VARIABLE}={text!r} is not a number of seconds above 0; set it to one "
            f"(e.g. {DEFAULT_TIMEOUT_S}) or unset it."
        )
    return seconds


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` says a collective failed: a peer died, hung past the timeout, or the
    network broke (gloo raises plain RuntimeErrors that name it, NCCL torch's DistError)."""
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or any(
        word in str(error) for word in ("gloo", "NCCL", "Connection reset", "Connection closed")
    )


@contextlib.contextmanager
def process_group(topology: Topology, backend: str) -> Iterator[None]:
    """The default process group for the duration of a run; nothing when run alone."""
    if not topology.distributed:
        yield
        return
    import torch.distributed as dist

    if dist.is_initialized():  # a caller (a test, a notebook) set one up: it owns it
        yield
        return
    timeout = datetime.timedelta(seconds=collective_timeout())
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    # torchrun's store outlives a restart (--max-restarts): keys of each attempt apart, or a
    # restarted process reads the address a dead one published.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"hooktrain/attempt_{attempt}", store),
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over every process (outside the step: evaluation's totals)."""
    import torch.distributed as dist

    dist.all_reduce(tensor)
    return tensor


def agree_on_stop(signal_number: int | None, device: torch.device) -> int | None:
    """The stop signal any process received, agreed by all (one small all-reduce).

    A signal reaches the processes at slightly different moments; deciding alone, one could
    stop after a step that another has already passed, which then waits in the next step's
    collectives for a process that has gone.
    """
    import torch
    import torch.distributed as dist

    flag = torch.tensor([signal_number or 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def agree_on_start(step: int, tensors: list[torch.Tensor]) -> None:
    """Make every process start from rank 0's numbers, after checking they are at one step.

    Replicas initialised from one seed are equal already; the broadcast makes that a fact
    rather than a hope (another machine, another library build), and it is paid once.
    """
    import torch.distributed as dist

    steps: list[int | None] = [None] * dist.get_world_size()
    dist.all_gather_object(steps, step)
    if len(set(steps)) > 1:
        raise HooktrainError(
            f"The processes would start at different steps ({steps}, by rank): they read "
            "different checkpoints. Give every process the same run folder (a shared file "
            "system across machines) and start again."
        )
    for tensor in tensors:
        dist.broadcast(tensor, src=0)
