"""The whole plugin contract: every hook a plugin may implement, in the order the engine uses them.

A plugin is an object (usually an attrs class deriving from :class:`hooktrain.Plugin`) whose
methods are marked ``@hookimpl`` and named after the hooks below. It may implement any subset
of them, and each implementation may accept any subset of the hook's arguments.

There are two kinds of hook.

**Build hooks** run before training and *contribute pure pieces* that the engine composes
into the training step: the optimizer, gradient transforms, a learning-rate schedule, weight
decay, parameter groups, a loss, batch transforms, gradient-function wrappers, evaluation views;
and, once per seed, the model and its initial parameters. Pieces are plain functions of
tensors: they must not read the clock, the host, or any state outside their arguments, so the
whole step stays one function that ``torch.compile`` can take in one graph and ``vmap`` can
batch over seeds. State a piece needs across steps lives in the training state (a gradient
transform's ``init``); randomness comes from the state's key (``hooktrain.core.pieces.Draws``).
Hooks marked *one claimant* may be answered by at most one plugin; two answers are an error
before training starts.

**Events** run during training and let plugins *observe* it for side effects (logging,
checkpoints, metrics, a request to stop). They receive the current
:class:`~hooktrain.core.state.TrainState` and must not change it. The engine's loop, with the
hooks in the order they are called::

    model = model(recipe, built model)...                      # build: each plugin in turn
    build = BuildContext(recipe, param_shapes, steps_per_epoch, optimizer, task, facts)
    chain = gradient_transform(build)... -> optimizer(build) -> ...   # printed at the start
    step = compose(chain, lr_schedule, weight_decay, param_groups, loss, batch_transform...,
                   wrap_gradients..., replicas)
    state = initial state of initial_params(build, params, buffers, data)...   # per seed
    fit_start(run, state)
    for epoch in remaining epochs:
        epoch_start(run, state)
        for batch in epoch:
            state, metrics = step(state, batch)   # batch transforms, gradients, chain
            step_end(run, state, metrics)   # device tensors: do not sync every step
            if stop asked (Ctrl-C, SIGTERM): fit_stop(run, state, reason); end the process
        for split in (val,) test:
            evaluate(eval_params(run, state) or state, eval_views(build))
                eval_outputs(run, state, split, outputs, targets)   # every batch
            eval_metrics(run, state, split)          # plugins' metrics join the report
        epoch_end(run, state, report)
        if should_stop(run, state, report): break   # the run ends here, finished
    fit_end(run, state, report, stop_reason)   # or fit_stop(run, state, reason) for a signal

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
    from torch import nn

    from hooktrain.config.recipe import Recipe
    from hooktrain.core.context import BuildContext, EpochReport, RunContext
    from hooktrain.core.optim import Optimizer
    from hooktrain.core.pieces import (
        BatchTransform,
        DecayRule,
        EvalViews,
        GradientTransform,
        LossFn,
        LRSchedule,
        ParamGroups,
        Replicas,
    )
    from hooktrain.core.state import TrainState
    from hooktrain.core.step import GradientWrapper
    from hooktrain.data.device import DeviceData

PROJECT = "hooktrain"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------------------------
# Build hooks: the model and its initial parameters (called for each seed's model)
# --------------------------------------------------------------------------------------------


@hookspec
def hooktrain_model(recipe: Recipe, model: nn.Module) -> nn.Module | None:
    """Return the model to train instead of ``model`` (a layer swap), or None to keep it.

    Called in plugin order, each plugin receiving the previous one's answer, on every model the
    run builds from the recipe (each seed's, and the one ``hooktrain eval`` builds), after the
    recipe's model factory and before the model goes to the device. The global torch generator
    follows the run's seed here, so new layers initialise reproducibly.
    """


@hookspec
def hooktrain_initial_params(
    build: BuildContext,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    data: DeviceData,
) -> dict[str, torch.Tensor] | None:
    """Return new starting values for some parameters or buffers, by name, or None.

    Called in plugin order for each seed of a new run (not on resume), each plugin seeing the
    previous ones' changes, before the gradient chain's state is made from the parameters.
    ``data`` is the run's data (``data.train.inputs``: whitening the first convolution from
    training patches, as airbench does); the global torch generator follows the seed. Values
    keep their names' shapes and dtypes.
    """


# --------------------------------------------------------------------------------------------
# Build hooks: contribute pure pieces of the step (called once, before training)
# --------------------------------------------------------------------------------------------


@hookspec
def hooktrain_optimizer(build: BuildContext) -> Optimizer | None:
    """Return the functional optimizer, an (init, update) pair. *One claimant.*

    Without a claimant it is the recipe's ``optimizer`` (adam, adamw or sgd, built by
    :func:`hooktrain.core.optim.recipe_optimizer` and passed in ``build.optimizer``). The
    optimizer ends the gradient transforms of the chain: ``update(grads, state, params, lr)``
    returns the parameters' updates (new = params + updates) and its new state, which lives in
    ``TrainState.opt_state``. ``build.groups`` holds the parameter groups, if a plugin made any.
    """


@hookspec
def hooktrain_param_groups(build: BuildContext) -> ParamGroups | None:
    """Return groups of parameters by name, each with a learning-rate scale. *One claimant.*

    The engine adds a ``param_groups`` member to the chain right after the optimizer (and
    decoupled weight decay) that multiplies each group's updates by its ``lr_scale`` (airbench
    trains BatchNorm biases 64 times faster) and multiplies weight decay rates by the groups'
    ``decay_scale``; the optimizer and later build hooks see the groups as ``build.groups``.
    """


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
    whether decay is coupled (added to the gradient after every other gradient transform, as
    ``torch.optim.Adam(weight_decay=...)`` does) or decoupled (``lr * rate * param`` taken off
    the update right after the optimizer, as ``torch.optim.AdamW`` does). It is the chain's
    ``weight_decay`` member. Without a claimant nothing decays.
    """


@hookspec
def hooktrain_gradient_transform(build: BuildContext) -> GradientTransform | None:
    """Return a member of the gradient chain: an (init, update) pair with a name.

    Every plugin's member joins the chain, in plugin order: before the optimizer, rewriting the
    gradients (``grad_clip``, ``nan_guard``), or with ``after_optimizer`` after it, rewriting
    the parameter updates (``lookahead``). ``update(updates, state, params, lr)`` receives lists
    in ``build.param_names`` order and returns the new updates, its new state and a dict of 0-d
    metric tensors that joins the step's metrics. Its state (``init(params)``) is kept in
    ``TrainState.transforms[name]``: checkpointed, resumed exactly and separate per seed. The
    chain is printed at the start of every run (``chain: nan_guard -> grad_clip -> adam``).
    """


@hookspec
def hooktrain_loss(build: BuildContext) -> LossFn | None:
    """Return the training loss as ``loss(logits, targets) -> 0-d tensor``. *One claimant.*

    Without a claimant the loss is the task's (cross-entropy for classification, MSE for
    regression). Evaluation always reports the task's own loss, so test losses stay comparable
    across plugins.
    """


@hookspec
def hooktrain_batch_transform(build: BuildContext) -> BatchTransform | None:
    """Return a function that rewrites each augmented training batch inside the step.

    ``transform(x, y, draws) -> (x, y)`` runs in the step before the gradients, every plugin's
    in plugin order (mixup, cutmix). It must be pure tensor work; its randomness comes from
    ``draws`` (uniform numbers keyed by the state), so a resumed run draws the same and every
    seed trained together draws its own. Classification targets may become class
    probabilities of shape (examples, classes), which the task's loss accepts. Under torchrun
    each replica transforms its share of the batch.
    """


@hookspec
def hooktrain_wrap_gradients(build: BuildContext) -> GradientWrapper | None:
    """Return ``wrap(gradients) -> gradients``: a new way to compute the batch's gradients.

    ``gradients(params, buffers, x, y) -> (grads, loss, new_buffers)`` is the model's loss and
    its gradients by parameter name; a wrapper may call it several times (``sam``: at the
    weights and at an adversarial neighbour; ``grad_accumulation``: once per micro-batch).
    Wrappers apply in plugin order, the first innermost. One step is still one optimizer step,
    so schedules count optimizer steps.
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


@hookspec
def hooktrain_eval_views(build: BuildContext) -> EvalViews | None:
    """Return the views evaluation scores each batch by (test-time augmentation). *One claimant.*

    ``views(x) -> [(view, weight), ...]``; the outputs evaluated are the weighted sum of the
    model's outputs on the views (airbench's multi-crop: the image, its mirror and shifted
    copies). Without a claimant the batch itself is scored, or the mean over it and its mirror
    image with the recipe's ``tta_flip`` (which a claimant refuses to share the job with).
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
    """Called before each evaluation: parameters (and buffers) to evaluate instead of the state's.

    *First answer wins* (None passes). Names the answer leaves out keep the state's values.
    The ``ema`` plugin answers with its moving average of the weights; ``swa`` with its average
    and the BatchNorm statistics recomputed for it. Training continues
    from ``state``, whatever is evaluated. ``hooktrain eval`` asks it too, of plugins restored
    from the checkpoint, with ``run`` None.
    """


@hookspec
def hooktrain_eval_outputs(
    run: RunContext, state: TrainState, split: str, outputs: torch.Tensor, targets: torch.Tensor
) -> None:
    """Called for every evaluated batch with the model's outputs and the targets on the device.

    ``split`` is ``"val"`` or ``"test"``; ``outputs`` are those the metrics are computed from
    (float32 or wider, after the evaluation views). Accumulate on the device (a confusion
    matrix) and read once in :func:`hooktrain_eval_metrics`. Under torchrun each process sees
    its share of the batches. Evaluation returns outputs only when a plugin implements this.
    """


@hookspec
def hooktrain_eval_metrics(
    run: RunContext, state: TrainState, split: str
) -> dict[str, float] | None:
    """Called after each split is evaluated: metrics to add to the epoch's report.

    Each name joins the report as ``SPLIT_NAME`` (``test_class_3_accuracy``), so ``metrics``
    logs it to the console, metrics.json and TensorBoard, checkpoints and early stopping can
    choose by it and ablations can compare it. A name the task already reports is refused.
    """


@hookspec
def hooktrain_log_scalars(run: RunContext, scalars: dict[str, float], step: int) -> None:
    """Called by ``run.log(scalars, step)``: where plugins' own figures go.

    The ``metrics`` plugin writes them to the run's TensorBoard (one tag each); any plugin
    calls ``run.log`` to reach every logger the recipe has, and a logger plugin implements
    this hook to receive them.
    """


@hookspec
def hooktrain_epoch_end(run: RunContext, state: TrainState, report: EpochReport) -> None:
    """Called after each epoch's training and evaluation.

    ``state.epoch`` already counts the finished epoch; ``report`` has the epoch's mean training
    loss, the test loss and accuracy (none on an epoch the recipe's ``eval_every`` skips), and
    the epoch's wall time.
    """


@hookspec
def hooktrain_should_stop(run: RunContext, state: TrainState, report: EpochReport) -> str | None:
    """Called after each epoch's end: a reason to stop the run here, or None to go on.

    Any reason ends the run cleanly after this epoch: fit_end gets it as ``stop_reason``, the
    run folder is marked finished (``hooktrain resume`` does not train it again), metrics.json
    records the reason, the process exits 0, and an ablation goes on to its next run. With
    seeds in lockstep the seed that stops leaves the group; the others go on. Under torchrun
    every process must decide alike (evaluation's figures are the same in all of them).
    """


@hookspec
def hooktrain_fit_end(
    run: RunContext, state: TrainState, report: EpochReport, stop_reason: str | None
) -> None:
    """Called once when training finishes, with the final epoch's report.

    ``stop_reason`` is None when the run trained every epoch, else what a plugin's
    :func:`hooktrain_should_stop` said.
    """


@hookspec
def hooktrain_fit_stop(run: RunContext, state: TrainState, reason: str) -> None:
    """Called instead of fit_end when this process stops before the run's last epoch.

    ``reason`` says why (``"SIGINT"``, ``"SIGTERM"``, ``"stop_after_epoch"``). ``state`` may be
    in the middle of an epoch; it is the state to resume from, so a plugin saves here what must
    survive (``checkpoint`` writes ``last.pt``) and closes what it opened. A run that fails
    (an exception, ``nan_guard`` stopping a diverged run) gets neither call.
    """
