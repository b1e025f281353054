"""The airbench plugins' guards: what they refuse, and how they behave under several processes
(the frozen whitening weight, the whitening images), tested without starting any."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from hooktrain.config.overrides import apply_overrides
from hooktrain.config.recipe import Recipe
from hooktrain.config.registry import load_recipe
from hooktrain.core.context import BuildContext
from hooktrain.core.optim import sgd
from hooktrain.core.pieces import Replicas
from hooktrain.core.step import _average_replicas
from hooktrain.data.device import DeviceData
from hooktrain.errors import HooktrainError
from hooktrain.models.airbench import BiasBatchNorm, airbench_net
from hooktrain.plugins.bias_lr import BiasLR
from hooktrain.plugins.freeze import Freeze, freeze_after
from hooktrain.plugins.multi_crop import MultiCrop
from hooktrain.plugins.swa import recompute_batchnorm
from hooktrain.plugins.whitening import spread_images
from hooktrain.run.build import load_splits

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def build_of(model: nn.Module, **facts: object) -> BuildContext:
    shapes = {name: p.shape for name, p in model.named_parameters()}
    return BuildContext(Recipe(name="t"), shapes, 10, sgd(), facts=dict(facts))


def test_airbench_batchnorm_is_a_batchnorm_with_a_shift_alone() -> None:
    norm = BiasBatchNorm(4, momentum=0.4)
    assert isinstance(norm, nn.modules.batchnorm._BatchNorm)  # SyncBatchNorm and swa see it
    assert [name for name, _ in norm.named_parameters()] == ["bias"]
    with torch.no_grad():
        norm.bias.fill_(0.5)
    x = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    expected = nn.functional.batch_norm(x, None, None, training=True, eps=1e-12) + 0.5
    torch.testing.assert_close(norm(x), expected)
    model = airbench_net(width=2)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    batch = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fresh = recompute_batchnorm(model, params, buffers, [(batch, torch.zeros(16))])
    # swa's recomputation finds its layers: their statistics are measured, not the initial 0.
    assert not torch.equal(fresh["block1.norm1.running_mean"], buffers["block1.norm1.running_mean"])


def test_replicas_leave_a_buffer_no_layer_changes_bit_for_bit() -> None:
    """Three equal replicas: (b + b + b) / 3 rounds, an averaged change of 0 does not."""
    constant = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert not torch.equal((constant + constant + constant) / 3, constant)
    stats = torch.zeros(1000)

    def average(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [(t + t + t) / 3 for t in tensors]

    old = {"whiten.weight": constant, "norm.running_mean": stats}
    new = {"whiten.weight": constant.clone(), "norm.running_mean": stats + 0.25}
    _, _, buffers = _average_replicas(Replicas(average), {}, torch.tensor(1.0), old, new)
    assert torch.equal(buffers["whiten.weight"], constant)
    torch.testing.assert_close(buffers["norm.running_mean"], stats + 0.25)


def test_every_process_whitens_from_the_images_one_process_would(tiny_cifar: Path) -> None:
    recipe = apply_overrides(load_recipe("airbench94"), ["batch_size=40", "eval_batch_size=30"])
    splits = load_splits(recipe, tiny_cifar, print)
    alone, *shards = (
        DeviceData(splits, torch.device("cpu"), 40, eval_batch_size=30, shard=s, shards=n)
        for s, n in ((0, 1), (0, 4), (3, 4))
    )
    for shard in shards:
        torch.testing.assert_close(spread_images(shard, 24), spread_images(alone, 24))
    assert len(spread_images(alone, 24)) == 24


def test_multi_crop_refuses_inputs_that_are_not_images_and_shifts_past_them() -> None:
    model = airbench_net(width=2)
    with pytest.raises(HooktrainError, match=r"not \(channels, height, width\); drop the plugin"):
        MultiCrop().hooktrain_eval_views(build=build_of(model, input_shape=(6,)))
    with pytest.raises(HooktrainError, match=r"multi_crop\.shift is 32"):
        MultiCrop(shift=32).hooktrain_eval_views(build=build_of(model, input_shape=(3, 32, 32)))
    views = MultiCrop(shift=31).hooktrain_eval_views(build=build_of(model, input_shape=(3, 32, 32)))
    assert len(views(torch.zeros(2, 3, 32, 32))) == 6


def test_a_pattern_given_as_a_string_is_refused() -> None:
    for make in (lambda: BiasLR(include="*norm*.bias"), lambda: Freeze(include="whiten.bias")):
        with pytest.raises(HooktrainError, match="a single pattern needs the comma"):
            make()


def test_bias_lr_refuses_patterns_that_match_nothing() -> None:
    model = airbench_net(width=2)
    assert BiasLR().hooktrain_param_groups(build=build_of(model)).label_of("block1.norm1.bias")
    with pytest.raises(HooktrainError, match=r"bias_lr\.include \['\*bn\*'\] matches no"):
        BiasLR(include=("*bn*",)).hooktrain_param_groups(build=build_of(model))


def test_the_freeze_ramp_keeps_a_parameter_still_where_the_rate_is_zero() -> None:
    member = freeze_after("freeze", [0], after_steps=3, ramp_from=1.0)
    params = [torch.ones(2)]
    state = member.init(params)
    updates, state, _ = member.update([torch.zeros(2)], state, params, torch.tensor(0.0))
    assert torch.equal(updates[0], torch.zeros(2))  # not NaN
    updates, _, _ = member.update([torch.full((2,), -0.5)], state, params, torch.tensor(0.5))
    # Step index 1 of 3: the ramp's rate is 1 * (1 - 1/3), the schedule's 0.5.
    torch.testing.assert_close(updates[0], torch.full((2,), -0.5 * (2 / 3) / 0.5))
