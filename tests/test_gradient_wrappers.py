"""The gradient wrappers (sam, grad_accumulation) against plain torch / torch.optim.

The step-level comparisons run in float64 with a learning rate that float32 holds exactly
(2**-5): the step's schedule gives float32 rates, and with this one ours and torch.optim do
the same arithmetic up to summation order, so SGD agrees to 2e-16 (measured; asserted 1e-10)
while training moves the weights by 5e-2 or more. Adam's bias corrections are float32 numbers
in ours (rounded to 6e-8 of each update), so Adam against torch.optim is held to the 1e-7 of
tests/test_step.py (measured: 1.6e-8); ours against ours keeps 1e-10.
"""

from __future__ import annotations

import copy
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hooktrain import Ref, apply_overrides, load_recipe, train, train_seeds
from hooktrain.config.recipe import Recipe
from hooktrain.core.optim import Optimizer, adam, sgd
from hooktrain.core.state import TrainState
from hooktrain.core.step import GradientWrapper, StepPieces, build_step, constant_schedule
from hooktrain.core.transforms import Chain
from hooktrain.errors import HooktrainError
from hooktrain.models import Dropout
from hooktrain.plugins.grad_accumulation import GradAccumulation, accumulate
from hooktrain.plugins.sam import SAM, sharpness_aware
from hooktrain.run.checkpoints import load_checkpoint

LR = 2**-5  # exact in float32: see the module's docstring
EXACT = {"rtol": 1e-10, "atol": 1e-12}
ADAM_VS_TORCH = {"rtol": 1e-7, "atol": 5e-8}
Batches = list[tuple[torch.Tensor, torch.Tensor]]

OPTIMIZERS: dict[str, tuple[Callable[[], Optimizer], Callable, dict]] = {
    "sgd": (
        lambda: sgd(momentum=0.9, nesterov=True),
        lambda params: torch.optim.SGD(params, lr=LR, momentum=0.9, nesterov=True),
        EXACT,
    ),
    "adam": (adam, lambda params: torch.optim.Adam(params, lr=LR), ADAM_VS_TORCH),
}


def mlp(batchnorm: bool = False) -> nn.Module:
    """A float64 MLP; with BatchNorm, no bias before it (its true gradient is zero)."""
    torch.manual_seed(0)
    middle = [nn.BatchNorm1d(16)] if batchnorm else []
    net = nn.Sequential(
        nn.Linear(6, 16, bias=not batchnorm), *middle, nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
        nn.Linear(16, 4),
    )  # fmt: skip
    return net.double().train()


def batches(count: int, size: int = 32) -> Batches:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(size, 6, generator=generator, dtype=torch.float64),
            torch.randint(0, 4, (size,), generator=generator),
        )
        for _ in range(count)
    ]


def run_ours(
    model: nn.Module, optimizer: Optimizer, data: Batches, wrappers: list[GradientWrapper]
) -> tuple[TrainState, list[float]]:
    chain = Chain.of([], optimizer)
    pieces = StepPieces(
        model=model,
        chain=chain,
        param_names=tuple(name for name, _ in model.named_parameters()),
        schedule=constant_schedule(LR),
        gradient_wrappers=wrappers,
    )
    state, step, losses = TrainState.create(model, chain, seed=0), build_step(pieces), []
    for batch in data:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def assert_same_model(state: TrainState, model: nn.Module, tolerance: dict) -> None:
    for name, tensor in model.named_parameters():
        torch.testing.assert_close(state.params[name], tensor.detach(), **tolerance)
    for name, tensor in model.named_buffers():
        torch.testing.assert_close(state.buffers[name], tensor, **tolerance)


def max_change(state: TrainState, model: nn.Module) -> float:
    """How far training moved the weights: the comparisons' tolerances are far below it."""
    return max(
        (state.params[name] - p.detach()).abs().max().item() for name, p in model.named_parameters()
    )


# --------------------------------------------------------------------------------------------
# grad_accumulation
# --------------------------------------------------------------------------------------------


def torch_accumulated(model: nn.Module, make_torch: Callable, data: Batches, k: int) -> nn.Module:
    """The usual accumulation loop: each micro-batch's loss / k backward, one optimizer step."""
    reference = copy.deepcopy(model)
    optimizer = make_torch(reference.parameters())
    for x, y in data:
        optimizer.zero_grad()
        for xs, ys in zip(x.chunk(k), y.chunk(k), strict=True):
            (F.cross_entropy(reference(xs), ys) / k).backward()
        optimizer.step()
    return reference


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_micro_batches_equal_one_batch_k_times_larger(kind: str) -> None:
    """4 micro-batches of 8 train as the plain step on the batch of 32 and as torch's
    accumulation loop with torch.optim; the reported loss is the whole batch's."""
    make_ours, make_torch, torch_tolerance = OPTIMIZERS[kind]
    model, data = mlp(), batches(5)
    accumulated, accumulated_losses = run_ours(model, make_ours(), data, [accumulate(4)])
    plain, plain_losses = run_ours(model, make_ours(), data, [])
    assert max_change(plain, model) > 0.05
    assert accumulated.step == plain.step == 5  # one step per batch: schedules count these
    torch.testing.assert_close(accumulated.params, plain.params, **EXACT)
    torch.testing.assert_close(accumulated.opt_state, plain.opt_state, **EXACT)
    assert accumulated_losses == pytest.approx(plain_losses, rel=1e-12)
    assert_same_model(accumulated, torch_accumulated(model, make_torch, data, 4), torch_tolerance)


def test_batchnorm_sees_each_micro_batch_in_order() -> None:
    """With BatchNorm, every micro-batch is normalised by its own statistics and the running
    statistics take one update per micro-batch, in order, as torch's accumulation loop gives
    them: weights and buffers after three steps of 4 micro-batches, and the buffers after one
    step equal to the k forwards of a module copy in train mode."""
    model, data = mlp(batchnorm=True), batches(3)
    one_step, _ = run_ours(model, sgd(), data[:1], [accumulate(4)])
    forwards = copy.deepcopy(model).train()
    with torch.no_grad():
        for micro_batch in data[0][0].chunk(4):
            forwards(micro_batch)
    torch.testing.assert_close(one_step.buffers, dict(forwards.named_buffers()), **EXACT)
    assert int(one_step.buffers["1.num_batches_tracked"]) == 4

    state, _ = run_ours(model, sgd(), data, [accumulate(4)])
    make_torch = OPTIMIZERS["sgd"][1]
    assert_same_model(state, torch_accumulated(model, make_torch, data, 4), EXACT)
    # Per-micro-batch normalisation is a different computation from the whole batch's.
    plain, _ = run_ours(model, sgd(), data, [])
    assert not torch.allclose(state.params["5.weight"], plain.params["5.weight"], rtol=1e-4)


def test_a_step_batch_that_does_not_split_is_refused() -> None:
    """The batch a process trains on (batch_size / world_size under torchrun, which the
    recipe's check does not see) must split too: slicing would drop examples silently."""
    with pytest.raises(HooktrainError, match="batch of 32 examples does not split into 3"):
        run_ours(mlp(), sgd(), batches(1), [accumulate(3)])


# --------------------------------------------------------------------------------------------
# sam
# --------------------------------------------------------------------------------------------


def torch_sam(model: nn.Module, data: Batches, rho: float) -> tuple[nn.Module, list[float]]:
    """The usual two-pass SAM with torch.optim.SGD as the base optimizer; BatchNorm's running
    statistics are put back to the first pass's after the second (ours keep the first pass's)."""
    reference = copy.deepcopy(model)
    params = list(reference.parameters())
    optimizer = OPTIMIZERS["sgd"][1](params)
    losses = []
    for x, y in data:
        optimizer.zero_grad()
        loss = F.cross_entropy(reference(x), y)
        loss.backward()
        losses.append(loss.item())
        first_pass = {name: b.clone() for name, b in reference.named_buffers()}
        with torch.no_grad():
            norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in params]), p=2)
            steps = [p.grad * (rho / (norm + 1e-12)) for p in params]
            for p, e_w in zip(params, steps, strict=True):
                p.add_(e_w)
        optimizer.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        with torch.no_grad():
            for p, e_w in zip(params, steps, strict=True):
                p.sub_(e_w)
            for name, buffer in reference.named_buffers():
                buffer.copy_(first_pass[name])
        optimizer.step()
    return reference, losses


def test_sam_matches_the_two_pass_torch_implementation() -> None:
    """Six SAM steps (rho 0.1) over SGD with Nesterov momentum, on a model with BatchNorm:
    weights, running statistics and the reported loss (the first pass's) as torch's."""
    model, data, rho = mlp(batchnorm=True), batches(6), 0.1
    state, losses = run_ours(model, sgd(), data, [sharpness_aware(rho)])
    reference, reference_losses = torch_sam(model, data, rho)
    assert_same_model(state, reference, EXACT)
    assert losses == pytest.approx(reference_losses, rel=1e-12)
    # The neighbour's gradient moves the weights elsewhere than plain SGD, far beyond EXACT.
    plain, _ = run_ours(model, sgd(), data, [])
    assert not torch.allclose(state.params["5.weight"], plain.params["5.weight"], rtol=1e-4)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SAM(rho=0.0), "sam.rho must be a positive number"),
        (lambda: GradAccumulation(micro_batches=0), "micro_batches must be an integer >= 1"),
    ],
)
def test_bad_settings_are_refused(make: Callable[[], object], message: str) -> None:
    with pytest.raises(HooktrainError, match=message):
        make()


# --------------------------------------------------------------------------------------------
# Whole runs on real images
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def few_images(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real CIFAR-10 JPEGs, 12 training and 10 test images a class: evaluating all 10,000 test
    images would take most of this file's time."""
    folder = tmp_path_factory.mktemp("few_images")
    for split, count in (("train", 12), ("test", 10)):
        for class_dir in sorted((cifar_dir / split).iterdir()):
            target = folder / split / class_dir.name
            target.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                shutil.copy(image, target / image.name)
    return folder


# Two SGD steps of 40 images at a constant rate (one-cycle needs more steps than two).
TINY = ["model.width=4", "batch_size=40", "train_limit=80", "eval_batch_size=100", "epochs=1"]
TINY += ["optimizer=sgd", "max_lr=0.05", "metrics.progress=false", "metrics.tensorboard=false"]


def tiny_recipe(plugins: list[str], *settings: str, model: Ref | None = None) -> Recipe:
    recipe = apply_overrides(
        load_recipe("resnet9_cifar10"),
        [*TINY, *settings],
        with_plugins=plugins,
        without_plugins=["onecycle"],
    )
    return recipe if model is None else attrs.evolve(recipe, model=model)


def small_cnn(num_classes: int) -> nn.Module:
    """A float64 CNN with BatchNorm, max-pooling and hooktrain's dropout in a few layers: the
    compiled test takes ~35 s with it, ~240 s with the ResNet-9 (measured, two busy CPU cores)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4),
        Dropout(0.2), nn.Flatten(), nn.Linear(8 * 8 * 8, num_classes),
    ).double()  # fmt: skip


def quiet(data_dir: Path) -> dict[str, object]:
    return {"data_dir": data_dir, "device": "cpu", "echo": lambda _: None}


@pytest.mark.parametrize("plugin", ["sam", "grad_accumulation"])
def test_trains_real_images_with_a_finite_loss(
    plugin: str, few_images: Path, tmp_path: Path
) -> None:
    trained = train(tiny_recipe([plugin]), out_dir=tmp_path / "run", **quiet(few_images))
    assert trained.state.step == 2
    assert math.isfinite(trained.report.train_loss)
    assert math.isfinite(trained.report["test_loss"])


@pytest.mark.usefixtures("float64_training")
def test_seeds_in_lockstep_equal_seeds_alone(few_images: Path, tmp_path: Path) -> None:
    """Two seeds vmapped together, each through SAM around 2 accumulated micro-batches, equal
    each seed trained alone to 1e-7 in float64 (as tests/test_seeds.py holds plain runs)."""
    recipe = tiny_recipe(["grad_accumulation", "sam"], model=Ref(small_cnn))
    seeds = [0, 1]
    train_seeds(
        recipe, seeds, out_dirs=[tmp_path / f"together-{s}" for s in seeds], **quiet(few_images)
    )
    exact = {"rtol": 1e-7, "atol": 1e-9}
    finals = []
    for seed in seeds:
        alone = tmp_path / f"alone-{seed}"
        train(apply_overrides(recipe, [f"seed={seed}"]), out_dir=alone, **quiet(few_images))
        kept = load_checkpoint(tmp_path / f"together-{seed}" / "checkpoints" / "last.pt")["state"]
        reference = load_checkpoint(alone / "checkpoints" / "last.pt")["state"]
        assert kept["step"] == reference["step"] == 2
        assert kept["params"]["0.weight"].dtype == torch.float64
        for kind in ("params", "buffers", "opt_state"):
            torch.testing.assert_close(kept[kind], reference[kind], **exact)
        finals.append(kept["params"]["0.weight"])
    assert not torch.allclose(finals[0], finals[1], rtol=1e-3)  # really two different seeds


def test_batch_that_does_not_split_is_refused_in_one_sentence(
    few_images: Path, tmp_path: Path
) -> None:
    recipe = tiny_recipe(
        ["grad_accumulation"],
        "batch_size=50",
        "train_limit=100",
        "grad_accumulation.micro_batches=3",
    )
    with pytest.raises(HooktrainError) as error:
        train(recipe, out_dir=tmp_path / "run", **quiet(few_images))
    message = str(error.value)
    assert "batch_size 50 does not split into 3 equal micro-batches" in message
    assert message.endswith(".") and message.count(". ") == 0 and "\n" not in message


@pytest.mark.usefixtures("float64_training")
def test_compiled_sam_equals_eager(few_images: Path, tmp_path: Path) -> None:
    """SAM's two passes in one torch.compile'd step (torch.func's gradients) give the weights
    of the eager step (torch.autograd's): in float64 the two differ by summation order only,
    so 1e-7 holds (measured: 1e-15; a ReLU or max-pool flip is 1e8 times rarer than in
    float32), while two steps move the weights by 2e-2."""
    results = {}
    for compiled in (False, True):
        recipe = tiny_recipe(["sam"], f"compile={str(compiled).lower()}", model=Ref(small_cnn))
        trained = train(recipe, out_dir=tmp_path / f"compile-{compiled}", **quiet(few_images))
        assert trained.state.step == 2 and math.isfinite(trained.report.train_loss)
        results[compiled] = trained.state.params
    torch.testing.assert_close(results[True], results[False], rtol=1e-7, atol=1e-9)
