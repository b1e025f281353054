"""The airbench94_muon recipe against airbench94_muon.py's update rule, on the CPU.

airbench94_muon.py (KellerJordan/cifar10-airbench, commit 096d14d) is a script, not part of
the airbench package, and needs CUDA; its Muon optimizer, Newton-Schulz iteration and training
loop (SGD param groups, linear decays, the whitening bias's own decay and freeze) are
transcribed below as the reference, around airbench 0.1.8's layer classes on the CPU. The
trajectory is compared in float64 with the iteration in float64 on both sides; the bfloat16
iteration itself is compared bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from airbench_reference import (
    BATCH,
    STEPS_PER_EPOCH,
    WHITEN_BIAS_EPOCHS,
    airbench_network,
    batches_of,
    load_normalized_images,
    ours_from,
    recipe_step,
)
from torch import Tensor, nn

from hooktrain.config.recipe import Recipe
from hooktrain.core.context import BuildContext
from hooktrain.core.optim import sgd
from hooktrain.errors import HooktrainError
from hooktrain.plugins import muon as muon_plugin
from hooktrain.plugins.muon import Muon, newton_schulz

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

LOGIT_SCALE = 1 / 16  # airbench94_muon divides the logits by the head's width (4 * WIDTH)


@pytest.fixture(scope="module")
def normalized_images(cifar_dir: Path) -> tuple[Tensor, Tensor]:
    return load_normalized_images(cifar_dir)


def reference_newton_schulz(
    G: Tensor, steps: int = 3, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """airbench94_muon's ``zeropower_via_newtonschulz5`` (in ``dtype``: bfloat16 is its own)."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.to(dtype)
    X /= X.norm() + eps
    if G.size(0) > G.size(1):
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(0) > G.size(1):
        X = X.T
    return X


class ReferenceMuon(torch.optim.Optimizer):
    """airbench94_muon's Muon optimizer, its Newton-Schulz iteration in ``dtype``."""

    def __init__(
        self, params: list[nn.Parameter], lr: float, momentum: float, dtype: torch.dtype
    ) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": True})
        self.dtype = dtype

    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                g = p.grad
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(g))
                buf.mul_(momentum).add_(g)
                g = g.add(buf, alpha=momentum) if group["nesterov"] else buf
                p.data.mul_(len(p.data) ** 0.5 / p.data.norm())
                matrix = g.reshape(len(g), -1)
                update = reference_newton_schulz(matrix, dtype=self.dtype).view(g.shape)
                p.data.add_(update, alpha=-lr)


def reference_steps(
    net: nn.Sequential, batches: list[tuple[Tensor, Tensor]]
) -> Iterator[tuple[float, nn.Sequential]]:
    """airbench94_muon's ``main()`` loop on ``batches``: each step's summed loss, and the net."""
    bias_lr, head_lr, wd = 0.053, 0.67, 2e-6 * len(batches[0][0])
    total, whiten_steps = len(batches), WHITEN_BIAS_EPOCHS * STEPS_PER_EPOCH
    whiten_bias, head = net[0].bias, net[7].weight
    filters = [p for p in net.parameters() if len(p.shape) == 4 and p.requires_grad]
    norm_biases = [p for n, p in net.named_parameters() if "norm" in n and p.requires_grad]
    sgd = torch.optim.SGD(
        [
            {"params": [whiten_bias], "lr": bias_lr, "weight_decay": wd / bias_lr},
            {"params": norm_biases, "lr": bias_lr, "weight_decay": wd / bias_lr},
            {"params": [head], "lr": head_lr, "weight_decay": wd / head_lr},
        ],
        momentum=0.85,
        nesterov=True,
    )
    muon = ReferenceMuon(filters, lr=0.24, momentum=0.6, dtype=torch.float64)
    optimizers = [sgd, muon]
    for group in (g for opt in optimizers for g in opt.param_groups):
        group["initial_lr"] = group["lr"]
    net.train()
    for step, (x, y) in enumerate(batches):
        whiten_bias.requires_grad = step < whiten_steps  # the script's b.detach() after them
        loss = F.cross_entropy(net(x), y, label_smoothing=0.2, reduction="sum")
        loss.backward()
        for group in sgd.param_groups[:1]:
            group["lr"] = group["initial_lr"] * (1 - step / whiten_steps)
        for group in sgd.param_groups[1:] + muon.param_groups:
            group["lr"] = group["initial_lr"] * (1 - step / total)
        for opt in optimizers:
            opt.step()
        net.zero_grad(set_to_none=True)
        yield loss.item(), net


def airbench_muon_network() -> nn.Sequential:
    """airbench94_muon's CifarNet from airbench's classes: its head at unit std, its logits
    divided by the head's width, its whitening bias nn.Conv2d's random start."""
    net = airbench_network(torch.float64, logit_scale=LOGIT_SCALE)
    with torch.no_grad():
        net[7].weight.mul_(1 / net[7].weight.std())
        net[0].bias.uniform_(-(12**-0.5), 12**-0.5)
    return net


def test_the_muon_recipe_trains_as_airbench94_muon_in_float64(
    normalized_images: tuple[Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both sides orthogonalise in float64 here: in bfloat16 (pinned bit for bit below), two
    # directions that agree to 1e-8 round an element one bfloat16 step apart now and then.
    monkeypatch.setattr(
        muon_plugin,
        "newton_schulz",
        lambda matrix, steps: reference_newton_schulz(matrix, steps, dtype=torch.float64),
    )
    reference = airbench_muon_network()
    model = ours_from(reference, logit_scale=LOGIT_SCALE)
    mean_lr = 0.053 * BATCH  # the biases' rate for the mean loss: max_lr
    state, step, chain = recipe_step(
        "airbench94_muon", model, f"max_lr={mean_lr}", f"muon.lr_scale={0.24 / mean_lr}"
    )
    assert chain == "weight_decay -> muon+sgd -> param_groups -> freeze"
    batches = batches_of(normalized_images, torch.float64)
    for (x, y), (their_loss, net) in zip(batches, reference_steps(reference, batches), strict=True):
        state, metrics = step(state, (x, y))
        # hooktrain's learning rates are float32 (1e-7 relative each) and this tiny run at
        # large rates amplifies that about tenfold in 12 steps, to 4e-6: 1e-4 leaves room and
        # still fails on any wrong rule (a wrong momentum, rate or ramp moves them by 1e-2;
        # parameters are of order 0.1 to 1, so 1e-5 absolute is 1e-4 of them too).
        assert metrics["loss"].item() * BATCH == pytest.approx(their_loss, rel=1e-6)
        theirs = ours_from(net, logit_scale=LOGIT_SCALE).state_dict()
        for name, tensor in [*state.params.items(), *state.buffers.items()]:
            torch.testing.assert_close(tensor, theirs[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("shape", [(16, 36), (36, 16), (24, 24)])
def test_newton_schulz_is_airbench94_muons_bit_for_bit(shape: tuple[int, int]) -> None:
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ours = newton_schulz(matrix)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, reference_newton_schulz(matrix))
    # Near-orthogonal: the singular values land around 1 (0.5 to 1.5, by design), not at 0.
    singular = torch.linalg.svdvals(ours.float())
    assert float(singular.min()) > 0.3 and float(singular.max()) < 1.6


def test_muon_refuses_to_choose_none_or_all_of_the_parameters() -> None:
    shapes = {"conv.weight": torch.Size([4, 3, 3, 3]), "head.weight": torch.Size([10, 4])}
    build = BuildContext(Recipe(name="t"), shapes, 10, sgd())
    assert Muon().hooktrain_optimizer(build=build).name == "muon+sgd"
    for include in (("nothing*",), ("*",)):
        with pytest.raises(HooktrainError, match=r"set muon\.include to match some of them"):
            Muon(include=include).hooktrain_optimizer(build=build)
