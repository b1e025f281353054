"""The built-in plugins against torch's own implementations, and the plugin contract."""

from __future__ import annotations

import itertools

import attrs
import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR

from hooktrain.config.recipe import Recipe
from hooktrain.core.context import BuildContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.optim import make_optimizer
from hooktrain.core.pieces import GradientTransform, LRSchedule
from hooktrain.core.plugin import (
    Plugin,
    call_order,
    contributions,
    make_plugin_manager,
    sole_contribution,
)
from hooktrain.errors import HooktrainError
from hooktrain.models import resnet9
from hooktrain.plugins.checkpoint import Checkpoint
from hooktrain.plugins.grad_clip import GradClip, clip_by_norm, clip_by_value
from hooktrain.plugins.metrics import Metrics
from hooktrain.plugins.onecycle import OneCycle, onecycle_schedule
from hooktrain.plugins.weight_decay import WeightDecay


def build_context(
    param_shapes: dict[str, torch.Size] | None = None,
    *,
    optimizer: str = "adam",
    max_lr: float = 0.01,
    epochs: int = 8,
    steps_per_epoch: int = 125,
) -> BuildContext:
    return BuildContext(
        recipe=Recipe(name="t", max_lr=max_lr, epochs=epochs),
        param_shapes=param_shapes or {},
        steps_per_epoch=steps_per_epoch,
        optimizer=make_optimizer(
            optimizer, betas=(0.9, 0.999), eps=1e-8, momentum=0.9, nesterov=True
        ),
    )


# --------------------------------------------------------------------------------------------
# onecycle
# --------------------------------------------------------------------------------------------


def torch_onecycle_lrs(
    max_lr: float,
    total_steps: int,
    pct_start: float,
    div_factor: float,
    final_div_factor: float,
    anneal: str,
    three_phase: bool,
) -> torch.Tensor:
    """The learning rate OneCycleLR gives each step, read before that step's scheduler.step()."""
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=max_lr)
    scheduler = OneCycleLR(
        optimizer,
        max_lr=max_lr,
        total_steps=total_steps,
        pct_start=pct_start,
        anneal_strategy=anneal,
        cycle_momentum=False,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        three_phase=three_phase,
    )
    lrs = []
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return torch.tensor(lrs, dtype=torch.float64)


def our_lrs(schedule: LRSchedule, total_steps: int) -> torch.Tensor:
    values = []
    for i in range(total_steps):
        lr = schedule(torch.tensor(i))
        assert lr.shape == ()
        assert lr.dtype.is_floating_point
        values.append(lr)
    return torch.stack(values).double()


# (max_lr, total_steps, pct_start, div_factor, final_div_factor)
ONECYCLE_CASES = [
    pytest.param(0.01, 125 * 8, 0.3, 25.0, 1e4, id="seed"),
    pytest.param(0.1, 50, 0.25, 10.0, 100.0, id="short"),
    pytest.param(1.0, 37, 0.4, 5.0, 1e3, id="fractional-phase-ends"),
    pytest.param(0.05, 10, 0.15, 25.0, 1e4, id="one-step-warmup"),
]


@pytest.mark.parametrize("three_phase", [False, True], ids=["two-phase", "three-phase"])
@pytest.mark.parametrize("anneal", ["cos", "linear"])
@pytest.mark.parametrize(
    ("max_lr", "total_steps", "pct_start", "div_factor", "final_div_factor"), ONECYCLE_CASES
)
def test_onecycle_schedule_matches_torch_onecyclelr(
    max_lr: float,
    total_steps: int,
    pct_start: float,
    div_factor: float,
    final_div_factor: float,
    anneal: str,
    three_phase: bool,
) -> None:
    args = (max_lr, total_steps, pct_start, div_factor, final_div_factor, anneal, three_phase)
    expected = torch_onecycle_lrs(*args)
    actual = our_lrs(onecycle_schedule(*args), total_steps)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


def test_onecycle_plugin_uses_the_recipe_max_lr_and_the_whole_run() -> None:
    plugin = OneCycle(
        pct_start=0.25, div_factor=10.0, final_div_factor=50.0, anneal="linear", three_phase=True
    )
    build = build_context(max_lr=0.05, epochs=3, steps_per_epoch=7)
    schedule = sole_contribution(
        make_plugin_manager([plugin]), "hooktrain_lr_schedule", build=build
    )
    assert build.total_steps == 21
    expected = torch_onecycle_lrs(0.05, 21, 0.25, 10.0, 50.0, "linear", True)
    torch.testing.assert_close(our_lrs(schedule, 21), expected, atol=1e-6, rtol=0)


def test_onecycle_plugin_defaults_give_the_seed_schedule() -> None:
    schedule = OneCycle().hooktrain_lr_schedule(build_context())
    expected = torch_onecycle_lrs(0.01, 1000, 0.3, 25.0, 1e4, "cos", False)
    torch.testing.assert_close(our_lrs(schedule, 1000), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("total_steps", "pct_start", "three_phase"),
    [
        (3, 0.3, False),  # warm-up would end before step 0
        (10, 0.1, False),  # warm-up ends at step 0: an empty phase
        (10, 0.1, True),
        (10, 0.55, True),  # the way back down ends at the last step: nothing left to anneal
        (10, 0.6, True),  # the way back down ends past the run
    ],
)
def test_onecycle_with_too_few_steps_for_a_phase_is_an_error(
    total_steps: int, pct_start: float, three_phase: bool
) -> None:
    with pytest.raises(HooktrainError, match="onecycle needs more steps"):
        onecycle_schedule(0.01, total_steps, pct_start, three_phase=three_phase)


def test_onecycle_plugin_with_too_short_a_run_is_an_error() -> None:
    build = build_context(epochs=1, steps_per_epoch=3)
    with pytest.raises(HooktrainError, match="onecycle needs more steps"):
        OneCycle().hooktrain_lr_schedule(build)


# --------------------------------------------------------------------------------------------
# grad_clip
# --------------------------------------------------------------------------------------------

SHAPES = [(3, 4), (5,), (2, 3, 3, 3), (1,), (), (7, 2)]


def random_grads(scale: float, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) * scale for shape in SHAPES]


def params_with_grads(grads: list[torch.Tensor]) -> list[nn.Parameter]:
    params = []
    for grad in grads:
        param = nn.Parameter(torch.zeros_like(grad))
        param.grad = grad.clone()
        params.append(param)
    return params


def torch_total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """What clip_grad_norm_ returns: the total norm before clipping."""
    return torch.nn.utils.clip_grad_norm_(params_with_grads(grads), max_norm=float("inf"))


def apply(
    transform: GradientTransform, grads: list[torch.Tensor]
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Run ``transform``, checking that it leaves its input lists and tensors alone."""
    before = [g.clone() for g in grads]
    params = [torch.full_like(g, 3.0) for g in grads]
    grad_list, param_list = list(grads), list(params)
    state = transform.init(param_list)
    new_grads, new_state, metrics = transform.update(
        grad_list, state, param_list, torch.tensor(0.01)
    )
    assert new_state == state == {}, "clipping keeps no state"
    assert grad_list == grads and len(param_list) == len(params)
    assert all(p is q for p, q in zip(param_list, params, strict=True))
    for grad, original in zip(grads, before, strict=True):
        assert torch.equal(grad, original)
    for param in params:
        assert torch.equal(param, torch.full_like(param, 3.0))
    assert len(new_grads) == len(grads)
    return new_grads, metrics


@pytest.mark.parametrize(
    ("scale", "clips"), [(1.0, True), (0.01, False)], ids=["clipping", "no-clipping"]
)
def test_clip_by_value_matches_clip_grad_value_(scale: float, clips: bool) -> None:
    limit = 0.1
    grads = random_grads(scale)
    largest = max(g.abs().max().item() for g in grads)
    assert (largest > limit) == clips

    params = params_with_grads(grads)
    torch.nn.utils.clip_grad_value_(params, limit)
    new_grads, metrics = apply(clip_by_value(limit), grads)

    for ours, param in zip(new_grads, params, strict=True):
        assert ours.shape == param.shape
        torch.testing.assert_close(ours, param.grad, atol=0, rtol=0)
    torch.testing.assert_close(metrics["grad_norm"], torch_total_norm(grads))
    assert set(metrics) == {"grad_norm"}


@pytest.mark.parametrize(
    ("scale", "clips"),
    [(1.0, True), (0.05, False), (0.0, False)],
    ids=["clipping", "no-clipping", "zero-gradients"],
)
def test_clip_by_norm_matches_clip_grad_norm_(scale: float, clips: bool) -> None:
    max_norm = 1.0
    grads = random_grads(scale, seed=1)
    params = params_with_grads(grads)
    total_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    assert (total_norm.item() > max_norm) == clips

    new_grads, metrics = apply(clip_by_norm(max_norm), grads)

    for ours, param, original in zip(new_grads, params, grads, strict=True):
        assert ours.shape == param.shape
        torch.testing.assert_close(ours, param.grad)
        if not clips:
            torch.testing.assert_close(ours, original)
    torch.testing.assert_close(metrics["grad_norm"], total_norm)
    assert set(metrics) == {"grad_norm"}
    if clips:
        clipped_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in new_grads]))
        torch.testing.assert_close(clipped_norm, torch.tensor(max_norm), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("plugin", "reference"),
    [
        (GradClip(), lambda p: torch.nn.utils.clip_grad_value_(p, 0.1)),
        (GradClip(max=0.5), lambda p: torch.nn.utils.clip_grad_value_(p, 0.5)),
        (GradClip(max=0.5, mode="norm"), lambda p: torch.nn.utils.clip_grad_norm_(p, 0.5)),
    ],
    ids=["default", "value", "norm"],
)
def test_grad_clip_plugin_picks_the_mode(plugin: GradClip, reference) -> None:
    grads = random_grads(1.0, seed=2)
    params = params_with_grads(grads)
    reference(params)
    [(name, transform)] = contributions(
        make_plugin_manager([plugin]), "hooktrain_gradient_transform", build=build_context()
    )
    assert name == "grad_clip"
    new_grads, _ = apply(transform, grads)
    for ours, param in zip(new_grads, params, strict=True):
        torch.testing.assert_close(ours, param.grad)


# --------------------------------------------------------------------------------------------
# weight_decay
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return resnet9(width=8)


def params_by_kind(model: nn.Module) -> dict[str, set[str]]:
    """Parameter names grouped by the type of module that owns them and their role."""
    kinds: dict[str, set[str]] = {"weight": set(), "bias": set(), "norm": set()}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                kinds["norm"].add(full)
            elif isinstance(module, nn.Conv2d | nn.Linear):
                kinds["weight" if param_name == "weight" else "bias"].add(full)
            else:
                raise AssertionError(f"unexpected parameter {full} of {type(module).__name__}")
    return kinds


def decay_rule(model: nn.Module, plugin: WeightDecay, optimizer: str = "adam"):
    shapes = {name: p.shape for name, p in model.named_parameters()}
    build = build_context(shapes, optimizer=optimizer)
    return sole_contribution(make_plugin_manager([plugin]), "hooktrain_weight_decay", build=build)


def decaying(model: nn.Module, plugin: WeightDecay, rate: float) -> set[str]:
    rule = decay_rule(model, plugin)
    rates = {name: rule.rate_of(name) for name, _ in model.named_parameters()}
    assert set(rates.values()) <= {0.0, rate}
    return {name for name, value in rates.items() if value == rate}


@pytest.mark.parametrize("rate", [1e-4, 5e-3])
def test_default_weight_decay_is_conv_and_linear_weights_only(
    model: nn.Module, rate: float
) -> None:
    kinds = params_by_kind(model)
    assert len(kinds["weight"]) == 9  # 8 convolutions and the linear head
    assert kinds["bias"] and kinds["norm"]
    assert decaying(model, WeightDecay(rate=rate), rate) == kinds["weight"]


def test_weight_decay_default_rate(model: nn.Module) -> None:
    assert decaying(model, WeightDecay(), 1e-4) == params_by_kind(model)["weight"]


def test_weight_decay_include_and_exclude_patterns(model: nn.Module) -> None:
    kinds = params_by_kind(model)
    everything = set().union(*kinds.values())
    head = {name for name in everything if name.startswith("6.")}
    assert head == {"6.3.weight", "6.3.bias"}

    # include replaces the default rule, whatever the dimensions
    assert decaying(model, WeightDecay(include=("6.*",)), 1e-4) == head
    # exclude wins over include
    included = WeightDecay(include=("*.weight",), exclude=("6.*",))
    expected = {name for name in everything if name.endswith(".weight")} - head
    assert decaying(model, included, 1e-4) == expected
    assert expected & kinds["norm"]  # BatchNorm scales, only because include asks for them
    # exclude alone narrows the default rule
    excluded = WeightDecay(exclude=("0.*", "*.block.1.*"))
    expected = {n for n in kinds["weight"] if not n.startswith("0.") and ".block.1." not in n}
    assert decaying(model, excluded, 1e-4) == expected
    assert len(expected) == len(kinds["weight"]) - 3
    # several include patterns add up
    several = WeightDecay(include=("0.0.weight", "6.3.bias"))
    assert decaying(model, several, 1e-4) == {"0.0.weight", "6.3.bias"}


@pytest.mark.parametrize("mode", ["auto", "coupled", "decoupled"])
@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_weight_decay_mode(model: nn.Module, mode: str, optimizer: str) -> None:
    rule = decay_rule(model, WeightDecay(mode=mode), optimizer)
    expected = mode == "decoupled" or (mode == "auto" and optimizer == "adamw")
    assert rule.decoupled is expected


# --------------------------------------------------------------------------------------------
# The plugin contract
# --------------------------------------------------------------------------------------------


@attrs.define
class Recorder(Plugin):
    """Appends its name to ``log`` at every epoch start and epoch end."""

    default_name = "recorder"
    log: list[str] = attrs.field(factory=list)

    @hookimpl
    def hooktrain_epoch_start(self) -> None:
        self.log.append(self.name)

    @hookimpl
    def hooktrain_epoch_end(self, state: object) -> None:
        self.log.append(self.name)


@attrs.define
class EarlyRecorder(Recorder):
    default_name = "early"

    @hookimpl(tryfirst=True)
    def hooktrain_epoch_start(self) -> None:
        self.log.append(self.name)


@attrs.define
class LateRecorder(Recorder):
    default_name = "late"

    @hookimpl(trylast=True)
    def hooktrain_epoch_start(self) -> None:
        self.log.append(self.name)


def constant(value: float) -> LRSchedule:
    return lambda step: torch.tensor(value)


@attrs.define
class ConstantLR(Plugin):
    default_name = "constant_lr"
    value: float = 0.1

    @hookimpl
    def hooktrain_lr_schedule(self, build: BuildContext) -> LRSchedule | None:
        return constant(self.value) if self.value else None


@attrs.define
class Scale(Plugin):
    """A gradient transform that multiplies every gradient; takes no hook arguments."""

    default_name = "scale"
    factor: float = 2.0

    @hookimpl
    def hooktrain_gradient_transform(self) -> GradientTransform:
        factor = self.factor

        def scale(
            grads: list[torch.Tensor], params: list[torch.Tensor]
        ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
            return torch._foreach_mul(grads, factor), {}

        return GradientTransform.stateless(self.name, scale)


@attrs.define
class Misspelled(Plugin):
    default_name = "misspelled"

    @hookimpl
    def hooktrain_epoch_ends(self, state: object) -> None:
        pass


@attrs.define
class WrongArgument(Plugin):
    default_name = "wrong_argument"

    @hookimpl
    def hooktrain_epoch_end(self, reprot: object) -> None:
        pass


def test_two_lr_schedules_are_an_error_naming_both_plugins() -> None:
    manager = make_plugin_manager([OneCycle(), ConstantLR(name="flat")])
    with pytest.raises(HooktrainError, match="lr schedule") as raised:
        sole_contribution(manager, "hooktrain_lr_schedule", build=build_context())
    assert "'onecycle'" in str(raised.value) and "'flat'" in str(raised.value)


def test_sole_contribution_ignores_plugins_that_answer_none() -> None:
    build = build_context()
    manager = make_plugin_manager([ConstantLR(name="silent", value=0.0), ConstantLR(value=0.3)])
    schedule = sole_contribution(manager, "hooktrain_lr_schedule", build=build)
    assert schedule(torch.tensor(0)).item() == pytest.approx(0.3)
    empty = make_plugin_manager([ConstantLR(value=0.0), GradClip()])
    assert sole_contribution(empty, "hooktrain_lr_schedule", build=build) is None


def test_two_plugins_with_one_name_are_an_error() -> None:
    with pytest.raises(HooktrainError, match="'grad_clip'"):
        make_plugin_manager([GradClip(), GradClip(mode="norm")])
    with pytest.raises(HooktrainError, match="'same'"):
        make_plugin_manager([Recorder(name="same"), GradClip(name="same")])


@pytest.mark.parametrize("order", [("a", "b", "c"), ("c", "a", "b"), ("b", "c", "a")])
def test_hooks_are_called_in_plugin_order(order: tuple[str, ...]) -> None:
    log: list[str] = []
    manager = make_plugin_manager([Recorder(name=name, log=log) for name in order])
    manager.hook.hooktrain_epoch_start(run=None, state=None)
    assert log == list(order)
    assert call_order(manager, "hooktrain_epoch_start") == list(order)
    log.clear()
    manager.hook.hooktrain_epoch_end(run=None, state=None, report=None)
    assert log == list(order)
    assert call_order(manager, "hooktrain_epoch_end") == list(order)


def test_tryfirst_and_trylast_move_implementations() -> None:
    log: list[str] = []
    plugins = [
        LateRecorder(log=log),
        Recorder(name="a", log=log),
        EarlyRecorder(log=log),
        Recorder(name="b", log=log),
    ]
    manager = make_plugin_manager(plugins)
    manager.hook.hooktrain_epoch_start(run=None, state=None)
    assert log == ["early", "a", "b", "late"]
    assert call_order(manager, "hooktrain_epoch_start") == log
    # The markers apply to one hook only: at epoch end all four keep the plugin order.
    log.clear()
    manager.hook.hooktrain_epoch_end(run=None, state=None, report=None)
    assert log == ["late", "a", "early", "b"]
    assert call_order(manager, "hooktrain_epoch_end") == log


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_metrics_first_and_checkpoint_last_at_epoch_end(order: tuple[int, ...]) -> None:
    plugins: list[Plugin] = [Metrics(), Recorder(name="plain"), Checkpoint()]
    manager = make_plugin_manager([plugins[i] for i in order])
    assert call_order(manager, "hooktrain_epoch_end") == ["metrics", "plain", "checkpoint"]


def test_misspelled_hook_is_an_error() -> None:
    with pytest.raises(HooktrainError, match="misspelled"):
        make_plugin_manager([GradClip(), Misspelled()])


def test_hook_argument_not_in_the_spec_is_an_error() -> None:
    with pytest.raises(HooktrainError, match="wrong_argument"):
        make_plugin_manager([WrongArgument()])


def test_gradient_transforms_are_collected_in_plugin_order() -> None:
    build = build_context()
    plugins: list[Plugin] = [
        GradClip(name="clip_norm", max=0.5, mode="norm"),
        Scale(factor=3.0),
        Recorder(),
        GradClip(name="clip_value", max=0.2),
    ]
    answers = contributions(
        make_plugin_manager(plugins), "hooktrain_gradient_transform", build=build
    )
    assert [name for name, _ in answers] == ["clip_norm", "scale", "clip_value"]
    reordered = contributions(
        make_plugin_manager(plugins[::-1]), "hooktrain_gradient_transform", build=build
    )
    assert [name for name, _ in reordered] == ["clip_value", "scale", "clip_norm"]

    # Each answer is its own plugin's transform.
    grads = random_grads(1.0, seed=3)
    expected = [
        apply(clip_by_norm(0.5), grads)[0],
        [g * 3.0 for g in grads],
        apply(clip_by_value(0.2), grads)[0],
    ]
    for (_, transform), reference in zip(answers, expected, strict=True):
        for ours, theirs in zip(apply(transform, grads)[0], reference, strict=True):
            torch.testing.assert_close(ours, theirs)


def test_plugin_names_and_settings() -> None:
    assert GradClip().name == "grad_clip"
    assert OneCycle().name == "onecycle"
    assert WeightDecay().name == "weight_decay"
    assert Recorder().name == "recorder"

    @attrs.define
    class Unnamed(Plugin):
        size: int = 1

    assert Unnamed().name == "unnamed"

    clip = GradClip(name="clip_2", max=1.0, mode="norm")
    assert clip.name == "clip_2"
    assert GradClip().settings() == {"name": "grad_clip", "max": 0.1, "mode": "value"}
    assert clip.settings() == {"name": "clip_2", "max": 1.0, "mode": "norm"}
    assert WeightDecay(rate=0.5, include=("a*",)).settings() == {
        "name": "weight_decay",
        "rate": 0.5,
        "mode": "auto",
        "include": ("a*",),
        "exclude": (),
    }
    # fields outside the constructor are state, not settings
    assert Checkpoint().settings() == {
        "name": "checkpoint",
        "every": 1,
        "every_steps": 0,
        "best_by": "auto",
    }
    assert set(Metrics().settings()) == {"name", "log_every", "tensorboard", "progress"}

    manager = make_plugin_manager([GradClip(), clip])
    assert call_order(manager, "hooktrain_gradient_transform") == ["grad_clip", "clip_2"]
