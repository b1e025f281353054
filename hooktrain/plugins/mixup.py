"""mixup (Zhang et al., 2018): train on convex combinations of pairs of examples and their targets.

Each training batch is mixed with a permutation of itself, ``x' = lam * x + (1 - lam) *
x[perm]``, with one ``lam ~ Beta(alpha, alpha)`` for the whole batch as in the paper; the
targets are mixed alike (class indices become class probabilities first). The draws of
``lam`` and ``perm`` come from the step's :class:`~hooktrain.core.pieces.Draws`, so they are a
pure function of the state's key: a resumed run mixes the same pairs, and every seed trained
in lockstep draws its own. ``cutmix`` shares the Beta draw and the target mixing from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs
import torch

from hooktrain.core.context import BuildContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.pieces import BatchTransform, Draws
from hooktrain.core.plugin import Plugin, setting
from hooktrain.core.task import Classification
from hooktrain.errors import HooktrainError

PROPOSALS = 16
"""Marsaglia-Tsang proposals drawn per Gamma variate. Each is accepted with probability above
0.95 (the method's bound for shapes of at least 1, which :func:`log_gamma_draw` always uses), so
all 16 are refused with probability below 0.05**16 = 2e-21: the draw is exact except on an event
far rarer than one float32 uniform value (2**-24)."""

TargetMixer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``mix(y, partner, lam) -> targets``: ``lam`` of each example's target and ``1 - lam`` of its
partner's (``y[partner]``), as floating-point numbers of ``lam``'s dtype or wider."""


def positive_number(value: object) -> bool:
    """Whether ``value`` is a finite number above 0 (a Beta distribution's parameter)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


def _open_uniform(draws: Draws, *shape: int) -> torch.Tensor:
    """Uniform numbers in (0, 1]: ``1 - u`` for Draws' [0, 1), so their logarithm is finite."""
    return 1 - draws.uniform(*shape)


def log_gamma_draw(draws: Draws, concentration: float, shape: tuple[int, ...]) -> torch.Tensor:
    """The logarithms of Gamma(``concentration``, 1) variates of ``shape``, in float32.

    Marsaglia and Tsang's method (2000) on the shape ``concentration + 1``, whose acceptance
    rate is above 0.95, followed by their boost ``Gamma(a) = Gamma(a + 1) * U ** (1 / a)``,
    exact for every ``a > 0`` (the route torch's own Gamma sampler takes for ``a < 1``). The
    rejection loop is unrolled into :data:`PROPOSALS` proposals drawn at once, of which the
    first accepted one is taken by ``argmax``: pure tensor work with a fixed number of draws,
    as the step needs. Normal proposals come from the Box-Muller transform. Logarithms keep
    tiny variates (``U ** 5`` for alpha 0.2) from flushing to zero.
    """
    d = concentration + 1 - 1 / 3
    c = 1 / math.sqrt(9 * d)
    normal = torch.sqrt(-2 * torch.log(_open_uniform(draws, *shape, PROPOSALS))) * torch.cos(
        2 * math.pi * draws.uniform(*shape, PROPOSALS)
    )
    # v <= 0 is always refused; the clamp only keeps its logarithm finite.
    v = (1 + c * normal).pow(3).clamp_min(torch.finfo(torch.float32).tiny)
    log_v = torch.log(v)
    accept = (1 + c * normal > 0) & (
        torch.log(_open_uniform(draws, *shape, PROPOSALS))
        < normal.square() / 2 + d - d * v + d * log_v
    )
    first = accept.to(torch.int8).argmax(dim=-1, keepdim=True)  # 0 if none (p < 2e-21)
    log_gamma_boosted = math.log(d) + log_v.gather(-1, first).squeeze(-1)
    return log_gamma_boosted + torch.log(_open_uniform(draws, *shape)) / concentration


def beta_draw(draws: Draws, a: float, b: float, shape: tuple[int, ...] = ()) -> torch.Tensor:
    """Beta(``a``, ``b``) variates of ``shape`` (float64 in [0, 1]) from ``draws``.

    ``X / (X + Y)`` for independent ``X ~ Gamma(a)`` and ``Y ~ Gamma(b)``, which is exactly
    Beta(a, b); computed as ``sigmoid(log X - log Y)`` in float64, so values near 1, where
    small alphas put much of their mass, are not rounded to float32's grid there (6e-8 apart,
    which visibly distorts the distribution for alpha 0.2).
    """
    log_ratio = log_gamma_draw(draws, a, shape) - log_gamma_draw(draws, b, shape)
    return torch.sigmoid(log_ratio.to(torch.float64))


def mixup_draws(draws: Draws, alpha: float, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What one mixup step draws: ``lam ~ Beta(alpha, alpha)`` (a 0-d float64 tensor, one for
    the batch as in the paper) and the partners, a permutation of the ``batch`` examples."""
    return beta_draw(draws, alpha, alpha), draws.permutation(batch)


def target_mixer(build: BuildContext, plugin: str) -> TargetMixer:
    """How ``plugin`` (mixup, cutmix) mixes the targets of the run ``build`` describes.

    The classification task's class indices become class probabilities, ``lam *
    onehot(y) + (1 - lam) * onehot(y[partner])`` of shape (examples, classes), on which the
    task's cross-entropy equals ``lam * CE(y) + (1 - lam) * CE(y[partner])``. Floating-point
    targets are mixed as they are: class probabilities from a batch transform before this
    one, a regression's measurements. Anything else is refused in a sentence.
    """
    classes = build.facts["num_outputs"] if isinstance(build.task, Classification) else None

    def mix(y: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        if y.is_floating_point():
            targets = y
        elif classes is not None:
            # One-hot by comparison: pure tensor work that vmap and torch.compile take.
            targets = (y[:, None] == torch.arange(classes, device=y.device)).to(lam.dtype)
        else:
            raise HooktrainError(
                f"{plugin} mixes floating-point targets or the class indices of the "
                f"classification task, but this run's {type(build.task).__name__} task has "
                f"{y.dtype} targets; train without {plugin} (--without {plugin})."
            )
        return lam * targets + (1 - lam) * targets[partner]

    return mix


def mixing_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a batch is mixed in and class probabilities are made in: the batch's, at least
    float32 (float64 when a run trains in float64). ``lam`` is cast to it explicitly, so the
    batch keeps its dtype whatever type promotion would make of a float64 ``lam`` under vmap.
    """
    return torch.promote_types(x.dtype, torch.float32)


@attrs.define
class MixUp(Plugin):
    """mixup (Zhang et al., 2018): each training batch becomes ``lam * x + (1 - lam) * x[perm]``
    with its targets mixed alike, one ``lam ~ Beta(alpha, alpha)`` per batch and ``perm`` a
    random permutation of it.

    ``alpha`` 0.2 is Composer's default, within the 0.1 to 0.4 the paper found best on
    ImageNet (it used 1 on CIFAR-10); larger values mix more evenly. Evaluation is untouched.
    Under torchrun each replica mixes within its share of the batch.
    """

    default_name = "mixup"
    alpha: float = setting(0.2, positive_number, "a positive number")

    @hookimpl
    def hooktrain_batch_transform(self, build: BuildContext) -> BatchTransform:
        mix_targets = target_mixer(build, self.name)
        alpha = float(self.alpha)

        def transform(
            x: torch.Tensor, y: torch.Tensor, draws: Draws
        ) -> tuple[torch.Tensor, torch.Tensor]:
            lam, partner = mixup_draws(draws, alpha, len(x))
            lam = lam.to(mixing_dtype(x))
            mixed = (lam * x + (1 - lam) * x[partner]).to(x.dtype)
            return mixed, mix_targets(y, partner, lam)

        return transform
