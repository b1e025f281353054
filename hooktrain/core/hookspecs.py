"""The whole plugin contract: every hook a plugin may implement, in the order the engine uses them.

A plugin is an object (usually an attrs class deriving from :class:`hooktrain.Plugin`) whose
methods are marked ``@hookimpl`` and named after the hooks below. It may implement any subset
of them, and each implementation may accept any subset of the hook's arguments.

There are two kinds of hook.

**Build hooks** run once, before training, and *contribute pure pieces* that the engine composes
into the training step: a learning-rate schedule, weight-decay rules, gradient transforms, a
loss. Pieces are plain functions of tensors: they must not read the clock, the host, or any
state outside their arguments, so the whole step stays one function that ``torch.compile`` can
take in one graph. Hooks marked *one claimant* may be answered by at most one plugin; two
answers are an error before training starts.

**Events** run during training and let plugins *observe* it for side effects (logging,
checkpoints). They receive the current :class:`~hooktrain.core.state.TrainState` and must not
change it. The engine's loop, with the events in the order they are emitted::

    build = BuildContext(recipe, param_shapes, steps_per_epoch, optimizer)
    step = compose(lr_schedule(build), weight_decay(build), gradient_transform(build)...,
                   loss(build))
    fit_start(run, state)
    for epoch in remaining epochs:
        epoch_start(run, state)
        for batch in epoch:
            state, metrics = step(state, batch)
            step_end(run, state, metrics)   # device tensors: do not sync every step
            if stop asked (Ctrl-C, SIGTERM): fit_stop(run, state, reason); end the process
        report = evaluate(eval_params(run, state) or state.params)
        epoch_end(run, state, report)
    fit_end(run, state, report)             # or fit_stop(run, state, reason) if stopped early

Within one hook, plugins are called in the recipe's order (the order of ``recipe.plugins``);
``@hookimpl(tryfirst=True)`` / ``@hookimpl(trylast=True)`` move an implementation to the front
or back where order matters (the built-in ``metrics`` plugin records an epoch first and the
``checkpoint`` plugin saves last, so a checkpoint holds every other plugin's updated state). The
resolved order is printed at the start of every run.

**Seeds in lockstep.** When several seeds train together (``hooktrain ablate --parallel-seeds``),
build hooks run once, on the first seed's plugins, and their pieces serve every seed (so a
piece must not depend on the seed). Each seed has its own plugin instances and run folder, and
every event is emitted once per seed with that seed's ``run`` and ``state``;
``run.lane``/``run.lanes`` tell a plugin which seed of how many it observes.

**Several processes.** Under torchrun every process builds the same pieces and runs every
event on its replica, whose state is equal in all processes after each step; ``run.rank`` and
``run.world_size`` say which process of how many observes. Only rank 0 (``run.is_main``) writes
files: a plugin that writes or prints sets ``main_process_only = True`` and its events run
there alone.

**Plugin state.** A plugin that keeps state across epochs (a best score, a history) returns it
from ``state_dict()`` as tensors, numbers, strings, lists and dicts, and takes it back in
``load_state_dict(state)``. The engine stores it in every checkpoint under the plugin's *name*
(not its class, so two instances never collide) and restores it on resume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import torch

    from hooktrain.core.context import BuildContext, EpochReport, RunContext
    from hooktrain.core.pieces import (
        DecayRule,
        GradientTransform,
        LossFn,
        LRSchedule,
        Replicas,
    )
    from hooktrain.core.state import TrainState

PROJECT = "hooktrain"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------------------------
# Build hooks: contribute pure pieces of the step (called once, before training)
# --------------------------------------------------------------------------------------------


@hookspec
def hooktrain_lr_schedule(build: BuildContext) -> LRSchedule | None:
    """Return the learning rate as a function of the step count. *One claimant.*

    The schedule receives the index of the step being taken (a 0-d int64 tensor on the device,
    0 for the first step) and returns a 0-d float tensor. It runs inside the step, so it must be
    built from tensor operations only. Without a claimant the learning rate is the constant
    ``recipe.max_lr``.
    """


@hookspec
def hooktrain_weight_decay(build: BuildContext) -> DecayRule | None:
    """Return which parameters decay and by how much. *One claimant.*

    The :class:`~hooktrain.core.pieces.DecayRule` maps each parameter *name* to a rate and says
    whether decay is coupled (added to the gradient after every gradient transform, as
    ``torch.optim.Adam(weight_decay=...)`` does) or decoupled (parameters shrink by
    ``lr * rate`` before the update, as ``torch.optim.AdamW`` does). Without a claimant nothing
    decays.
    """


@hookspec
def hooktrain_gradient_transform(build: BuildContext) -> GradientTransform | None:
    """Return a function that rewrites the gradients before the optimizer sees them.

    Every plugin's transform is applied, in plugin order. A transform receives the gradients and
    the parameters as lists in ``build.param_names`` order and returns the new gradients and a
    dict of 0-d metric tensors (e.g. the gradient norm) that joins the step's metrics.
    """


@hookspec
def hooktrain_loss(build: BuildContext) -> LossFn | None:
    """Return the training loss as ``loss(logits, targets) -> 0-d tensor``. *One claimant.*

    Without a claimant the loss is the task's (cross-entropy for classification, MSE for
    regression). Evaluation always reports the task's own loss, so test losses stay comparable
    across plugins.
    """


@hookspec
def hooktrain_replicas(build: BuildContext) -> Replicas | None:
    """Return how data-parallel replicas stay in agreement inside the step. *One claimant.*

    Under torchrun every process trains a replica of the model on its shard of each global
    batch. The :class:`~hooktrain.core.pieces.Replicas` answer averages the replicas'
    gradients before every gradient transform runs (so clipping, guards and decay see the
    global batch's gradient), and their loss and buffers after it, and may swap the training
    model's layers (synchronised BatchNorm). The ``data_parallel`` plugin answers when there
    are several processes and passes (None) in one; a run of several processes without an
    answer is refused before training, since its replicas would drift apart.
    """


# --------------------------------------------------------------------------------------------
# Events: observe the run (called during training; must not change the state)
# --------------------------------------------------------------------------------------------


@hookspec
def hooktrain_fit_start(run: RunContext, state: TrainState) -> None:
    """Called once before the first step of this process, after any resume has been loaded.

    ``state.epoch`` and ``state.step`` say where training starts (0 for a new run).
    """


@hookspec
def hooktrain_epoch_start(run: RunContext, state: TrainState) -> None:
    """Called before the first step of each epoch; ``state.epoch`` is the 0-based epoch."""


@hookspec
def hooktrain_step_end(
    run: RunContext, state: TrainState, metrics: dict[str, torch.Tensor]
) -> None:
    """Called after every training step with the step's metrics as 0-d device tensors.

    ``metrics`` holds ``loss`` and ``lr`` and whatever gradient transforms added (``grad_norm``).
    Reading a value (``.item()``, ``float()``) waits for the device: accumulate on the device and
    read every N steps instead, as the ``metrics`` plugin does.
    """


@hookspec(firstresult=True)
def hooktrain_eval_params(run: RunContext, state: TrainState) -> dict[str, torch.Tensor] | None:
    """Called before each evaluation: parameters to evaluate instead of ``state.params``.

    *First answer wins* (None passes). The ``ema`` plugin answers with its moving average of the
    weights; the model's buffers (BatchNorm statistics) stay the state's. Training continues
    from ``state``, whatever is evaluated. ``hooktrain eval`` asks it too, of plugins restored
    from the checkpoint, with ``run`` None.
    """


@hookspec
def hooktrain_epoch_end(run: RunContext, state: TrainState, report: EpochReport) -> None:
    """Called after each epoch's training and evaluation.

    ``state.epoch`` already counts the finished epoch; ``report`` has the epoch's mean training
    loss, the test loss and accuracy, and the epoch's wall time.
    """


@hookspec
def hooktrain_fit_end(run: RunContext, state: TrainState, report: EpochReport) -> None:
    """Called once when training finishes, with the final epoch's report."""


@hookspec
def hooktrain_fit_stop(run: RunContext, state: TrainState, reason: str) -> None:
    """Called instead of fit_end when this process stops before the run's last epoch.

    ``reason`` says why (``"SIGINT"``, ``"SIGTERM"``, ``"stop_after_epoch"``). ``state`` may be
    in the middle of an epoch; it is the state to resume from, so a plugin saves here what must
    survive (``checkpoint`` writes ``last.pt``) and closes what it opened. A run that fails
    (an exception, ``nan_guard`` stopping a diverged run) gets neither call.
    """
