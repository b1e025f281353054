"""The speed ideas of `resnet9_fast`: each against torch's own or a hand computation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import attrs
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from hooktrain.cli import main
from hooktrain.config.overrides import apply_overrides
from hooktrain.config.registry import load_recipe
from hooktrain.core.evaluate import build_evaluate, flip_views
from hooktrain.core.state import TrainState
from hooktrain.core.task import Classification
from hooktrain.errors import HooktrainError
from hooktrain.models import resnet9
from hooktrain.plugins.ema import EMA
from hooktrain.plugins.label_smoothing import LabelSmoothing
from hooktrain.run.checkpoints import load_checkpoint
from hooktrain.run.evaluation import evaluate_checkpoint
from hooktrain.run.loop import train

KEY = torch.zeros(2, dtype=torch.int64)  # the step key: these states never step

TINY = ["model.width=4", "batch_size=40", "eval_batch_size=100", "compile=false"]
QUIET = ["metrics.progress=false", "metrics.tensorboard=false"]


def test_bias_free_convs_and_scaled_logits() -> None:
    """model.conv_bias=False leaves no conv biases (BatchNorm's shift replaces them); logit_scale
    multiplies the logits and nothing else."""
    torch.manual_seed(0)
    plain = resnet9(10, width=4, conv_bias=False)
    torch.manual_seed(0)
    scaled = resnet9(10, width=4, conv_bias=False, logit_scale=0.125)
    convs = [m for m in scaled.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(conv.bias is None for conv in convs)
    assert len(list(resnet9(10, width=4).parameters())) - len(list(plain.parameters())) == 8
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(scaled.eval()(x), 0.125 * plain.eval()(x))


def test_label_smoothing_is_cross_entropy_against_smoothed_targets() -> None:
    """The loss is the mean over images of -sum_k q_k log softmax(z)_k with the target
    q = (1 - s) one_hot(y) + s / K, computed here by hand in float64."""
    smoothing, classes = 0.2, 10
    loss = LabelSmoothing(smoothing=smoothing).hooktrain_loss(build=None)
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(32, classes, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (32,), generator=generator)
    shifted = logits - logits.max(dim=1, keepdim=True).values
    log_probs = shifted - shifted.exp().sum(dim=1, keepdim=True).log()
    targets = torch.full_like(logits, smoothing / classes)
    targets[torch.arange(32), labels] += 1 - smoothing
    expected = -(targets * log_probs).sum(dim=1).mean()
    torch.testing.assert_close(loss(logits, labels), expected, rtol=1e-12, atol=0)
    plain = -log_probs[torch.arange(32), labels].mean()
    assert not torch.allclose(loss(logits, labels), plain, rtol=1e-3)
    with pytest.raises(HooktrainError, match="below 1"):  # a sentence, not a traceback
        apply_overrides(load_recipe("resnet9_fast"), ["label_smoothing.smoothing=1.5"])


def test_flip_test_time_augmentation_averages_the_mirror_logits() -> None:
    torch.manual_seed(0)
    model = resnet9(10, width=4).eval()
    state = TrainState(
        0, 0, dict(model.named_parameters()), dict(model.named_buffers()), {}, {}, {}, KEY
    )
    x, y = torch.randn(20, 3, 32, 32), torch.randint(0, 10, (20,))
    with torch.no_grad():
        logits = (model(x) + model(x.flip(-1))) / 2
    expected_loss = F.cross_entropy(logits, y).item()
    expected_accuracy = (logits.argmax(1) == y).float().mean().item()
    task = Classification()
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    result = build_evaluate(model, task, None, views=flip_views)(state, batches)
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert result["accuracy"] == pytest.approx(expected_accuracy)
    plain = build_evaluate(model, task, None)(state, [(x, y)])
    assert plain["loss"] != pytest.approx(expected_loss, rel=1e-5)


def test_ema_averages_the_weights_it_sees() -> None:
    """Every `every` steps: average = decay * average + (1 - decay) * params."""
    ema = EMA(decay=0.9, every=2)
    params = [{"w": torch.full((3,), float(step))} for step in range(5)]

    def state(step: int) -> TrainState:
        return TrainState(step, 0, params[step], {}, {}, {}, {}, KEY)

    ema.hooktrain_fit_start(state=state(0))
    expected = torch.zeros(3)
    for step in range(1, 5):
        ema.hooktrain_step_end(state=state(step))
        if step % 2 == 0:
            expected = 0.9 * expected + 0.1 * params[step]["w"]
    torch.testing.assert_close(ema.hooktrain_eval_params(state=state(4))["w"], expected)
    assert torch.equal(params[0]["w"], torch.zeros(3))  # the state's tensors are not touched
    with pytest.raises(HooktrainError, match=r"ema\.decay"):
        EMA(decay=1.0)


def test_ema_is_what_is_evaluated_and_resumes_exactly(tiny_cifar: Path, tmp_path: Path) -> None:
    """With `ema`, the reported accuracy is the average's; stopping after one epoch and
    resuming gives the average an uninterrupted run has, bit for bit."""
    recipe = apply_overrides(
        load_recipe("resnet9_fast"),
        [*TINY, *QUIET, "epochs=2", "checkpoint.every=1", "ema.decay=0.5", "ema.every=1"],
        with_plugins=["ema"],
    )
    options = {"data_dir": tiny_cifar, "device": "cpu", "echo": lambda _: None}
    straight = train(recipe, out_dir=tmp_path / "straight", **options).report
    train(recipe, out_dir=tmp_path / "split", stop_after_epoch=1, **options)
    payload = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    resumed = train(recipe, out_dir=tmp_path / "split", resume=payload, **options).report
    # Equal in every figure but the wall time.
    assert resumed == attrs.evolve(straight, seconds=resumed.seconds)

    final = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    split = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    average = final["plugins"]["ema"]["average"]
    for name, tensor in average.items():
        assert torch.equal(tensor, split["plugins"]["ema"]["average"][name]), name
    assert not torch.equal(average["0.0.weight"], final["state"]["params"]["0.0.weight"])

    # The report's accuracy is the average's, not the raw weights'; `hooktrain eval` agrees.
    without_ema = copy.deepcopy(final)
    without_ema["config"]["plugins"] = [p for p in final["config"]["plugins"] if p["name"] != "ema"]
    raw = evaluate_checkpoint(without_ema, tiny_cifar, "cpu")
    with_average = copy.deepcopy(without_ema)
    with_average["state"]["params"] = average
    averaged = evaluate_checkpoint(with_average, tiny_cifar, "cpu")
    assert straight["test_loss"] == pytest.approx(averaged["loss"], rel=1e-6)
    assert straight["test_loss"] != pytest.approx(raw["loss"], rel=1e-6)
    assert evaluate_checkpoint(final, tiny_cifar, "cpu") == averaged


def test_fast_recipe_trains_through_the_cli(tiny_cifar: Path, tmp_path: Path) -> None:
    out = tmp_path / "fast"
    result = CliRunner().invoke(
        main,
        ["run", "resnet9_fast", "--data-dir", str(tiny_cifar), "--out", str(out),
         "--device", "cpu", *(a for s in [*TINY, *QUIET, "epochs=2"] for a in ("--set", s))],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"]["optimizer"] == "sgd"
    assert config["recipe"]["model"]["args"]["conv_bias"] is False
    assert [p["name"] for p in config["plugins"]] == [
        "data_parallel",
        "nan_guard",
        "onecycle",
        "weight_decay",
        "label_smoothing",
        "metrics",
        "checkpoint",
    ]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["finished"] and summary["final_test_accuracy"] is not None
