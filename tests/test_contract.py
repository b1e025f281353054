"""The widened plugin contract, hook by hook where no built-in plugin shows it: the model hook,
parameter groups, evaluation views, plugin metrics and logging, what eval_params may answer,
and the ablation that varies step-changing plugins."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import attrs
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from hooktrain import (
    BuildContext,
    HooktrainError,
    ParamGroups,
    Plugin,
    apply_overrides,
    evaluate_checkpoint,
    hookimpl,
    load_checkpoint,
    load_recipe,
    train,
)
from hooktrain.cli import main
from hooktrain.core.evaluate import build_evaluate
from hooktrain.core.optim import sgd
from hooktrain.core.plugin import make_plugin_manager
from hooktrain.core.state import TrainState
from hooktrain.core.step import StepPieces, build_step, constant_schedule
from hooktrain.core.task import Classification
from hooktrain.core.transforms import Chain, lr_scale_member
from hooktrain.plugins.metrics import TENSORBOARD_FOLDER
from hooktrain.run.build import build_context, compose_chain

TINY = ["model.width=4", "batch_size=40", "eval_batch_size=100", "metrics.progress=false"]


def tiny(*extra: str, plugins: tuple[Plugin, ...] = ()):
    recipe = apply_overrides(load_recipe("resnet9_cifar10"), [*TINY, *extra])
    return attrs.evolve(recipe, plugins=(*recipe.plugins, *plugins))


@attrs.define
class Gelu(Plugin):
    """Swap every ReLU of the model for a GELU (a layer swap at build time)."""

    default_name = "gelu"

    @hookimpl
    def hooktrain_model(self, model: nn.Module) -> nn.Module:
        for parent in model.modules():
            for name, child in parent.named_children():
                if isinstance(child, nn.ReLU):
                    setattr(parent, name, nn.GELU())
        return model


def test_the_model_hook_swaps_layers_for_training_resume_and_eval(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    recipe = tiny("epochs=2", plugins=(Gelu(),))
    out = tmp_path / "gelu"
    trained = train(recipe, out_dir=out, data_dir=tiny_cifar, device="cpu", stop_after_epoch=1)
    assert any(isinstance(m, nn.GELU) for m in trained.model.modules())
    assert not any(isinstance(m, nn.ReLU) for m in trained.model.modules())
    resumed = train(
        recipe,
        out_dir=out,
        data_dir=tiny_cifar,
        device="cpu",
        resume=load_checkpoint(out / "checkpoints" / "last.pt"),
    )
    straight = train(recipe, out_dir=tmp_path / "straight", data_dir=tiny_cifar, device="cpu")
    for name, tensor in straight.state.params.items():
        assert torch.equal(resumed.state.params[name], tensor), name
    # hooktrain eval rebuilds the model through the plugin: the same figures as the run.
    payload = load_checkpoint(out / "checkpoints" / "last.pt")
    here = sys.modules[__name__]  # where the plugin class comes from, as a recipe file's would
    figures = evaluate_checkpoint(payload, tiny_cifar, device="cpu", recipe_module=here)
    assert figures["accuracy"] == pytest.approx(resumed.report["test_accuracy"], abs=1e-12)
    # The same first epoch without the plugin trains another model.
    plain = train(
        tiny("epochs=2"), out_dir=tmp_path / "plain", data_dir=tiny_cifar, stop_after_epoch=1
    )
    assert plain.report.train_loss != trained.report.train_loss


def test_a_model_hook_that_returns_no_module_is_refused(tiny_cifar: Path, tmp_path: Path) -> None:
    @attrs.define
    class Broken(Plugin):
        default_name = "broken"

        @hookimpl
        def hooktrain_model(self, model: nn.Module) -> object:
            return "not a module"

    with pytest.raises(HooktrainError, match=r"returned a str, not a torch\.nn\.Module"):
        train(tiny("epochs=1", plugins=(Broken(),)), out_dir=tmp_path / "r", data_dir=tiny_cifar)


@attrs.define
class FastBiases(Plugin):
    """Biases in a group of their own, trained `scale` times faster (airbench's BN biases)."""

    default_name = "fast_biases"
    scale: float = 8.0

    @hookimpl
    def hooktrain_param_groups(self, build: BuildContext) -> ParamGroups:
        return ParamGroups(
            lambda name: "bias" if name.endswith("bias") else "rest", {"bias": self.scale}
        )


def test_param_groups_scale_learning_rates_as_torch_optim_param_groups_do() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    reference = copy.deepcopy(model)
    lr, scale = 0.05, 8.0
    optimizer = torch.optim.SGD(
        [
            {"params": [p for n, p in reference.named_parameters() if n.endswith("bias")],
             "lr": lr * scale},
            {"params": [p for n, p in reference.named_parameters() if not n.endswith("bias")]},
        ],
        lr=lr, momentum=0.9, nesterov=True,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 6, generator=generator, dtype=torch.float64), torch.randint(0, 3, (8,)))
        for _ in range(5)
    ]
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        optimizer.step()

    recipe = attrs.evolve(load_recipe("resnet9_cifar10"), optimizer="sgd", plugins=(FastBiases(),))
    manager = make_plugin_manager(recipe.plugins)
    build = build_context(recipe, model, 5, Classification(), {}, manager)
    chain = compose_chain(manager, build)
    assert chain.describe() == "sgd -> param_groups"
    assert build.groups is not None and build.groups.label_of("0.bias") == "bias"
    pieces = StepPieces(model, chain, build.param_names, constant_schedule(lr))
    state, step = TrainState.create(model, chain, seed=0), build_step(pieces)
    for batch in batches:
        state, _ = step(state, batch)
    for name, tensor in reference.named_parameters():
        torch.testing.assert_close(state.params[name], tensor.detach(), rtol=1e-7, atol=1e-9)


def test_the_lr_scale_member_leaves_unscaled_groups_alone() -> None:
    member = lr_scale_member(ParamGroups(lambda name: name, {"a": 2.0}), ["a", "b"])
    updates, _, _ = member.update([torch.ones(2), torch.ones(2)], {}, [], torch.tensor(0.1))
    assert updates[0].tolist() == [2.0, 2.0] and updates[1].tolist() == [1.0, 1.0]


@attrs.define
class ShiftViews(Plugin):
    """Score each batch by the image (weight 1/2) and two shifted copies (1/4 each)."""

    default_name = "shift_views"

    @hookimpl
    def hooktrain_eval_views(self):
        return lambda x: [(x, 0.5), (x.roll(1, -1), 0.25), (x.roll(-1, -1), 0.25)]


def test_eval_views_score_the_weighted_sum_of_the_outputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).double().eval()
    x, y = torch.randn(10, 1, 3, 4, dtype=torch.float64), torch.randint(0, 4, (10,))
    state = TrainState.create(model, Chain.of([], sgd()), seed=0)
    views = ShiftViews().hooktrain_eval_views()
    with torch.no_grad():
        logits = 0.5 * model(x) + 0.25 * model(x.roll(1, -1)) + 0.25 * model(x.roll(-1, -1))
    seen: list[torch.Tensor] = []
    figures = build_evaluate(model, Classification(), None, views=views)(
        state, [(x, y)], lambda lane, outputs, targets: seen.append(outputs)
    )
    assert figures["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-12)
    # What eval_outputs receives is what the metrics come from.
    torch.testing.assert_close(seen[0], logits)


def test_views_and_tta_flip_together_are_refused(tiny_cifar: Path, tmp_path: Path) -> None:
    recipe = tiny("epochs=1", "tta_flip=true", plugins=(ShiftViews(),))
    with pytest.raises(HooktrainError, match="set tta_flip=false"):
        train(recipe, out_dir=tmp_path / "r", data_dir=tiny_cifar, device="cpu")


@attrs.define
class Logger(Plugin):
    """Logs a figure of its own at every epoch end and reports a metric clashing with the task's
    when asked to."""

    default_name = "logger"
    clash: bool = False

    @hookimpl
    def hooktrain_epoch_end(self, run, state, report) -> None:
        run.log({"custom/epoch_squared": float(report.epoch**2)}, state.step)

    @hookimpl
    def hooktrain_eval_metrics(self, split: str) -> dict[str, float]:
        return {"accuracy": 0.0} if self.clash else {"answer": 42.0}


def test_plugin_metrics_join_the_report_and_run_log_reaches_tensorboard(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    recipe = tiny("epochs=2", "metrics.tensorboard=true", plugins=(Logger(),))
    out = tmp_path / "logged"
    trained = train(recipe, out_dir=out, data_dir=tiny_cifar, device="cpu")
    assert trained.report["test_answer"] == 42.0
    summary = json.loads((out / "metrics.json").read_text())
    assert [epoch["test_answer"] for epoch in summary["epochs"]] == [42.0, 42.0]
    events = EventAccumulator(str(out / TENSORBOARD_FOLDER))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("custom/epoch_squared")]
    assert logged == [(6, 1.0), (12, 4.0)]


def test_a_plugin_metric_named_like_the_tasks_is_refused(tiny_cifar: Path, tmp_path: Path) -> None:
    recipe = tiny("epochs=1", plugins=(Logger(clash=True),))
    with pytest.raises(HooktrainError, match="Two sources report the test metric 'accuracy'"):
        train(recipe, out_dir=tmp_path / "r", data_dir=tiny_cifar, device="cpu")


def test_eval_params_with_names_the_model_lacks_are_refused() -> None:
    state = TrainState.create(nn.Linear(2, 2), Chain.of([], sgd()), seed=0)
    replaced = state.with_tensors({"bias": torch.ones(2)})
    assert torch.equal(replaced.params["bias"], torch.ones(2))
    assert replaced.params["weight"] is state.params["weight"]
    with pytest.raises(HooktrainError, match="not parameters or buffers of this model"):
        state.with_tensors({"head.weight": torch.ones(2)})


def test_an_ablation_varies_step_changing_plugins(tiny_cifar: Path, tmp_path: Path) -> None:
    """The issue's example: mixup and sam on and off, two seeds each, every cell trained."""
    settings = [arg for s in [*TINY, "epochs=1"] for arg in ("--set", s)]
    result = CliRunner().invoke(
        main,
        ["ablate", "resnet9_cifar10", "--vary", "mixup=off,on", "--vary", "sam=off,on",
         "--seeds", "2", "--data-dir", str(tiny_cifar), "--out", str(tmp_path / "ab"),
         "--device", "cpu", *settings],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "ab" / "ablation.json").read_text())
    assert len(table["cells"]) == 4, table["cells"]
    assert all(len(cell["runs"]) == 2 for cell in table["cells"]), table["cells"]
