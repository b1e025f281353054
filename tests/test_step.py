"""The functional step against plain PyTorch: torch.optim, OneCycleLR and clip_grad_value_.

Everything runs in float64. Two implementations of the same arithmetic (ours and torch.optim,
compiled and eager) sum in different orders; in float32 a ReLU input within rounding of zero
takes the other side in one of them, and tiny nets then drift apart by far more than rounding
within a few steps, by how much depending on the CPU. In float64 only the learning rate and
Adam's bias corrections stay float32 numbers (rounded to 6e-8 of each update): over six steps
of rates up to 0.03 the implementations agree to 1e-8 (measured: 4e-9), while a rate off by 1%
for a single step moves the weights by 1e-5 or more.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hooktrain.core.evaluate import build_evaluate
from hooktrain.core.optim import Optimizer, adam, make_optimizer, sgd
from hooktrain.core.pieces import DecayRule, GradientTransform
from hooktrain.core.state import TrainState
from hooktrain.core.step import StepPieces, build_step, constant_schedule
from hooktrain.core.task import Classification
from hooktrain.core.transforms import Chain, weight_decay_member
from hooktrain.plugins.grad_clip import clip_by_value
from hooktrain.plugins.onecycle import onecycle_schedule

STEPS = 6
SAME = {"rtol": 1e-7, "atol": 5e-8}  # float32 learning rates in float64 runs: see above


def small_net() -> nn.Module:
    # No conv bias before BatchNorm: its gradient is zero up to rounding noise, which Adam
    # would scale up to full steps of random sign and so no two implementations would agree.
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    return net.double()


def batches(count: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(16, 3, 8, 8, generator=generator, dtype=torch.float64),
            torch.randint(0, 10, (16,), generator=generator),
        )
        for _ in range(count)
    ]


def decays(name: str) -> bool:
    """Conv and linear weights decay, BatchNorm parameters and biases do not."""
    return name.endswith("weight") and not name.startswith(("1.", "4."))


def torch_groups(model: nn.Module, rate: float) -> list[dict]:
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if decays(n)], "weight_decay": rate},
        {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0},
    ]


def chain(
    model: nn.Module,
    optimizer: Optimizer,
    transforms: list[GradientTransform] = (),
    decay: DecayRule | None = None,
) -> Chain:
    """The chain the engine composes: the transforms, coupled decay, the optimizer (with
    decoupled decay right after it)."""
    names = [n for n, _ in model.named_parameters()]
    decay_members = [] if decay is None else [weight_decay_member(decay, names)]
    return Chain.of([*transforms, *decay_members], optimizer)


def run_ours(pieces: StepPieces, model: nn.Module, data) -> TrainState:
    state = TrainState.create(model, pieces.chain, seed=0)
    step = build_step(pieces)
    for batch in data:
        state, _ = step(state, batch)
    return state


def assert_same_model(state: TrainState, model: nn.Module) -> None:
    for name, tensor in model.named_parameters():
        torch.testing.assert_close(state.params[name], tensor.detach(), **SAME)
    for name, tensor in model.named_buffers():
        torch.testing.assert_close(state.buffers[name], tensor, **SAME)


OPTIMIZERS = {
    "adam_l2": (
        lambda: adam(),
        lambda groups, lr: torch.optim.Adam(groups, lr=lr),
        False,
    ),
    "adamw": (
        lambda: adam(decoupled_decay=True),
        lambda groups, lr: torch.optim.AdamW(groups, lr=lr),
        True,
    ),
    "sgd_nesterov": (
        lambda: sgd(momentum=0.9, nesterov=True),
        lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True),
        False,
    ),
    "sgd_momentum": (
        lambda: sgd(momentum=0.8, nesterov=False),
        lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.8),
        False,
    ),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_optimizer_with_weight_decay_groups_matches_torch_optim(kind: str) -> None:
    make_ours, make_torch, decoupled = OPTIMIZERS[kind]
    rate, lrs = 0.05, [0.01, 0.02, 0.005, 0.03, 0.01, 0.002]
    model = small_net()
    reference = copy.deepcopy(model)
    optimizer = make_torch(torch_groups(reference, rate), lrs[0])
    for (x, y), lr in zip(batches(), lrs, strict=True):
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        optimizer.step()

    names = tuple(n for n, _ in model.named_parameters())
    lr_table = torch.tensor(lrs)
    decay = DecayRule(rate_of=lambda n: rate if decays(n) else 0.0, decoupled=decoupled)
    pieces = StepPieces(
        model=model,
        chain=chain(model, make_ours(), decay=decay),
        param_names=names,
        schedule=lambda step: lr_table[step],
    )
    assert_same_model(run_ours(pieces, model, batches()), reference)


def test_seed_training_loop_matches_plain_pytorch() -> None:
    """Adam + L2 1e-4 + OneCycleLR per batch + clip_grad_value_(0.1), as the seed notebook."""
    max_lr, steps = 0.01, 12
    model = small_net()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.Adam(reference.parameters(), lr=max_lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr, total_steps=steps, cycle_momentum=False
    )
    data = batches(steps)
    for x, y in data:
        optimizer.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        nn.utils.clip_grad_value_(reference.parameters(), 0.1)
        optimizer.step()
        scheduler.step()

    optimizer = make_optimizer("adam", betas=(0.9, 0.999), eps=1e-8, momentum=0, nesterov=False)
    pieces = StepPieces(
        model=model,
        chain=chain(model, optimizer, [clip_by_value(0.1)], DecayRule(rate_of=lambda n: 1e-4)),
        param_names=tuple(n for n, _ in model.named_parameters()),
        schedule=onecycle_schedule(max_lr, steps),
    )
    assert_same_model(run_ours(pieces, model, data), reference)


def test_step_is_pure_and_reports_device_metrics() -> None:
    model = small_net()
    pieces = StepPieces(
        model=model,
        chain=chain(model, adam(), [clip_by_value(0.1)]),
        param_names=tuple(n for n, _ in model.named_parameters()),
        schedule=constant_schedule(0.01),
    )
    state = TrainState.create(model, pieces.chain, seed=0)
    before = {k: v.clone() for k, v in {**state.params, **state.buffers}.items()}
    key_before = state.key.clone()
    new_state, metrics = build_step(pieces)(state, batches(1)[0])
    for name, tensor in {**state.params, **state.buffers}.items():
        assert torch.equal(tensor, before[name]), f"the step wrote to its input {name}"
    assert torch.equal(state.key, key_before), "the step wrote to its input key"
    assert new_state.step == 1 and int(new_state.opt_state["count"]) == 1
    # The key keeps its seed and counts the step: in-step randomness differs step by step.
    assert new_state.key[0] == state.key[0] and int(new_state.key[1]) == 1
    assert set(metrics) == {"loss", "lr", "grad_norm"}
    assert all(v.dim() == 0 for v in metrics.values())
    assert float(metrics["lr"]) == pytest.approx(0.01)


def test_evaluate_matches_the_model_in_eval_mode() -> None:
    model = small_net()
    state = run_ours(
        StepPieces(
            model,
            chain(model, adam()),
            tuple(n for n, _ in model.named_parameters()),
            constant_schedule(0.01),
        ),
        model,
        batches(3),
    )
    reference = copy.deepcopy(model).eval()
    reference.load_state_dict({**state.params, **state.buffers})
    data = batches(2)
    with torch.no_grad():
        logits = torch.cat([reference(x) for x, _ in data])
    targets = torch.cat([y for _, y in data])
    result = build_evaluate(copy.deepcopy(model).eval(), Classification(), None)(state, data)
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-12)
    assert result["accuracy"] == pytest.approx((logits.argmax(1) == targets).float().mean().item())


def test_compiled_step_matches_eager() -> None:
    """One compile of the whole step (forward, backward, clip, decay, Adam): ~30 s on CPU,
    and no recompile after it."""
    model = small_net()
    names = tuple(n for n, _ in model.named_parameters())
    decay = DecayRule(rate_of=lambda n: 1e-4 if decays(n) else 0.0)
    pieces = StepPieces(
        model=model,
        chain=chain(model, adam(), [clip_by_value(0.1)], decay),
        param_names=names,
        schedule=onecycle_schedule(0.01, STEPS),
    )
    results = []
    for compile in (False, True):
        state = TrainState.create(model, pieces.chain, seed=0)
        step = build_step(pieces, compile=compile)
        losses = []
        first, *rest = batches()
        # The first step compiles (a recompile when other tests compiled the step for other
        # shapes); its compile then serves every step: a state that came back in other
        # containers, or a Python number that changes, would recompile (and raise here).
        state, metrics = step(state, first)
        losses.append(float(metrics["loss"]))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for batch in rest:
                state, metrics = step(state, batch)
                losses.append(float(metrics["loss"]))
        results.append((state, losses))
    (eager, eager_losses), (compiled, compiled_losses) = results
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-7)
    for name in names:
        torch.testing.assert_close(compiled.params[name], eager.params[name], **SAME)
