"""The airbench94 recipe against airbench 0.1.8's own code (a test extra), on the CPU.

airbench builds its network in half precision on CUDA and its ``train()`` times itself with
CUDA events, so neither runs here as a whole. What runs is its own code for everything else:
the network is airbench's layer classes put together as ``make_net94`` does, on the CPU; the
update rule is ``train()``'s loop (its SGD param groups, LambdaLR triangle, Lookahead cadence
and whitening-bias freeze) around airbench's ``LookaheadState``; whitening and multi-crop
evaluation are its ``get_patches``/``get_whitening_parameters`` and ``infer`` functions.

Trajectories over several steps are compared in float64: in float32 two implementations that
round differently drift apart through BatchNorm and max-pool near-ties in a tiny run (see
PITFALLS.md), so float32 is held only to one step, at a tolerance any CPU meets.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from airbench.lib_airbench94 import hyp
from airbench.utils import LookaheadState, get_patches, get_whitening_parameters, infer
from airbench_reference import (
    BATCH,
    STEPS_PER_EPOCH,
    TOTAL_STEPS,
    WHITEN_BIAS_EPOCHS,
    airbench_network,
    batches_of,
    load_normalized_images,
    ours_from,
    recipe_step,
)
from click.testing import CliRunner
from torch import Tensor, nn

from hooktrain.cli import main
from hooktrain.config.overrides import apply_overrides
from hooktrain.config.registry import load_recipe
from hooktrain.core.evaluate import build_evaluate
from hooktrain.core.state import TrainState
from hooktrain.core.step import StepFn
from hooktrain.core.task import Classification
from hooktrain.data.chain import Chain
from hooktrain.data.epochwise import AlternatingFlip, Epoch
from hooktrain.plugins.multi_crop import multi_crop_views
from hooktrain.plugins.triangle import triangle_schedule
from hooktrain.plugins.whitening import spread_images, whitening_filters
from hooktrain.recipes.airbench94 import TRICKS
from hooktrain.run.build import device_data, load_splits

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


@pytest.fixture(scope="module")
def normalized_images(cifar_dir: Path) -> tuple[Tensor, Tensor]:
    return load_normalized_images(cifar_dir)


def hooktrain_step(model: nn.Module) -> tuple[TrainState, StepFn]:
    """The airbench94 recipe's step, built from its plugins as a run builds it."""
    # airbench's learning rate is per 1,024 examples of a summed loss: it scales with the
    # batch, where the recipe's max_lr (of the mean loss) is for batches of 1,024.
    state, step, chain = recipe_step("airbench94", model, f"max_lr={1.5 * BATCH / 1024}")
    assert chain == "weight_decay -> sgd -> param_groups -> freeze -> lookahead"
    return state, step


def airbench_triangle(steps: int, start: float, end: float, peak: float) -> Tensor:
    """The factor of airbench's LambdaLR schedule at steps 0..steps (``train()``'s ``triangle``)."""
    xp = torch.tensor([0, int(peak * steps), steps])
    fp = torch.tensor([start, 1, end])
    x = torch.arange(1 + steps)
    m = (fp[1:] - fp[:-1]) / (xp[1:] - xp[:-1])
    b = fp[:-1] - (m * xp[:-1])
    indices = (torch.sum(torch.ge(x[:, None], xp[None, :]), 1) - 1).clamp(0, len(m) - 1)
    return m[indices] * x + b[indices]


class Float64Lookahead(LookaheadState):
    """airbench's LookaheadState, whose update skips all but float16 and float32 tensors,
    applied to float64 ones (the same two lines of arithmetic)."""

    def update(self, net: nn.Module, decay: float) -> None:
        for average, tensor in zip(self.net_ema.values(), net.state_dict().values(), strict=True):
            if tensor.dtype == torch.float64:
                average.lerp_(tensor, 1 - decay)
                tensor.copy_(average)


def airbench_steps(
    net: nn.Sequential, batches: list[tuple[Tensor, Tensor]]
) -> Iterator[tuple[float, nn.Sequential]]:
    """airbench94's ``train()`` loop on ``batches``: the summed loss of each step, and the net."""
    opt = hyp["opt"]
    momentum, batch_size = opt["momentum"], len(batches[0][0])
    kilostep_scale = 1024 * (1 + 1 / (1 - momentum))
    lr = opt["lr"] / kilostep_scale
    wd = opt["weight_decay"] * batch_size / kilostep_scale
    lr_biases = lr * opt["bias_scaler"]
    named = list(net.named_parameters())
    norm_biases = [p for k, p in named if "norm" in k and p.requires_grad]
    others = [p for k, p in named if "norm" not in k and p.requires_grad]
    optimizer = torch.optim.SGD(
        [
            {"params": norm_biases, "lr": lr_biases, "weight_decay": wd / lr_biases},
            {"params": others, "lr": lr, "weight_decay": wd / lr},
        ],
        momentum=momentum,
        nesterov=True,
    )
    factors = airbench_triangle(len(batches), start=0.2, end=0.07, peak=0.23)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: float(factors[i]))
    decays = 0.95**5 * (torch.arange(len(batches) + 1) / len(batches)) ** 3
    lookahead = (
        Float64Lookahead(net)
        if next(net.parameters()).dtype == torch.float64
        else LookaheadState(net)
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=opt["label_smoothing"], reduction="none")
    net.train()
    for steps, (x, y) in enumerate(batches, start=1):
        net[0].bias.requires_grad = (steps - 1) // STEPS_PER_EPOCH < WHITEN_BIAS_EPOCHS
        loss = loss_fn(net(x), y).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if steps % 5 == 0:
            lookahead.update(net, decay=decays[steps].item())
        if steps == len(batches):
            lookahead.update(net, decay=1.0)
        yield loss.item(), net


def test_the_recipe_trains_as_airbench_trains_in_float64(
    normalized_images: tuple[Tensor, Tensor],
) -> None:
    reference = airbench_network(torch.float64)
    model = ours_from(reference)
    state, step = hooktrain_step(model)
    frozen_bias = None
    batches = batches_of(normalized_images, torch.float64)
    for steps, ((x, y), (their_loss, net)) in enumerate(
        zip(batches, airbench_steps(reference, batches), strict=True), start=1
    ):
        state, metrics = step(state, (x, y))
        # airbench sums the loss over the batch; hooktrain takes the mean (max_lr is scaled).
        # airbench computes its schedule's factors in float32, so learning rates and Lookahead
        # pulls differ by ~1e-7 relative: the trajectories agree to 1e-6, not to float64's 1e-15.
        assert metrics["loss"].item() * BATCH == pytest.approx(their_loss, rel=1e-7)
        theirs = ours_from(net).state_dict()
        for name, tensor in state.params.items():
            torch.testing.assert_close(tensor, theirs[name], rtol=1e-6, atol=1e-9, msg=name)
        if steps < 5:  # airbench's Lookahead also averages BatchNorm statistics; ours does not
            for name, tensor in state.buffers.items():
                torch.testing.assert_close(tensor, theirs[name], rtol=1e-6, atol=1e-9, msg=name)
        if steps == STEPS_PER_EPOCH:
            frozen_bias = state.params["whiten.bias"].clone()
        if STEPS_PER_EPOCH < steps < 5:  # frozen, and no Lookahead pull moved it yet
            torch.testing.assert_close(state.params["whiten.bias"], frozen_bias, rtol=0, atol=0)
    assert not torch.equal(state.params["whiten.bias"], frozen_bias)  # the pulls moved it


def test_one_float32_step_matches_airbench(normalized_images: tuple[Tensor, Tensor]) -> None:
    reference = airbench_network(torch.float32)
    model = ours_from(reference)
    state, step = hooktrain_step(model)
    batch = batches_of(normalized_images, torch.float32)[0]
    their_loss, net = next(airbench_steps(reference, [batch] * TOTAL_STEPS))
    state, metrics = step(state, batch)
    assert metrics["loss"].item() * BATCH == pytest.approx(their_loss, rel=1e-5)
    theirs = ours_from(net).state_dict()
    for name, tensor in state.params.items():
        # One step from the same weights: only rounding (~1e-6 relative) separates the two.
        torch.testing.assert_close(tensor, theirs[name], rtol=1e-4, atol=1e-6, msg=name)


def test_whitening_equals_airbench_up_to_each_filters_sign(
    normalized_images: tuple[Tensor, Tensor],
) -> None:
    images = normalized_images[0]
    ours = whitening_filters(images, 2, 5e-4)
    # airbench's own functions on the same (float32) images, its eigendecomposition in float64.
    eigenvalues, eigenvectors = get_whitening_parameters(get_patches(images, (2, 2)).double())
    theirs = (eigenvectors / torch.sqrt(eigenvalues + 5e-4)).flatten(1)
    half = ours[:12].flatten(1)
    signs = (half * theirs).sum(1).sign()[:, None]
    torch.testing.assert_close(half, signs * theirs, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours[12:], -ours[:12], rtol=0, atol=0)
    # The filters whiten: the patches' responses are decorrelated, each of variance below 1.
    responses = F.conv2d(images.double(), ours[:12]).transpose(0, 1).flatten(1)
    moments = responses @ responses.T / responses.shape[1]
    torch.testing.assert_close(moments, torch.diag(torch.diagonal(moments)), atol=1e-9, rtol=0)
    assert 0.5 < float(moments[0, 0]) < 1.0


def test_the_sign_of_the_whitening_filters_does_not_depend_on_the_eigensolver(
    normalized_images: tuple[Tensor, Tensor],
) -> None:
    filters = whitening_filters(normalized_images[0], 2, 5e-4).flatten(1)
    largest = filters.gather(1, filters.abs().argmax(1, keepdim=True))
    assert bool((largest[:12] > 0).all()) and bool((largest[12:] < 0).all())


def test_multi_crop_evaluation_equals_airbench_infer(
    normalized_images: tuple[Tensor, Tensor],
) -> None:
    reference = airbench_network(torch.float64)
    # A few steps first, so that BatchNorm's running statistics are not the initial ones.
    for _ in itertools.islice(
        airbench_steps(reference, batches_of(normalized_images, torch.float64)), 3
    ):
        pass
    model = ours_from(reference).eval()
    x, y = normalized_images[0].double()[:100], normalized_images[1][:100]
    loader = SimpleNamespace(images=x, normalize=lambda images: images)
    theirs = infer(reference, loader, tta_level=2)
    state, _ = hooktrain_step(model)
    seen: list[Tensor] = []
    evaluate = build_evaluate(model, Classification(), None, views=multi_crop_views(2))
    figures = evaluate(state, [(x, y)], lambda lane, outputs, targets: seen.append(outputs))
    torch.testing.assert_close(seen[0], theirs, rtol=1e-12, atol=1e-12)
    accuracy = (theirs.argmax(1) == y).double().mean().item()
    assert figures["accuracy"] == pytest.approx(accuracy)


@pytest.mark.parametrize("steps", [476, 12])
def test_the_triangle_is_airbenchs(steps: int) -> None:
    ours = triangle_schedule(2.0, steps, 0.2, 0.23, 0.07)
    factors = airbench_triangle(steps, start=0.2, end=0.07, peak=0.23)
    got = torch.stack([ours(torch.tensor(i)) for i in range(steps + 1)])
    torch.testing.assert_close(got, 2.0 * factors, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# The alternating flip, the recipe from the command line, its ablation table
# --------------------------------------------------------------------------------------------

CLI_TINY = [
    *("--set", "model.width=2", "--set", "epochs=2", "--set", "batch_size=40"),
    *("--set", "eval_batch_size=100", "--set", "compile=false", "--set", "whitening.images=200"),
    *("--set", "freeze.epochs=1", "--set", "metrics.progress=false"),
    *("--set", "metrics.tensorboard=false", "--device", "cpu"),
]


def flips_by_sample(epoch: int, seed: int, n: int = 1000) -> Tensor:
    """Which samples the alternating flip mirrors in ``epoch`` of a run with ``seed``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(100 + epoch))
    (drawn,) = Chain([AlternatingFlip()], (8, 8, 3)).draw(
        torch.Generator(), n, Epoch(epoch, seed, order)
    )
    flips = torch.empty(n, dtype=torch.int64)
    flips[order] = drawn["flip"]
    return flips


def test_the_alternating_flip_mirrors_each_image_every_other_epoch() -> None:
    first = flips_by_sample(0, seed=0)
    assert 400 < int(first.sum()) < 600
    for epoch in (1, 2, 3):
        assert torch.equal(flips_by_sample(epoch, seed=0), first ^ (epoch % 2))
    other_seed = flips_by_sample(0, seed=1)
    assert not torch.equal(other_seed, first) and 400 < int(other_seed.sum()) < 600


def test_a_run_passes_the_epoch_and_the_seed_to_the_alternating_flip(
    tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, int]] = []
    draw_epoch = AlternatingFlip.draw_epoch

    def recording(self, generator, n, shape, epoch):
        seen.append((epoch.number, epoch.seed))
        return draw_epoch(self, generator, n, shape, epoch)

    monkeypatch.setattr(AlternatingFlip, "draw_epoch", recording)
    args = ["run", "airbench94", *CLI_TINY, "--set", "seed=3", "--data-dir", tiny_cifar]
    result = CliRunner().invoke(main, [str(a) for a in [*args, "--out", tmp_path / "run"]])
    assert result.exit_code == 0, result.output
    assert "chain: weight_decay -> sgd -> param_groups -> freeze -> lookahead" in result.output
    assert seen == [(0, 3), (1, 3)]


def test_one_command_tabulates_what_each_trick_is_worth(tiny_cifar: Path, tmp_path: Path) -> None:
    out = tmp_path / "ablation"
    args = ["ablate", "airbench94", "--mode", "one-at-a-time", "--seeds", "1", *CLI_TINY]
    args += ["--data-dir", tiny_cifar, "--out", out]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    rows = [line for line in (out / "ablation.md").read_text().splitlines() if line[:1] == "|"]
    cells = [row.split("|")[1].strip() for row in rows[2:]]
    assert cells == [
        "baseline",
        *(f"{trick}=off" for trick in TRICKS),
        "augment=crop,flip,normalize",
        "augment=altflip,normalize",
    ]


def test_whitening_reads_images_spread_over_a_copy_listed_class_by_class(
    cifar_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "sorted"
    for split in ("train", "test"):
        for source in sorted((cifar_dir / split).iterdir()):
            (folder / split / source.name).mkdir(parents=True)
            for image in sorted(source.iterdir())[:10]:
                shutil.copyfile(image, folder / split / source.name / image.name)
    recipe = apply_overrides(load_recipe("airbench94"), ["batch_size=10", "eval_batch_size=7"])
    data = device_data(recipe, load_splits(recipe, folder, print), torch.device("cpu"))
    everything = torch.cat([x for x, _ in data.eval_batches("train")])
    labels = torch.cat([y for _, y in data.eval_batches("train")])
    assert labels.tolist() == sorted(labels.tolist())  # the copy lists its images by class
    chosen = spread_images(data, 10)
    torch.testing.assert_close(chosen, everything[::10], rtol=0, atol=0)
    assert sorted(labels[::10].tolist()) == list(range(10))  # one image of every class
