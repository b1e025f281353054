"""The lion and lookahead plugins against reference implementations written here, and in runs.

Lion is compared with the paper's Algorithm 2 written as a plain loop over the parameters (as
lucidrains/lion-pytorch does it, decoupled decay ``p *= 1 - lr * wd`` included), Lookahead
with a wrapper around torch.optim.SGD and torch.optim.Adam (k fast steps, then
``slow += alpha * (fast - slow)`` and ``fast = slow``). Everything compared runs in float64:
the two sides sum in different orders, and in float32 a ReLU input within rounding of zero
makes tiny nets drift apart (see tests/test_step.py). The learning rates are float32 numbers
on both sides (ours arrive as a float32 0-d tensor); what remains is float32 rounding of
products like ``lr * wd``, hence rtol 1e-7. A wrong sign, a missed decay or a sync a step
early moves some weight by a whole learning rate (1e-3 or more).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import assert_user_error
from torch import nn

from hooktrain import apply_overrides, load_recipe, train
from hooktrain.cli import main
from hooktrain.core.context import BuildContext
from hooktrain.core.optim import adam, sgd
from hooktrain.core.pieces import GradientTransform
from hooktrain.core.plugin import make_plugin_manager
from hooktrain.core.state import TrainState
from hooktrain.core.step import StepPieces, build_step
from hooktrain.core.task import Classification
from hooktrain.core.transforms import Chain
from hooktrain.errors import HooktrainError
from hooktrain.plugins.lion import Lion
from hooktrain.plugins.lookahead import Lookahead
from hooktrain.plugins.weight_decay import WeightDecay
from hooktrain.run.build import build_context, compose_chain
from hooktrain.run.checkpoints import load_checkpoint
from hooktrain.run.loop import train_seeds

SAME = {"rtol": 1e-7, "atol": 1e-9}
LRS = [0.004, 0.002, 0.003, 0.001, 0.0025, 0.0015, 0.002, 0.001, 0.003, 0.0005, 0.002, 0.001]
# Six steps of 20 images an epoch; conv biases off: BatchNorm cancels them, so their true
# gradient is zero and Lion would step by the sign of its rounding noise (see the lockstep test).
TINY = [
    "model.width=4",
    "model.conv_bias=false",
    "batch_size=20",
    "eval_batch_size=100",
    "max_lr=0.002",
    "metrics.progress=false",
    "metrics.tensorboard=false",
]


def small_net() -> nn.Module:
    """Two convolutions with BatchNorm and a linear head, in float64 (no bias before BatchNorm:
    its gradient would be rounding noise, whose sign Lion turns into full steps)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 10),
    ).double()


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(16, 3, 8, 8, generator=generator, dtype=torch.float64),
            torch.randint(0, 10, (16,), generator=generator),
        )
        for _ in range(count)
    ]


def train_ours(model: nn.Module, chain: Chain, steps: int) -> TrainState:
    """``steps`` of hooktrain's step on ``model`` with ``chain`` at the rates ``LRS``."""
    lr_table = torch.tensor(LRS[:steps])
    pieces = StepPieces(
        model=model,
        chain=chain,
        param_names=tuple(name for name, _ in model.named_parameters()),
        schedule=lambda step: lr_table[step],
    )
    state, step = TrainState.create(model, chain, seed=0), build_step(pieces)
    for batch in batches(steps):
        state, _ = step(state, batch)
    return state


def float32_rates(steps: int) -> list[float]:
    """The learning rates as our schedule gives them (float32 numbers), for the references."""
    return [float(lr) for lr in torch.tensor(LRS[:steps])]


# --------------------------------------------------------------------------------------------
# Lion
# --------------------------------------------------------------------------------------------


def reference_lion(
    model: nn.Module, steps: int, betas: tuple[float, float], rate: float
) -> nn.Module:
    """The paper's Algorithm 2, parameter by parameter; weights of 2+ dimensions decay."""
    beta1, beta2 = betas
    momenta = [torch.zeros_like(p) for p in model.parameters()]
    for (x, y), lr in zip(batches(steps), float32_rates(steps), strict=True):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p, m in zip(model.parameters(), momenta, strict=True):
                if p.dim() >= 2:
                    p.mul_(1 - lr * rate)
                p.add_(torch.sign(m * beta1 + p.grad * (1 - beta1)), alpha=-lr)
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
    return model


def test_lion_with_decoupled_weight_decay_matches_the_papers_algorithm() -> None:
    """Lion and weight_decay (mode auto) composed as runs compose them: the chain is
    ``lion -> weight_decay`` (decay decoupled, after the update), and twelve steps at changing
    rates land where the reference's do."""
    betas, rate, steps = (0.95, 0.98), 0.1, 12
    model = small_net()
    reference = reference_lion(small_net(), steps, betas, rate)

    manager = make_plugin_manager([Lion(betas=betas), WeightDecay(rate=rate)])
    build = build_context(load_recipe("resnet9_cifar10"), model, 1, Classification(), {}, manager)
    chain = compose_chain(manager, build)
    assert chain.describe() == "lion -> weight_decay"
    state = train_ours(model, chain, steps)
    assert set(state.opt_state) == {"exp_avg"}
    for name, tensor in reference.named_parameters():
        torch.testing.assert_close(state.params[name], tensor.detach(), **SAME)


@pytest.mark.parametrize("betas", [(0.9, 1.0), (-0.1, 0.99), (0.9,)])
def test_lion_refuses_betas_outside_0_to_1(betas: tuple[float, ...]) -> None:
    with pytest.raises(HooktrainError, match=r"lion\.betas must be two numbers"):
        Lion(betas=betas)


# --------------------------------------------------------------------------------------------
# Lookahead
# --------------------------------------------------------------------------------------------


def reference_lookahead(
    model: nn.Module, inner: torch.optim.Optimizer, steps: int, k: int, alpha: float
) -> tuple[nn.Module, list[torch.Tensor]]:
    """torch.optim's optimizer as the fast one; every k steps the slow weights step towards
    the fast ones and the fast weights restart from them. The model and the slow weights."""
    slow = [p.detach().clone() for p in model.parameters()]
    for count, ((x, y), lr) in enumerate(
        zip(batches(steps), float32_rates(steps), strict=True), start=1
    ):
        for group in inner.param_groups:
            group["lr"] = lr
        inner.zero_grad()
        F.cross_entropy(model(x), y).backward()
        inner.step()
        if count % k == 0:
            with torch.no_grad():
                for p, s in zip(model.parameters(), slow, strict=True):
                    s.add_(p - s, alpha=alpha)
                    p.copy_(s)
    return model, slow


INNER = {
    "sgd": (
        lambda: sgd(momentum=0.9, nesterov=True),
        lambda params: torch.optim.SGD(params, lr=0.0, momentum=0.9, nesterov=True),
    ),
    "adam": (lambda: adam(), lambda params: torch.optim.Adam(params, lr=0.0)),
}


@pytest.mark.parametrize("kind", sorted(INNER))
def test_lookahead_matches_a_wrapper_around_torch_optim(kind: str) -> None:
    """Twelve steps with k=5 (syncs after steps 5 and 10, two fast steps since): the weights
    and the slow weights are the reference's, and the step counter counted twelve."""
    make_ours, make_torch = INNER[kind]
    k, alpha, steps = 5, 0.4, 12
    reference_model = small_net()
    reference, slow = reference_lookahead(
        reference_model, make_torch(reference_model.parameters()), steps, k, alpha
    )

    model = small_net()
    shapes = {name: p.shape for name, p in model.named_parameters()}
    build = BuildContext(load_recipe("resnet9_cifar10"), shapes, steps, make_ours())
    member = Lookahead(k=k, alpha=alpha).hooktrain_gradient_transform(build=build)
    chain = Chain.of([member], build.optimizer)
    assert chain.describe() == f"{build.optimizer.name} -> lookahead"
    state = train_ours(model, chain, steps)
    for name, tensor in reference.named_parameters():
        torch.testing.assert_close(state.params[name], tensor.detach(), **SAME)
    torch.testing.assert_close(state.transforms["lookahead"]["slow"], slow, **SAME)
    assert int(state.transforms["lookahead"]["count"]) == steps
    # Two fast steps after the last sync: the weights are not the slow ones.
    assert not torch.allclose(state.params["0.weight"], state.transforms["lookahead"]["slow"][0])


def test_lookahead_compiles_to_one_graph_that_equals_eager() -> None:
    """No Python branch on the step counter: the member's update compiles with fullgraph
    (a graph break is an error there) and computes what eager does, syncs included."""
    params = [torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3), torch.ones(4).double()]
    member = lookahead_member(k=2, alpha=0.5)
    compiled = torch.compile(member.update, fullgraph=True)
    lr = torch.tensor(0.1)
    eager_state = compiled_state = member.init(params)
    eager_params = compiled_params = params
    for step in range(5):
        updates = [torch.full_like(p, 0.1 * (step + 1)) for p in params]
        eager_updates, eager_state, _ = member.update(updates, eager_state, eager_params, lr)
        compiled_updates, compiled_state, _ = compiled(updates, compiled_state, compiled_params, lr)
        eager_params = torch._foreach_add(eager_params, eager_updates)
        compiled_params = torch._foreach_add(compiled_params, compiled_updates)
    torch.testing.assert_close(compiled_params, eager_params, rtol=0, atol=0)
    torch.testing.assert_close(compiled_state, eager_state, rtol=0, atol=0)
    # From 1: fast +0.1 +0.2 to 1.3, sync to 1.15; +0.3 +0.4 to 1.85, sync to 1.5; +0.5.
    torch.testing.assert_close(eager_params[1], torch.full((4,), 2.0).double(), rtol=1e-12, atol=0)


def lookahead_member(k: int, alpha: float) -> GradientTransform:
    shapes = {"w": torch.Size([2, 3]), "b": torch.Size([4])}
    build = BuildContext(load_recipe("resnet9_cifar10"), shapes, 1, sgd())
    return Lookahead(k=k, alpha=alpha).hooktrain_gradient_transform(build=build)


@pytest.mark.parametrize(("setting", "value"), [("k", 0), ("alpha", 0.0), ("alpha", 1.5)])
def test_lookahead_refuses_settings_out_of_range(setting: str, value: float) -> None:
    with pytest.raises(HooktrainError, match=rf"lookahead\.{setting} must be"):
        Lookahead(**{setting: value})


# --------------------------------------------------------------------------------------------
# Whole runs on real images
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def few_images(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real CIFAR-10 JPEGs: 12 per class for training (six batches of 20), 5 for testing."""
    folder = tmp_path_factory.mktemp("few_images")
    for split, count in (("train", 12), ("test", 5)):
        for source in sorted((cifar_dir / split).iterdir()):
            (folder / split / source.name).mkdir(parents=True)
            for image in sorted(source.iterdir())[:count]:
                shutil.copyfile(image, folder / split / source.name / image.name)
    return folder


def recipe_with(*settings: str, plugins: tuple[str, ...] = ("lion", "lookahead")) -> object:
    return apply_overrides(
        load_recipe("resnet9_cifar10"), [*TINY, *settings], with_plugins=list(plugins)
    )


def run_args(recipe: str, data_dir: Path, out: Path, *extra: str) -> list[str]:
    """`hooktrain run RECIPE EXTRA...` for one tiny epoch on the CPU."""
    sets = [arg for setting in [*TINY, "epochs=1"] for arg in ("--set", setting)]
    places = ["--data-dir", str(data_dir), "--out", str(out), "--device", "cpu"]
    return ["run", recipe, *extra, *sets, *places]


def test_lion_and_lookahead_train_from_the_command_line(few_images: Path, tmp_path: Path) -> None:
    """`hooktrain run --with lion --with lookahead` trains with a finite loss; the printed
    chain has Lion in the optimizer's place, decoupled decay after it and Lookahead last."""
    args = run_args("resnet9_cifar10", few_images, tmp_path / "run", "--with", "lion")
    result = CliRunner().invoke(main, [*args, "--with", "lookahead"])
    assert result.exit_code == 0, result.output
    assert "chain: nan_guard -> grad_clip -> lion -> weight_decay -> lookahead" in result.output
    epochs = json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"]
    assert math.isfinite(epochs[-1]["train_loss"]) and math.isfinite(epochs[-1]["test_loss"])
    payload = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert int(payload["state"]["transforms"]["lookahead"]["count"]) == 6


def test_a_second_optimizer_claimant_is_refused_in_one_sentence(
    few_images: Path, tmp_path: Path
) -> None:
    """A recipe whose plugins already claim the optimizer, run with --with lion."""
    path = tmp_path / "signs.py"
    path.write_text(
        "import attrs\n"
        "from hooktrain import load_recipe\n"
        "from hooktrain.plugins.lion import Lion\n"
        "\n"
        'base = load_recipe("resnet9_cifar10")\n'
        'plugins = (*base.plugins[:-2], Lion(name="signs"), *base.plugins[-2:])\n'
        'recipe = attrs.evolve(base, name="signs", plugins=plugins)\n'
    )
    args = run_args(str(path), few_images, tmp_path / "run", "--with", "lion")
    assert_user_error(CliRunner().invoke(main, args), "'signs' and 'lion'", "optimizer")


@pytest.mark.usefixtures("float64_training")
def test_lion_with_lookahead_seeds_in_lockstep_equal_each_seed_alone(
    few_images: Path, tmp_path: Path
) -> None:
    """train_seeds on two seeds (vmapped gradients, each seed its own Lion and Lookahead
    state) gives each seed the run it gets alone, to 1e-7 in float64.

    Conv biases are off (TINY): with them, their true gradient of zero is rounding noise that
    differs between the vmapped and the single run, and Lion steps each by the full rate in
    the noise's direction; that is the biases' own business (BatchNorm cancels them), not a
    difference in what the other weights learn.
    """
    recipe = recipe_with("epochs=1", "lookahead.k=2")
    options = {"data_dir": few_images, "device": "cpu", "echo": lambda _: None}
    seeds = [0, 1]
    together = train_seeds(
        recipe, seeds, out_dirs=[tmp_path / f"together-{s}" for s in seeds], **options
    )
    for seed, kept in zip(seeds, together, strict=True):
        alone = train(
            apply_overrides(recipe, [f"seed={seed}"]), out_dir=tmp_path / f"alone-{seed}", **options
        )
        assert kept.state.step == alone.state.step == 6
        assert kept.state.params["0.0.weight"].dtype == torch.float64
        for kind in ("params", "buffers", "opt_state", "transforms"):
            torch.testing.assert_close(
                getattr(kept.state, kind), getattr(alone.state, kind), **SAME
            )
    first, second = (t.state.transforms["lookahead"]["slow"][0] for t in together)
    assert not torch.allclose(first, second)  # the seeds really are different runs


def test_lookahead_resumes_bit_for_bit(few_images: Path, tmp_path: Path) -> None:
    """Two epochs straight equal one epoch, a stop, and a resume: weights, Lion's momentum,
    Lookahead's slow weights and counter. Six steps an epoch and k=5: syncs after steps 5 and
    10, so the checkpoint holds moved slow weights and a counter at 6, and a resume that lost
    either would sync elsewhere or towards other weights."""
    recipe = recipe_with("epochs=2", "lookahead.k=5")
    options = {"data_dir": few_images, "device": "cpu", "echo": lambda _: None}
    straight = train(recipe, out_dir=tmp_path / "straight", **options).state
    train(recipe, out_dir=tmp_path / "split", stop_after_epoch=1, **options)
    payload = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert int(payload["state"]["transforms"]["lookahead"]["count"]) == 6
    resumed = train(recipe, out_dir=tmp_path / "split", resume=payload, **options).state
    assert straight.step == resumed.step == 12
    assert int(resumed.transforms["lookahead"]["count"]) == 12
    for kind in ("params", "buffers", "opt_state", "transforms"):
        torch.testing.assert_close(getattr(resumed, kind), getattr(straight, kind), rtol=0, atol=0)
    # A sync happened and two fast steps followed it.
    assert not torch.equal(resumed.params["0.0.weight"], resumed.transforms["lookahead"]["slow"][0])
