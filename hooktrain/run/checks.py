"""The checks a run must pass before it trains: a checkpoint that fits, seeds that can train
together, processes that can agree, a run that is not finished, and memory enough."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from hooktrain.config.recipe import Recipe
from hooktrain.core.plugin import call_order, make_plugin_manager
from hooktrain.errors import HooktrainError, short_reason
from hooktrain.run import distributed
from hooktrain.run.build import autocast_dtype_of
from hooktrain.run.checkpoint_checks import checkpoint_problem
from hooktrain.run.distributed import Topology


def check_usable(payload: dict[str, Any], recipe: Recipe, run_info: dict[str, Any]) -> None:
    """Refuse in a sentence a checkpoint whose contents do not fit a run of ``recipe``."""
    problem = checkpoint_problem(payload, recipe, run_info)
    if problem is not None:
        raise HooktrainError(
            f"The checkpoint cannot be used: {problem}; use it with the recipe, settings, data "
            "and hooktrain version that wrote it."
        )


def lockstep_recipe(recipe: Recipe, device: torch.device) -> Recipe:
    """``recipe`` as seeds trained together run it: in a contiguous memory layout.

    Under torch.func.vmap, channels_last BatchNorm inputs fail on CUDA and bf16 autocast casts
    some convolutions and BatchNorms and not others; ``auto`` layout becomes contiguous (the
    same numbers), while autocast, which changes the numbers, is refused in words.
    """
    autocast_dtype = autocast_dtype_of(recipe, device)
    if autocast_dtype is not None:
        raise HooktrainError(
            f"Seeds cannot be trained together in {str(autocast_dtype).removeprefix('torch.')} "
            "autocast (the default precision on CUDA), because under torch.func.vmap autocast "
            "casts some convolutions and BatchNorms and not others; add --set precision=fp32 "
            "to train them together, or train the seeds one at a time."
        )
    if recipe.memory_format == "channels_last":
        raise HooktrainError(
            "Seeds cannot be trained together in channels_last, which torch.func.vmap does not "
            "support for BatchNorm; set memory_format=auto or contiguous, or train the seeds "
            "one at a time."
        )
    return attrs.evolve(recipe, memory_format="contiguous")


def check_vmappable(model: nn.Module) -> None:
    random_layers = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0
    ]
    if random_layers:
        raise HooktrainError(
            f"Seeds cannot be trained together through torch's own dropout ({random_layers[0]}): "
            "under vmap its masks would depend on how many seeds run at once. Use "
            "hooktrain.models.Dropout in the model, or train the seeds one at a time."
        )


def check_data_parallel(recipe: Recipe, seeds: Sequence[int]) -> None:
    """A run of several processes can keep its replicas in agreement."""
    if len(seeds) > 1:
        raise HooktrainError(
            "Seeds cannot be trained together under torchrun; train them one after another "
            "(without --parallel-seeds), or run one torchrun job per seed."
        )
    if not call_order(make_plugin_manager(recipe.plugins), "hooktrain_replicas"):
        raise HooktrainError(
            f"torchrun started several processes, but the recipe {recipe.name!r} has no plugin "
            "that keeps their replicas in agreement, so each would train its own model; add "
            "--with data_parallel."
        )


def check_resumable(
    recipe: Recipe,
    out_dirs: Sequence[Path],
    resume: Sequence[dict[str, Any]],
    echo: Callable[[str], None],
) -> None:
    """Refuse checkpoints seeds cannot resume together from, or of a finished run; say what
    resumes."""
    steps_done = {payload["state"]["step"] for payload in resume}
    if len(steps_done) > 1:
        raise HooktrainError(
            "Seeds resumed together must have stopped at the same step; these stopped at "
            f"steps {sorted(steps_done)}. Resume each run on its own with hooktrain resume."
        )
    if resume[0]["state"]["epoch"] >= recipe.epochs:
        raise HooktrainError(
            f"The run in {out_dirs[0]} has finished (epoch {recipe.epochs} of "
            f"{recipe.epochs}); there is nothing to resume: start a new one with "
            "`hooktrain run`."
        )
    for out_dir, payload in zip(out_dirs, resume, strict=True):
        state = payload["state"]
        echo(f"resuming {out_dir} at step {state['step']} (epoch {state['epoch']} done)")


def out_of_memory(error: BaseException, device: torch.device) -> HooktrainError:
    """The sentence for a run that ran out of memory on ``device``."""
    return HooktrainError(
        f"The run does not fit in the memory of {device} ({short_reason(error)}); make the "
        "model or the batches smaller (--set width=..., --set batch_size=...)."
    )


@contextlib.contextmanager
def failures_in_words(device: torch.device, topology: Topology, run_dir: Path) -> Iterator[None]:
    """Turn the failures a user can act on into sentences: memory running out on ``device``,
    and (under torchrun) another process failing, which leaves this one's collectives hanging."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise out_of_memory(error, device) from error
    except RuntimeError as error:
        if "can't allocate memory" in str(error):  # the CPU allocator's words
            raise out_of_memory(error, device) from error
        if not distributed.is_collective_failure(error):
            raise
        raise HooktrainError(
            f"Process {topology.rank} of this run lost contact with the others "
            f"({type(error).__name__}: {short_reason(error)}): one of them failed or was "
            "stopped, so the run ends here; torchrun names the process that failed first. "
            f"Continue from the last checkpoint with `torchrun ... -m hooktrain resume "
            f"{run_dir}`."
        ) from error
