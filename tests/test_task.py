"""Tasks and evaluation against plain torch computations on the whole split.

Models run in float64 on real CIFAR-10 test images, so sums over batches, vmapped lanes and
compiled sums must agree with the references to 1e-12: they differ only in the order of
float64 additions (about 1e-16 each). Counts (accuracy, top-k) are exact.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.io import decode_jpeg, read_file

from hooktrain.core.evaluate import Metrics, build_evaluate, build_lane_evaluate, flip_views
from hooktrain.core.state import TrainState
from hooktrain.core.task import Classification, Regression, Task, check_metric
from hooktrain.errors import HooktrainError
from hooktrain.models import resnet9

KEY = torch.zeros(2, dtype=torch.int64)  # the step key: these states never step

# The images are decoded with torchvision.io, deprecated (but working) since 0.29.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)
CLOSE = {"rel": 1e-12, "abs": 1e-15}
Batches = list[tuple[torch.Tensor, torch.Tensor]]


@pytest.fixture(scope="module")
def images(cifar_dir: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Three real test images per class in [0, 1] (float64), their labels and the classes."""
    classes = sorted(folder.name for folder in (cifar_dir / "test").iterdir())
    pixels, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((cifar_dir / "test" / name).iterdir())[:3]:
            pixels.append(decode_jpeg(read_file(str(path))))
            labels.append(label)
    return torch.stack(pixels).double() / 255, torch.tensor(labels), classes


def model_of(outputs: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return resnet9(outputs, width=4).double().eval()


def state_of(model: nn.Module) -> TrainState:
    return TrainState(
        0, 0, dict(model.named_parameters()), dict(model.named_buffers()), {}, {}, {}, KEY
    )


def in_batches(x: torch.Tensor, y: torch.Tensor, size: int = 7) -> Batches:
    """The split in batches of ``size``, the last one shorter."""
    return list(zip(x.split(size), y.split(size), strict=True))


def brightness(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Regression targets measured on the images: mean brightness, overall or per channel."""
    return x.mean(dim=(2, 3)) if per_channel else x.mean(dim=(1, 2, 3))


def assert_close(result: Metrics, expected: Metrics) -> None:
    assert result.keys() == expected.keys()
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, **CLOSE), name


def test_classification_metrics_match_the_whole_split(images: tuple) -> None:
    """Sums over five batches give the split's mean cross-entropy, accuracy and top-5
    (counted by hand: the target's logit has fewer than five larger ones)."""
    x, y, classes = images
    task = Classification()
    assert task.num_outputs(classes, y) == 10
    model = model_of(task.num_outputs(classes, y))
    with torch.no_grad():
        logits = model(x)
    result = build_evaluate(model, task, None)(state_of(model), in_batches(x, y))
    larger = (logits > logits[torch.arange(len(y)), y][:, None]).sum(dim=1)
    assert result == pytest.approx(
        {
            "loss": F.cross_entropy(logits, y).item(),
            "accuracy": (logits.argmax(dim=1) == y).sum().item() / len(y),
            "top5": (larger < 5).sum().item() / len(y),
        },
        **CLOSE,
    )
    assert 0 < result["top5"] < 1  # the count is not trivial on these images
    assert tuple(result) == task.metric_names
    assert torch.equal(task.loss(logits, y), F.cross_entropy(logits, y))


def test_top_k_counts_by_rank_and_is_one_with_k_classes_or_fewer() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 3, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (50,), generator=generator)
    larger = (logits > logits[torch.arange(50), y][:, None]).sum(dim=1)
    two = Classification(top_k=2).metric_sums(logits, y)
    assert two["top2"].item() == (larger < 2).sum().item() < 50
    assert Classification(top_k=3).metric_sums(logits, y)["top3"].item() == 50
    assert Classification().metric_sums(logits, y)["top5"].item() == 50
    assert Classification(top_k=2).metric_names == ("loss", "accuracy", "top2")


@pytest.mark.parametrize("per_channel", [False, True], ids=["targets (N,)", "targets (N, 3)"])
def test_regression_metrics_match_torch_losses(images: tuple, per_channel: bool) -> None:
    """MSE and MAE over every target number, as F.mse_loss and F.l1_loss on the whole split."""
    x, _, classes = images
    targets = brightness(x, per_channel)
    task = Regression()
    assert task.num_outputs(classes, targets) == (3 if per_channel else 1)
    model = model_of(task.num_outputs(classes, targets))
    with torch.no_grad():
        outputs = model(x).reshape(targets.shape)
    result = build_evaluate(model, task, None)(state_of(model), in_batches(x, targets))
    mse = F.mse_loss(outputs, targets).item()
    assert_close(result, {"loss": mse, "mse": mse, "mae": F.l1_loss(outputs, targets).item()})
    with torch.no_grad():
        torch.testing.assert_close(
            task.loss(model(x), targets), F.mse_loss(outputs, targets), rtol=1e-12, atol=0
        )


@pytest.mark.parametrize(
    ("task", "tta_flip"),
    [(Classification(), False), (Regression(), True)],
    ids=["classification", "regression, flipped"],
)
def test_lane_evaluation_equals_evaluating_each_seed_alone(
    images: tuple, task: Task, tta_flip: bool
) -> None:
    x, y, classes = images
    targets = y if isinstance(task, Classification) else brightness(x, per_channel=True)
    models = [model_of(task.num_outputs(classes, targets), seed) for seed in range(3)]
    states = [state_of(model) for model in models]
    batches = in_batches(x, targets)
    together = build_lane_evaluate(models[0], task, None, views=flip_views if tta_flip else None)(
        states, batches
    )
    alone = build_evaluate(models[0], task, None, views=flip_views if tta_flip else None)
    assert len(together) == 3
    for lane, state in zip(together, states, strict=True):
        assert_close(lane, alone(state, batches))
    assert together[0] != pytest.approx(together[1], **CLOSE)  # the seeds' own weights


def test_flip_averages_the_outputs_of_image_and_mirror(images: tuple) -> None:
    x, y, _ = images
    task = Classification()
    model = model_of(10)
    with torch.no_grad():
        logits = (model(x) + model(x.flip(-1))) / 2
    flipped = build_evaluate(model, task, None, views=flip_views)(state_of(model), in_batches(x, y))
    assert flipped["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), **CLOSE)
    assert flipped["accuracy"] == (logits.argmax(dim=1) == y).sum().item() / len(y)
    plain = build_evaluate(model, task, None)(state_of(model), in_batches(x, y))
    assert plain["loss"] != pytest.approx(flipped["loss"], rel=1e-6)


def test_processes_that_add_their_totals_all_get_the_whole_split(images: tuple) -> None:
    """Each process evaluates its share (one of them none) and passes its totals to the
    collective, here the sum of what the three processes sent, as all_reduce computes it."""
    x, y, _ = images
    task, model = Classification(), model_of(10)
    state, batches = state_of(model), in_batches(x, y)
    shares = [batches[:2], batches[2:], []]

    def sent(share: Batches) -> torch.Tensor:
        captured = []
        build_evaluate(model, task, None, sum_over_processes=lambda t: captured.append(t) or t)(
            state, share
        )
        return captured[0].clone()

    totals = sum(sent(share) for share in shares)
    whole = build_evaluate(model, task, None)(state, batches)
    for share in shares:
        collective = build_evaluate(model, task, None, sum_over_processes=lambda t: totals)
        assert_close(collective(state, share), whole)


def test_an_empty_split_gives_nan_for_every_metric() -> None:
    model = model_of(10)
    for task in (Classification(top_k=3), Regression()):
        alone = build_evaluate(model, task, None)(state_of(model), [])
        assert tuple(alone) == task.metric_names
        assert all(value != value for value in alone.values())
        lanes = build_lane_evaluate(model, task, None)([state_of(model)] * 2, [])
        assert len(lanes) == 2 and all(lane.keys() == alone.keys() for lane in lanes)


@pytest.mark.parametrize("task", [Classification(), Regression()], ids=type)
def test_metric_sums_run_inside_vmap_and_compile(task: Task) -> None:
    """Pure tensor work: vmapped over lanes and compiled whole (no graph break, so no host
    sync), the sums equal those of each lane alone."""
    generator = torch.Generator().manual_seed(0)
    outputs = torch.randn(3, 40, 10, generator=generator, dtype=torch.float64)
    if isinstance(task, Classification):
        targets = torch.randint(0, 10, (40,), generator=generator)
    else:
        targets = torch.randn(40, 10, generator=generator, dtype=torch.float64)
    alone = [task.metric_sums(lane, targets) for lane in outputs]
    lanes = torch.func.vmap(task.metric_sums, in_dims=(0, None))(outputs, targets)
    compiled = torch.compile(task.metric_sums, fullgraph=True)
    for index, sums in enumerate(alone):
        assert sums.keys() == set(task.metric_names)
        for name, value in sums.items():
            torch.testing.assert_close(lanes[name][index], value, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(
                compiled(outputs[index], targets)[name], value, rtol=1e-12, atol=1e-15
            )


def assert_sentence(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert message.endswith(".") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


SHAPE_CASES = {
    "classification of measurements": (Classification(), "per channel", ["(30, 3)", "regression"]),
    "too few outputs": (Regression(), "two columns", ["(30, 2)", "as many outputs"]),
    "regression of classes": (Regression(), "labels", ["torch.int64", "(30, 3)"]),
}


@pytest.mark.parametrize("case", SHAPE_CASES)
def test_shape_mismatches_are_refused_in_a_sentence(images: tuple, case: str) -> None:
    """Training loss, evaluation alone and in lanes: one sentence naming the shapes."""
    x, y, _ = images
    task, kind, fragments = SHAPE_CASES[case]
    targets = {
        "per channel": brightness(x, per_channel=True),
        "two columns": brightness(x, per_channel=True)[:, :2],
        "labels": y,
    }[kind]
    model = model_of(3)
    state = state_of(model)
    if isinstance(task, Classification):
        # Floats of the outputs' shape train as class probabilities (what mixup makes), so
        # the data's targets are checked before training, where the outputs are counted.
        with pytest.raises(HooktrainError) as error:
            task.num_outputs(["a", "b", "c"], targets)
    else:
        with pytest.raises(HooktrainError) as error:
            task.loss(model(x), targets)
    assert_sentence(error, *fragments)
    with pytest.raises(HooktrainError) as error:
        build_evaluate(model, task, None)(state, [(x, targets)])
    assert_sentence(error, *fragments)
    with pytest.raises(HooktrainError) as error:
        build_lane_evaluate(model, task, None)([state, state], [(x, targets)])
    assert_sentence(error, *fragments)


def test_outputs_and_targets_the_tasks_cannot_read_are_refused(images: tuple) -> None:
    _, y, _ = images
    with pytest.raises(HooktrainError) as error:
        Classification().metric_sums(torch.zeros(30, 10, 2), y)
    assert_sentence(error, "(examples, classes)", "(30, 10, 2)")
    with pytest.raises(HooktrainError) as error:
        Regression().num_outputs([], y)
    assert_sentence(error, "floating-point", "classification")
    with pytest.raises(HooktrainError) as error:
        Classification().num_outputs([], y)
    assert_sentence(error, "classes")


@attrs.frozen
class WithRootMeanSquare(Regression):
    """A task that names a metric its sums forget."""

    metric_names = ("loss", "mse", "mae", "rmse")


def test_settings_and_metric_names_are_checked_before_training(images: tuple) -> None:
    with pytest.raises(HooktrainError) as error:
        Classification(top_k=0)
    assert_sentence(error, "task.top_k", "at least 1", "0")
    check_metric(Classification(top_k=3), "top3", "best.metric")
    with pytest.raises(HooktrainError) as error:
        check_metric(Classification(), "mse", "best.metric")
    assert_sentence(error, "best.metric", "'mse'", "loss, accuracy, top5")
    x, _, _ = images
    model = model_of(1)
    with pytest.raises(HooktrainError) as error:
        build_evaluate(model, WithRootMeanSquare(), None)(state_of(model), [(x, x.mean((1, 2, 3)))])
    assert_sentence(error, "rmse", "metric_sums")
