"""mixup and cutmix: their draws, their batches against the papers' formulas and code, and real
tiny runs with them (seeds in lockstep, resume, an ablation from the command line).

References are written here by hand: mixup's ``lam * x + (1 - lam) * x[perm]`` one example at a
time, CutMix's box as the paper's ``rand_bbox`` (NumPy) and its paste as the paper's slicing, the
Beta draws against scipy's Beta distribution.
"""

from __future__ import annotations

import json
import math
import shutil
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from scipy import stats
from torch.func import vmap

from hooktrain.ablation.spec import ABLATION_FILE, CELLS_FOLDER
from hooktrain.cli import main
from hooktrain.config.overrides import apply_overrides
from hooktrain.config.recipe import Recipe
from hooktrain.config.registry import load_recipe
from hooktrain.core.context import BuildContext
from hooktrain.core.optim import adam
from hooktrain.core.pieces import BatchTransform, Draws
from hooktrain.core.task import Classification, Regression
from hooktrain.errors import HooktrainError
from hooktrain.plugins.cutmix import CutMix, cutmix_draws
from hooktrain.plugins.mixup import MixUp, beta_draw, mixup_draws
from hooktrain.run.checkpoints import load_checkpoint
from hooktrain.run.loop import train, train_seeds

CLASSES = 10
# 50 real training images in 5 steps of 10, 50 test images in one evaluation batch.
TINY = ["model.width=4", "batch_size=10", "eval_batch_size=50"]
QUIET = ["metrics.progress=false", "metrics.tensorboard=false"]


def build(task: object = None) -> BuildContext:
    """What a batch transform is built from, for a 10-class run unless ``task`` says otherwise."""
    return BuildContext(
        load_recipe("resnet9_cifar10"),
        {},
        1,
        adam(),
        task=task or Classification(),
        facts={"num_outputs": CLASSES},
    )


def key(seed: int, step: int = 0) -> torch.Tensor:
    """A training state's key: its seed and step count."""
    return torch.tensor([seed, step])


def one_hot(labels: torch.Tensor) -> torch.Tensor:
    """Class probabilities of the labels, one example at a time."""
    probabilities = torch.zeros(len(labels), CLASSES, dtype=torch.float64)
    for i, label in enumerate(labels.tolist()):
        probabilities[i, label] = 1.0
    return probabilities


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against class indices, from log-softmax by hand."""
    log_probabilities = logits - logits.logsumexp(dim=1, keepdim=True)
    return -log_probabilities[torch.arange(len(labels)), labels].mean()


def batch(size: int = 8, side: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(size * side)
    x = torch.randn(size, 3, side, side, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, CLASSES, (size,), generator=generator)


# --------------------------------------------------------------------------------------------
# The draws
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b"), [(0.2, 0.2), (1.0, 1.0), (0.05, 3.0)])
def test_beta_draws_follow_the_beta_distribution(a: float, b: float) -> None:
    """100k draws: mean and variance within 5 standard errors of Beta(a, b)'s, and a KS test
    against scipy's Beta CDF at p > 0.001 (measured: p 0.28 to 0.56, errors within 1.1
    standard errors). Drawing Gamma(a + 1) for Gamma(a) (no boost) fails it at p 0, rounding
    lam to float32 at p 2e-22 for alpha 0.2."""
    n = 100_000
    draws = beta_draw(Draws(key(7, 3)), a, b, (n,)).numpy()
    assert draws.dtype == np.float64 and draws.min() >= 0 and draws.max() <= 1
    mean, variance, _, excess_kurtosis = stats.beta(a, b).stats(moments="mvsk")
    assert abs(draws.mean() - mean) < 5 * math.sqrt(variance / n)
    variance_error = math.sqrt((excess_kurtosis + 2) * variance**2 / n)
    assert abs(draws.var() - variance) < 5 * variance_error
    assert stats.kstest(draws, stats.beta(a, b).cdf).pvalue > 1e-3


def test_draws_follow_the_key() -> None:
    """The same key draws the same lam and partners; another seed or step draws others."""
    lam, partner = mixup_draws(Draws(key(1, 5)), 0.2, 16)
    again = mixup_draws(Draws(key(1, 5)), 0.2, 16)
    assert torch.equal(lam, again[0]) and torch.equal(partner, again[1])
    assert torch.equal(partner.sort().values, torch.arange(16))
    for other in (key(2, 5), key(1, 6)):
        other_lam, other_partner = mixup_draws(Draws(other), 0.2, 16)
        assert other_lam != lam and not torch.equal(other_partner, partner)


@pytest.mark.parametrize("plugin", [MixUp, CutMix])
@pytest.mark.parametrize("alpha", [0, -1.0, math.nan, math.inf, True, "1"])
def test_alpha_must_be_a_positive_number(plugin: type, alpha: object) -> None:
    name = plugin.default_name
    with pytest.raises(HooktrainError, match=rf"^{name}\.alpha must be a positive number, not"):
        plugin(alpha=alpha)


# --------------------------------------------------------------------------------------------
# mixup
# --------------------------------------------------------------------------------------------


def test_mixup_is_the_papers_formula() -> None:
    """x' = lam x + (1 - lam) x[perm] and targets lam onehot(y) + (1 - lam) onehot(y[perm]),
    one example at a time with the lam and permutation the step's key draws; the task's loss
    on them is lam CE(y) + (1 - lam) CE(y[perm]) in float64."""
    x, y = batch()
    mixed, targets = MixUp().hooktrain_batch_transform(build())(x, y, Draws(key(3, 1)))
    lam, perm = (t.clone() for t in mixup_draws(Draws(key(3, 1)), 0.2, len(x)))
    lam = lam.item()
    assert 0.01 < lam < 0.99 and not torch.equal(perm, torch.arange(len(x)))  # a real mix
    labels = one_hot(y)
    for i in range(len(x)):
        torch.testing.assert_close(mixed[i], lam * x[i] + (1 - lam) * x[perm[i]])
        torch.testing.assert_close(targets[i], lam * labels[i] + (1 - lam) * labels[perm[i]])
    assert mixed.dtype == targets.dtype == torch.float64 and targets.shape == (len(x), CLASSES)
    logits = torch.randn(len(x), CLASSES, dtype=torch.float64)
    expected = lam * cross_entropy(logits, y) + (1 - lam) * cross_entropy(logits, y[perm])
    torch.testing.assert_close(Classification().loss(logits, targets), expected)


def test_mixup_mixes_probabilities_and_measurements_as_they_are() -> None:
    """Class probabilities (from a batch transform before) and regression targets are mixed
    without one-hot; float32 batches give float32 probabilities."""
    x = torch.randn(6, 3, 4, 4)
    probabilities = torch.softmax(torch.randn(6, CLASSES), dim=1)
    measurements = torch.randn(6, 2)
    lam, perm = mixup_draws(Draws(key(4)), 0.2, 6)
    lam = lam.item()
    for task, targets in ((Classification(), probabilities), (Regression(), measurements)):
        transform = MixUp().hooktrain_batch_transform(build(task))
        mixed_x, mixed = transform(x, targets, Draws(key(4)))
        assert mixed_x.dtype == mixed.dtype == torch.float32
        for i in range(6):
            expected = lam * targets[i] + (1 - lam) * targets[perm[i]]
            torch.testing.assert_close(mixed[i], expected)
    _, from_labels = MixUp().hooktrain_batch_transform(build())(x, torch.arange(6), Draws(key(4)))
    assert from_labels.dtype == torch.float32
    torch.testing.assert_close(from_labels.sum(dim=1), torch.ones(6))


def test_mixup_refuses_class_indices_of_a_task_without_classes() -> None:
    transform = MixUp().hooktrain_batch_transform(build(Regression()))
    with pytest.raises(HooktrainError, match="mixup mixes floating-point targets"):
        transform(torch.randn(4, 3), torch.arange(4), Draws(key(0)))


# --------------------------------------------------------------------------------------------
# CutMix
# --------------------------------------------------------------------------------------------


def papers_rand_bbox(height: int, width: int, lam: float, cy: int, cx: int) -> tuple:
    """The box of the paper's code (clovaai/CutMix-PyTorch, rand_bbox), given its centre."""
    cut_rat = np.sqrt(1.0 - lam)
    cut_w, cut_h = int(width * cut_rat), int(height * cut_rat)
    bbx1, bbx2 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    bby1, bby2 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    return int(bby1), int(bby2), int(bbx1), int(bbx2)


def test_cutmix_box_is_the_papers_rand_bbox() -> None:
    """Over 200 keys the box is the paper's for the lam and the centre the key draws (lam,
    the permutation, then the centre, in that order), on a non-square image; among them are
    boxes clipped at an edge, boxes inside the image and empty boxes."""
    height, width = 12, 20
    at_an_edge = inside = empty = 0
    for seed in range(200):
        draws = Draws(key(seed, 9))
        lam = beta_draw(draws, 1.0, 1.0).item()
        draws.permutation(8)
        u_y, u_x = draws.uniform(2).tolist()
        cy, cx = int(u_y * height), int(u_x * width)
        expected = papers_rand_bbox(height, width, lam, cy, cx)
        box, _ = cutmix_draws(Draws(key(seed, 9)), 1.0, 8, height, width)
        assert tuple(int(v) for v in box) == expected
        assert torch.equal(box, box.round())
        top, bottom, left, right = expected
        if (bottom - top) * (right - left) == 0:
            empty += 1
        elif top == 0 or left == 0 or bottom == height or right == width:
            at_an_edge += 1
        else:
            inside += 1
    assert at_an_edge > 20 and inside > 20 and empty > 0  # measured: 148, 45, 7


def test_cutmix_pastes_the_partners_box_as_the_papers_code() -> None:
    """Each image gets its partner's box by slicing (the paper's code), and the targets mix by
    the area kept, lam = 1 - box area / image area; the loss is lam CE(y) + (1 - lam) CE(y[perm])
    in float64."""
    x, y = batch(size=8, side=16)
    mixed, targets = CutMix().hooktrain_batch_transform(build())(x, y, Draws(key(5, 2)))
    box, perm = cutmix_draws(Draws(key(5, 2)), 1.0, len(x), 16, 16)
    top, bottom, left, right = (int(v) for v in box)
    area = (bottom - top) * (right - left)
    assert 0 < area < 16 * 16 and not torch.equal(perm, torch.arange(len(x)))  # a real cut
    expected = x.clone()
    for i in range(len(x)):
        expected[i, :, top:bottom, left:right] = x[perm[i], :, top:bottom, left:right]
    assert torch.equal(mixed, expected)
    lam = 1 - area / (16 * 16)
    labels = one_hot(y)
    for i in range(len(x)):
        torch.testing.assert_close(targets[i], lam * labels[i] + (1 - lam) * labels[perm[i]])
    logits = torch.randn(len(x), CLASSES, dtype=torch.float64)
    reference = lam * cross_entropy(logits, y) + (1 - lam) * cross_entropy(logits, y[perm])
    torch.testing.assert_close(Classification().loss(logits, targets), reference)


def test_cutmix_refuses_batches_that_are_not_images() -> None:
    transform = CutMix().hooktrain_batch_transform(build())
    with pytest.raises(HooktrainError, match=r"cutmix pastes boxes .* shape \(4, 3\)"):
        transform(torch.randn(4, 3), torch.arange(4), Draws(key(0)))


# --------------------------------------------------------------------------------------------
# Inside the step: vmapped over seeds, compiled
# --------------------------------------------------------------------------------------------


def both(context: BuildContext) -> BatchTransform:
    """mixup then cutmix, as the step applies two batch transforms (one Draws for both)."""
    mixup = MixUp(alpha=1.0).hooktrain_batch_transform(context)
    cutmix = CutMix().hooktrain_batch_transform(context)

    def transform(
        step_key: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        draws = Draws(step_key)
        return cutmix(*mixup(x, y, draws), draws)

    return transform


def test_vmapped_lanes_draw_what_each_draws_alone() -> None:
    """Three seeds' batches transformed under one vmap equal each transformed alone, bit for
    bit, and the lanes draw differently."""
    transform = both(build())
    keys = torch.stack([key(seed, 4) for seed in (0, 1, 2)])
    generator = torch.Generator().manual_seed(0)
    xs = torch.randn(3, 6, 3, 8, 8, generator=generator)
    ys = torch.randint(0, CLASSES, (3, 6), generator=generator)
    together = vmap(transform)(keys, xs, ys)
    for lane in range(3):
        alone = transform(keys[lane], xs[lane], ys[lane])
        assert torch.equal(together[0][lane], alone[0])
        assert torch.equal(together[1][lane], alone[1])
    one, other = (transform(keys[lane], xs[0], ys[0]) for lane in (0, 1))
    assert not torch.equal(one[1], other[1])


def test_transforms_compile_to_one_graph_equal_to_eager() -> None:
    """torch.compile captures mixup and cutmix in one graph (fullgraph: no Python branch on a
    tensor value, no .item(), no graph break) and the traced graph computes what they compute
    eagerly. The aot_eager backend traces as inductor does, without generating kernels (which
    the step's own compile tests pay for)."""
    transform = both(build())
    x, y = batch(size=6, side=8)
    compiled = torch.compile(transform, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(key(2, 3), x, y), transform(key(2, 3), x, y))


# --------------------------------------------------------------------------------------------
# Real tiny runs
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_images(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real CIFAR-10 JPEGs: 5 per class for training and 5 per class for testing."""
    folder = tmp_path_factory.mktemp("real_images")
    for split in ("train", "test"):
        for source in sorted((cifar_dir / split).iterdir()):
            (folder / split / source.name).mkdir(parents=True)
            for image in sorted(source.iterdir())[:5]:
                shutil.copyfile(image, folder / split / source.name / image.name)
    return folder


def tiny(*settings: str, plugins: tuple[str, ...] = ("mixup",)) -> Recipe:
    recipe = load_recipe("resnet9_cifar10")
    return apply_overrides(recipe, [*TINY, *QUIET, *settings], with_plugins=plugins)


def last_state(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["state"]


def test_a_run_with_mixup_trains_on_real_images(real_images: Path, tmp_path: Path) -> None:
    """One epoch with mixup: a finite loss, and different weights from the run without it
    (the step really mixes)."""
    options = {"data_dir": real_images, "device": "cpu", "echo": lambda _: None}
    trained = train(tiny("epochs=1"), out_dir=tmp_path / "mixup", **options)
    assert math.isfinite(trained.report.train_loss) and math.isfinite(trained.report["test_loss"])
    plain = train(tiny("epochs=1", plugins=()), out_dir=tmp_path / "plain", **options)
    weight = "0.0.weight"
    assert not torch.allclose(trained.state.params[weight], plain.state.params[weight])


@pytest.mark.usefixtures("float64_training")
def test_seeds_in_lockstep_with_mixup_and_cutmix_equal_seeds_alone(
    real_images: Path, tmp_path: Path
) -> None:
    """Two seeds trained together (vmapped) with mixup and cutmix end where each ends trained
    alone, to 1e-7 in float64: every lane drew its own lam, partners and box."""
    recipe = tiny("epochs=1", plugins=("mixup", "cutmix"))
    seeds = [0, 1]
    options = {"data_dir": real_images, "device": "cpu", "echo": lambda _: None}
    together = [tmp_path / f"together-{seed}" for seed in seeds]
    train_seeds(recipe, seeds, out_dirs=together, **options)
    for seed, folder in zip(seeds, together, strict=True):
        alone = tmp_path / f"alone-{seed}"
        train(apply_overrides(recipe, [f"seed={seed}"]), out_dir=alone, **options)
        kept, reference = last_state(folder), last_state(alone)
        assert kept["step"] == reference["step"] == 5
        assert kept["params"]["0.0.weight"].dtype == torch.float64
        # Measured: weights agree to 1e-14. The conv biases before BatchNorm have a true
        # gradient of zero; Adam divides its rounding noise by eps, so they differ by up to 5e-9.
        torch.testing.assert_close(kept["params"], reference["params"], rtol=1e-7, atol=1e-8)
        torch.testing.assert_close(kept["buffers"], reference["buffers"], rtol=1e-7, atol=1e-9)
    first, second = last_state(together[0])["params"], last_state(together[1])["params"]
    assert not torch.allclose(first["0.0.weight"], second["0.0.weight"], rtol=1e-3)


def test_resume_with_mixup_and_cutmix_is_bit_exact(real_images: Path, tmp_path: Path) -> None:
    """2 epochs straight == 1 epoch, stop, resume, 1 more; bit for bit: the draws follow the
    state's key, so the resumed epoch mixes the same pairs with the same lam and boxes."""
    recipe = tiny("epochs=2", plugins=("mixup", "cutmix"))
    options = {"data_dir": real_images, "device": "cpu", "echo": lambda _: None}
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(recipe, out_dir=straight, **options)
    train(recipe, out_dir=split, stop_after_epoch=1, **options)
    stopped = load_checkpoint(split / "checkpoints" / "last.pt")
    assert stopped["state"]["epoch"] == 1
    train(recipe, out_dir=split, resume=stopped, **options)
    expected, resumed = last_state(straight), last_state(split)
    assert resumed["step"] == expected["step"] == 10
    for part in ("params", "buffers"):
        for name, tensor in expected[part].items():
            assert torch.equal(resumed[part][name], tensor), f"{part} {name} differs"


def succeeded(result: Result) -> str:
    """The output of a command that must have exited 0 (else its traceback, for the report)."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError("".join(traceback.format_exception(*result.exc_info)))
    assert result.exit_code == 0, result.output
    return result.output


def test_ablate_mixup_off_and_on_from_the_command_line(real_images: Path, tmp_path: Path) -> None:
    """`hooktrain ablate resnet9_cifar10 --vary mixup=off,on`: the baseline trains without
    mixup, the other cell with it, and ablation.json holds both."""
    out = tmp_path / "ablation"
    sets = [arg for s in (*TINY, *QUIET, "epochs=1") for arg in ("--set", s)]
    args = ["ablate", "resnet9_cifar10", "--vary", "mixup=off,on", "--seeds", "1", *sets]
    args += ["--device", "cpu", "--data-dir", str(real_images), "--out", str(out)]
    succeeded(CliRunner().invoke(main, args))
    saved = json.loads((out / ABLATION_FILE).read_text())
    assert saved["spec"]["vary"] == {"mixup": ["off", "on"]}
    assert [cell["name"] for cell in saved["cells"]] == ["baseline", "mixup=on"]
    for cell in saved["cells"]:
        run = out / CELLS_FOLDER / cell["folder"] / "seed-0"
        config = json.loads((run / "config.json").read_text())
        assert ("mixup" in [p["name"] for p in config["plugins"]]) == (cell["name"] != "baseline")
        assert math.isfinite(cell["runs"]["0"]["test_loss"])
