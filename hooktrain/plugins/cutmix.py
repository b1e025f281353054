"""CutMix (Yun et al., 2019): paste a box of each image's partner into it and mix the targets
by the box's area.

As the paper's code: ``lam ~ Beta(alpha, alpha)``, a box of side ``floor(side * sqrt(1 - lam))``
(halved and rounded down on each side of the centre) around a uniformly drawn centre, clipped
to the image, the same box for the whole batch; the partners are a permutation of the batch,
and ``lam`` is corrected to the share of the image the box leaves, so targets are mixed by
what each image really shows. The box is a mask made by comparing pixel coordinates with its
edges, so the step stays pure tensor work under torch.compile and vmap.
"""

from __future__ import annotations

import attrs
import torch

from hooktrain.core.context import BuildContext
from hooktrain.core.hookspecs import hookimpl
from hooktrain.core.pieces import BatchTransform, Draws
from hooktrain.core.plugin import Plugin, setting
from hooktrain.errors import HooktrainError
from hooktrain.plugins.mixup import beta_draw, mixing_dtype, positive_number, target_mixer


def cutmix_draws(
    draws: Draws, alpha: float, batch: int, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """What one CutMix step draws: the box and the partners.

    The box is a float64 tensor ``[top, bottom, left, right]`` of whole numbers, rows ``top``
    to ``bottom - 1`` and columns ``left`` to ``right - 1`` (empty when ``lam`` is near 1); the
    partners are a permutation of the ``batch`` examples.
    """
    lam = beta_draw(draws, alpha, alpha)
    partner = draws.permutation(batch)
    # In float64, as lam and the paper's NumPy code: the box's edges are whole numbers exactly.
    sides = torch.tensor([height, width], dtype=torch.float64, device=lam.device)
    centre = torch.floor(draws.uniform(2).to(torch.float64) * sides)  # as randint(side)
    half = torch.floor(torch.floor(sides * torch.sqrt(1 - lam)) / 2)
    # Clipped to the image as np.clip(., 0, side) (the centre is inside, so one bound each).
    low, high = (centre - half).clamp_min(0), torch.minimum(centre + half, sides)
    return torch.stack([low[0], high[0], low[1], high[1]]), partner


def box_mask(box: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A (height, width) boolean mask, True inside ``box`` (``[top, bottom, left, right]``)."""
    rows = torch.arange(height, device=box.device, dtype=box.dtype)[:, None]
    columns = torch.arange(width, device=box.device, dtype=box.dtype)[None, :]
    top, bottom, left, right = box.unbind()
    return (rows >= top) & (rows < bottom) & (columns >= left) & (columns < right)


@attrs.define
class CutMix(Plugin):
    """CutMix (Yun et al., 2019): a box of area about ``1 - lam`` of every training image, at a
    uniformly drawn centre, is replaced by the same box of its partner (a random permutation
    of the batch); the targets take ``lam`` corrected to the area actually kept.

    ``alpha`` 1.0 (``lam`` uniform) is the paper's value and Composer's default. Images are
    (examples, channels, height, width) batches. Under torchrun each replica mixes within its
    share of the batch.
    """

    default_name = "cutmix"
    alpha: float = setting(1.0, positive_number, "a positive number")

    @hookimpl
    def hooktrain_batch_transform(self, build: BuildContext) -> BatchTransform:
        mix_targets = target_mixer(build, self.name)
        alpha = float(self.alpha)

        def transform(
            x: torch.Tensor, y: torch.Tensor, draws: Draws
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if x.dim() != 4:
                raise HooktrainError(
                    f"{self.name} pastes boxes between images of shape (examples, channels, "
                    f"height, width), but the training batch has shape {tuple(x.shape)}; "
                    f"train without {self.name} (--without {self.name}), or try mixup."
                )
            height, width = x.shape[-2:]
            box, partner = cutmix_draws(draws, alpha, len(x), height, width)
            inside = box_mask(box, height, width)
            top, bottom, left, right = box.unbind()
            lam = 1 - (bottom - top) * (right - left) / (height * width)
            mixed = torch.where(inside, x[partner], x)
            return mixed, mix_targets(y, partner, lam.to(mixing_dtype(x)))

        return transform
