"""Seeds trained together (vmapped) against seeds trained alone, and the dropout that allows it."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.func import functional_call, vmap

from hooktrain import Ref
from hooktrain.cli import main
from hooktrain.config.overrides import apply_overrides
from hooktrain.config.registry import load_recipe
from hooktrain.core.context import BuildContext
from hooktrain.core.optim import adam, sgd
from hooktrain.core.state import TrainState
from hooktrain.core.step import StepPieces, build_lane_step, build_step
from hooktrain.core.transforms import Chain, weight_decay_member
from hooktrain.errors import HooktrainError
from hooktrain.models import Dropout, hashed_uniform, resnet9
from hooktrain.plugins.grad_clip import clip_by_norm, clip_by_value
from hooktrain.plugins.onecycle import onecycle_schedule
from hooktrain.plugins.weight_decay import WeightDecay
from hooktrain.run.build import recipe_model
from hooktrain.run.checkpoints import load_checkpoint
from hooktrain.run.loop import train, train_seeds

# Two steps per epoch on 80 of the tiny set's images.
TINY = ["model.width=4", "batch_size=40", "train_limit=80", "eval_batch_size=100"]
QUIET = ["metrics.progress=false", "metrics.tensorboard=false"]
FACTS = {"num_classes": 10, "num_outputs": 10, "input_shape": [3, 32, 32], "in_channels": 3}


def flagship(*settings: str) -> object:
    return apply_overrides(load_recipe("resnet9_cifar10"), [*TINY, *QUIET, *settings])


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", [adam(), sgd()], ids=["adam", "sgd"])
def test_lane_step_equals_single_steps_in_float64(optimizer: object) -> None:
    """Three seeds through one vmapped step, twelve times, equal each seed stepped alone.

    Every piece of the flagship is in play (one-cycle, decay groups, clipping by value and by
    global norm, dropout 0.2, BatchNorm). Float64 shows the arithmetic is the same: in float32
    a max-pool or ReLU decision that flips on a rounding difference makes tiny nets drift apart
    within a dozen steps, which is chaos, not a different computation. The conv biases before
    BatchNorm have a true gradient of zero: Adam divides their rounding noise (1e-17) by its
    eps (1e-8), so they move apart by up to 2e-9 (measured), hence atol 1e-8 on the weights.
    """
    lanes = 3
    states = []
    torch.manual_seed(0)
    shapes = resnet9(10, width=4, dropout=0.2).double().train()
    names = tuple(name for name, _ in shapes.named_parameters())
    shapes_by_name = {name: p.shape for name, p in shapes.named_parameters()}
    build = BuildContext(load_recipe("resnet9_cifar10"), shapes_by_name, 12, optimizer)
    decay = WeightDecay(rate=5e-4).hooktrain_weight_decay(build=build)
    clips = [clip_by_value(0.5), attrs.evolve(clip_by_norm(1.0), name="clip_norm")]
    chain = Chain.of([*clips, weight_decay_member(decay, names)], optimizer)
    pieces = StepPieces(
        model=shapes,
        chain=chain,
        param_names=names,
        schedule=onecycle_schedule(0.05, 12),
    )
    for seed in range(lanes):
        torch.manual_seed(seed)
        states.append(TrainState.create(resnet9(10, width=4, dropout=0.2).double(), chain, seed))
    alone_step, together_step = build_step(pieces), build_lane_step(pieces)
    generator = torch.Generator().manual_seed(0)
    alone, together = list(states), list(states)
    for _ in range(12):
        batches = [
            (
                torch.randn(16, 3, 32, 32, generator=generator, dtype=torch.float64),
                torch.randint(0, 10, (16,), generator=generator),
            )
            for _ in range(lanes)
        ]
        together, together_metrics = together_step(together, batches)
        stepped = [alone_step(state, batch) for state, batch in zip(alone, batches, strict=True)]
        alone = [state for state, _ in stepped]
        for (_, metrics), lane_metrics in zip(stepped, together_metrics, strict=True):
            torch.testing.assert_close(lane_metrics, metrics, rtol=1e-7, atol=1e-9)
    for one, other in zip(alone, together, strict=True):
        assert other.step == one.step == 12
        torch.testing.assert_close(other.params, one.params, rtol=1e-7, atol=1e-8)
        torch.testing.assert_close(other.buffers, one.buffers, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(other.opt_state, one.opt_state, rtol=1e-7, atol=1e-9)
    # The seeds really are different runs.
    assert not torch.allclose(together[0].params["0.0.weight"], together[1].params["0.0.weight"])


# --------------------------------------------------------------------------------------------
# Whole runs
# --------------------------------------------------------------------------------------------


def _train_together_and_alone(
    data_dir: Path, out: Path, seeds: list[int]
) -> list[tuple[dict, dict]]:
    """Two SGD steps at a constant rate, the seeds trained together and then each alone: the
    pairs of final checkpoints (together, alone)."""
    recipe = apply_overrides(
        flagship("optimizer=sgd", "max_lr=0.05", "epochs=1"), without_plugins=["onecycle"]
    )
    options = {"data_dir": data_dir, "device": "cpu", "echo": lambda _: None}
    train_seeds(recipe, seeds, out_dirs=[out / f"together-{s}" for s in seeds], **options)
    for seed in seeds:
        train(apply_overrides(recipe, [f"seed={seed}"]), out_dir=out / f"alone-{seed}", **options)
    return [
        (
            load_checkpoint(out / f"together-{seed}" / "checkpoints" / "last.pt"),
            load_checkpoint(out / f"alone-{seed}" / "checkpoints" / "last.pt"),
        )
        for seed in seeds
    ]


def _final_losses(run_dir: Path) -> tuple[float, float]:
    epoch = json.loads((run_dir / "metrics.json").read_text())["epochs"][-1]
    return epoch["train_loss"], epoch["test_loss"]


@pytest.mark.usefixtures("float64_training")
def test_seeds_trained_together_equal_seeds_trained_alone(tiny_cifar: Path, tmp_path: Path) -> None:
    """train_seeds on three seeds gives each seed the run it gets alone: own initialisation,
    data order, augmentation and dropout masks, to 1e-7 in float64 (measured: 2e-16).

    A wrong batch or mask is far outside: shifting the data order by one image or drawing the
    next dropout mask moves some weight tensor by twice as much as training moved it.
    """
    seeds = [0, 1, 2]
    pairs = _train_together_and_alone(tiny_cifar, tmp_path, seeds)
    exact = {"rtol": 1e-7, "atol": 1e-9}
    for seed, (kept, reference) in zip(seeds, pairs, strict=True):
        assert kept["config"]["recipe"]["seed"] == seed
        assert kept["state"]["step"] == reference["state"]["step"] == 2
        assert kept["state"]["params"]["0.0.weight"].dtype == torch.float64
        for kind in ("params", "buffers", "opt_state"):
            torch.testing.assert_close(kept["state"][kind], reference["state"][kind], **exact)
        together = _final_losses(tmp_path / f"together-{seed}")
        assert together == pytest.approx(_final_losses(tmp_path / f"alone-{seed}"), rel=1e-7)
    # The seeds are different runs, far beyond the tolerance.
    first, second = pairs[0][0]["state"]["params"], pairs[1][1]["state"]["params"]
    assert not torch.allclose(first["0.0.weight"], second["0.0.weight"], rtol=1e-3)


def test_seeds_together_in_float32_stay_within_rounding_of_alone(
    tiny_cifar: Path, tmp_path: Path
) -> None:
    """The same two steps in float32: each weight tensor's distance from the seed trained
    alone is under 10% of how far training moved it; a wrong batch, mask or initialisation
    makes it 100% or more.

    Float32 cannot be tighter on every CPU: the vmapped and the single model's convolutions sum
    in different orders, and where a ReLU input lies within 1e-6 of zero or two max-pool inputs
    within 1e-6 of each other, the gradient goes another way. Such a flip moves the weight
    gradients by 0.1-0.3% of their size and the next step's by 2% (measured on this model);
    measured here: 0.73% for seed 0, where a flip came in step one. A wrong batch order (shifted
    by one image) or the next dropout mask gives 190-210%, a wrong seed 1370%.
    """
    seeds = [0, 1]
    pairs = _train_together_and_alone(tiny_cifar, tmp_path, seeds)
    for seed, (kept, reference) in zip(seeds, pairs, strict=True):
        torch.manual_seed(seed)
        initial = dict(recipe_model(flagship(), FACTS).named_parameters())
        for name, start in initial.items():
            moved = reference["state"]["params"][name] - start.detach()
            apart = kept["state"]["params"][name] - reference["state"]["params"][name]
            # (+1e-5: a conv bias before BatchNorm has a zero gradient and does not move.)
            assert apart.norm() <= 0.1 * moved.norm() + 1e-5, name
        torch.testing.assert_close(
            kept["state"]["buffers"], reference["state"]["buffers"], rtol=1e-3, atol=1e-4
        )
        together = _final_losses(tmp_path / f"together-{seed}")
        assert together == pytest.approx(_final_losses(tmp_path / f"alone-{seed}"), rel=1e-3)


def test_seeds_together_resume_exactly(tiny_cifar: Path, tmp_path: Path) -> None:
    """Two seeds stopped after epoch 1 and resumed together end bit-identical to two seeds
    trained for two epochs without a stop; the lane folders are ordinary resumable runs."""
    recipe = flagship("epochs=2")
    seeds = [3, 4]

    def folders(name: str) -> list[Path]:
        return [tmp_path / name / f"seed-{s}" for s in seeds]

    options = {"data_dir": tiny_cifar, "device": "cpu", "echo": lambda _: None}
    train_seeds(recipe, seeds, out_dirs=folders("straight"), **options)
    train_seeds(recipe, seeds, out_dirs=folders("stopped"), stop_after_epoch=1, **options)
    payloads = [load_checkpoint(d / "checkpoints" / "last.pt") for d in folders("stopped")]
    assert [p["state"]["epoch"] for p in payloads] == [1, 1]
    train_seeds(recipe, seeds, out_dirs=folders("stopped"), resume=payloads, **options)
    for straight, stopped in zip(folders("straight"), folders("stopped"), strict=True):
        a = load_checkpoint(straight / "checkpoints" / "last.pt")["state"]
        b = load_checkpoint(stopped / "checkpoints" / "last.pt")["state"]
        assert a["step"] == b["step"] == 4
        for kind in ("params", "buffers"):
            for name in a[kind]:
                assert torch.equal(a[kind][name], b[kind][name]), (kind, name)
        history = json.loads((stopped / "metrics.json").read_text())
        assert history["finished"] and len(history["epochs"]) == 2


def test_one_seed_of_a_group_resumes_on_its_own(tiny_cifar: Path, tmp_path: Path) -> None:
    """A lane's folder holds an ordinary run: `hooktrain resume` finishes it alone."""
    seeds = [0, 1]
    dirs = [tmp_path / f"seed-{s}" for s in seeds]
    train_seeds(
        flagship("epochs=2"),
        seeds,
        out_dirs=dirs,
        data_dir=tiny_cifar,
        device="cpu",
        stop_after_epoch=1,
        echo=lambda _: None,
    )
    result = CliRunner().invoke(main, ["resume", str(dirs[1]), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads((dirs[1] / "metrics.json").read_text())
    assert summary["finished"] and len(summary["epochs"]) == 2
    assert summary["config"]["recipe"]["seed"] == 1


def test_seeds_resumed_together_must_share_their_step(tiny_cifar: Path, tmp_path: Path) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    options = {"data_dir": tiny_cifar, "device": "cpu", "echo": lambda _: None}
    train(flagship("epochs=3", "seed=0"), out_dir=dirs[0], stop_after_epoch=1, **options)
    train(flagship("epochs=3", "seed=1"), out_dir=dirs[1], stop_after_epoch=2, **options)
    payloads = [load_checkpoint(d / "checkpoints" / "last.pt") for d in dirs]
    with pytest.raises(HooktrainError, match="same step"):
        train_seeds(flagship("epochs=3"), [0, 1], out_dirs=dirs, resume=payloads, **options)


@pytest.mark.parametrize(
    ("setting", "advice"),
    [
        ("precision=bf16", r"bfloat16 autocast .* --set precision=fp32"),
        ("memory_format=channels_last", r"channels_last, .* set memory_format=auto"),
    ],
)
def test_what_vmap_cannot_take_is_refused_for_seeds_together(
    tiny_cifar: Path, tmp_path: Path, setting: str, advice: str
) -> None:
    """Under vmap, bf16 autocast mixes dtypes (CUDA and CPU) and channels_last BatchNorm fails
    (CUDA); a run asking for either is refused in words before training."""
    with pytest.raises(HooktrainError, match=advice):
        train_seeds(
            flagship(setting),
            [0, 1],
            out_dirs=[tmp_path / "a", tmp_path / "b"],
            data_dir=tiny_cifar,
            device="cpu",
            echo=lambda _: None,
        )


def test_torch_dropout_is_refused_for_seeds_together(tiny_cifar: Path, tmp_path: Path) -> None:
    """torch.nn.Dropout under vmap draws from one generator for all seeds: refused in words."""

    def with_torch_dropout(num_classes: int, **options: object) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(3 * 32 * 32, num_classes))

    with pytest.raises(HooktrainError, match=r"torch's own dropout \(1\)"):
        train_seeds(
            attrs.evolve(flagship(), model=Ref(with_torch_dropout)),
            [0, 1],
            out_dirs=[tmp_path / "a", tmp_path / "b"],
            data_dir=tiny_cifar,
            device="cpu",
            echo=lambda _: None,
        )


# --------------------------------------------------------------------------------------------
# Dropout with its randomness in the state
# --------------------------------------------------------------------------------------------


def test_hashed_uniform_is_uniform_and_keyed() -> None:
    shape = torch.Size([500, 400])
    u = hashed_uniform(torch.tensor(7), torch.tensor(0), shape)
    assert u.shape == shape and u.dtype == torch.float32
    assert u.min() >= 0 and u.max() < 1
    assert u.mean().item() == pytest.approx(0.5, abs=0.005)
    assert u.var().item() == pytest.approx(1 / 12, rel=0.02)
    # Neighbours, the next counter and the next seed are uncorrelated.
    flat = u.flatten()
    for other in (
        flat.roll(1),
        hashed_uniform(torch.tensor(7), torch.tensor(1), shape).flatten(),
        hashed_uniform(torch.tensor(8), torch.tensor(0), shape).flatten(),
    ):
        assert abs(torch.corrcoef(torch.stack([flat, other]))[0, 1].item()) < 0.01
    assert torch.equal(u, hashed_uniform(torch.tensor(7), torch.tensor(0), shape))


def test_dropout_masks_scale_count_and_stay_out_of_eval() -> None:
    torch.manual_seed(0)
    dropout = Dropout(0.25)
    x = torch.ones(200, 500)
    y = dropout(x)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(0.25, abs=0.01)
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.75))
    assert dropout.calls.item() == 1
    assert not torch.equal(dropout(x), y)  # the next call draws a new mask
    dropout.eval()
    assert torch.equal(dropout(x), x) and dropout.calls.item() == 2
    with pytest.raises(HooktrainError, match="below 1"):
        Dropout(1.0)


def test_dropout_draws_the_same_masks_alone_and_vmapped() -> None:
    """Each seed's masks depend on its own buffers only, not on how many seeds run at once."""
    dropout = Dropout(0.5).train()
    seeds = torch.tensor([11, 22, 33])
    calls = torch.tensor([0, 5, 9])
    x = torch.randn(3, 8, 16)

    def forward(seed: torch.Tensor, count: torch.Tensor, inputs: torch.Tensor) -> tuple:
        buffers = {"seed": seed, "calls": count.clone()}
        return functional_call(dropout, buffers, (inputs,)), buffers["calls"]

    together, counts = vmap(forward)(seeds, calls, x)
    for lane in range(3):
        alone, count = forward(seeds[lane], calls[lane], x[lane])
        assert torch.equal(together[lane], alone)
        assert count == counts[lane] == calls[lane] + 1


def test_dropout_seed_follows_the_run_seed_and_lives_in_the_state() -> None:
    def seed_of(run_seed: int) -> torch.Tensor:
        torch.manual_seed(run_seed)
        return dict(resnet9(10, width=4, dropout=0.2).named_buffers())["6.2.seed"]

    assert torch.equal(seed_of(0), seed_of(0))
    assert not torch.equal(seed_of(0), seed_of(1))
    model = resnet9(10, width=4, dropout=0.2)
    state = TrainState.create(model, Chain.of([], sgd()), seed=0)
    assert {"6.2.seed", "6.2.calls"} <= state.buffers.keys()


def test_a_state_of_views_saves_only_its_own_bytes() -> None:
    """A lane's buffers are slices of a stacked tensor; its checkpoint must not hold them all."""
    stacked = torch.arange(1000.0).reshape(10, 100)
    model = nn.Linear(2, 2)
    state = TrainState.create(model, Chain.of([], sgd()), seed=0).replace(
        buffers={"slice": stacked[3]}
    )
    saved = state.to_dict()["buffers"]["slice"]
    assert torch.equal(saved, stacked[3])
    assert saved.untyped_storage().nbytes() == 100 * 4
