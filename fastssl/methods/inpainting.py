"""Context encoders (Pathak et al. 2016, arXiv 1604.07379): mask a region of the image, encode
the rest, decode the missing pixels; the loss is the L2 error on the masked pixels.

The mask is the central square (half the side, a quarter of the area, as in the paper) or random
blocks. Masked pixels are set to the dataset mean (0 after normalisation). The decoder is
light (DenseHead), so that the backbone learns the context.
"""
from typing import Dict, List

import torch

from fastssl.config import Config
from fastssl.methods.base import Output
from fastssl.methods.pretext import DenseHead, PretextMethod, PretextTask, Row, feature_maps


def masks(n: int, side: int, mode: str, fraction: float, blocks: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 1, side, side) float masks, 1 on the pixels to reconstruct: the centre square of
    `fraction` of the side, or `blocks` squares of half that side at random positions."""
    ys = torch.arange(side).view(1, side, 1)
    xs = torch.arange(side).view(1, 1, side)
    if mode == "center":
        m = max(1, round(fraction * side))
        top = torch.full((n, 1), (side - m) // 2)
        left, count = top, 1
    else:
        m, count = max(1, round(fraction * side / 2)), blocks
        top = torch.randint(0, side - m + 1, (n, count), generator=generator)
        left = torch.randint(0, side - m + 1, (n, count), generator=generator)
    top, left = top.view(n, count, 1, 1), left.view(n, count, 1, 1)
    rows = (ys.unsqueeze(1) >= top) & (ys.unsqueeze(1) < top + m)          # (n, count, side, 1)
    cols = (xs.unsqueeze(1) >= left) & (xs.unsqueeze(1) < left + m)        # (n, count, 1, side)
    return (rows & cols).any(dim=1, keepdim=True).float()


class InpaintingTask(PretextTask):
    name = "inpainting"

    def __init__(self, cfg: Config, feature_dim: int):
        super().__init__(cfg, feature_dim)
        self.settings = cfg.method.inpainting
        self.head = DenseHead(feature_dim, 3)

    def reconstruct(self, backbone, images: torch.Tensor, generator: torch.Generator):
        """(mask (N, 1, S, S), normalised target, normalised reconstruction) of [0, 1] images."""
        s = self.settings
        mask = masks(images.shape[0], images.shape[-1], s.mask, s.mask_fraction, s.blocks, generator).to(images.device)
        target = self.normalize(images)
        out = self.head(feature_maps(backbone, target * (1 - mask)), images.shape[-1]).float()
        return mask, target, out

    def forward(self, backbone, images: torch.Tensor, generator: torch.Generator) -> Output:
        mask, target, out = self.reconstruct(backbone, images, generator)
        loss = (((out - target) ** 2) * mask).sum() / (3 * mask.sum()).clamp_min(1)
        return loss, {}

    @torch.no_grad()
    def evaluate(self, backbone, images: torch.Tensor, generator: torch.Generator) -> Dict[str, float]:
        mask, _, out = self.reconstruct(backbone, images, generator)
        pixels = 3 * mask.sum(dim=(1, 2, 3))
        error = (((self.normalize.inverse(out) - images) ** 2) * mask).sum(dim=(1, 2, 3)) / pixels
        # Baseline: the masked region filled with the mean colour of the visible context.
        context = (images * (1 - mask)).sum(dim=(2, 3), keepdim=True) / (1 - mask).sum(dim=(2, 3), keepdim=True)
        baseline = (((context - images) ** 2) * mask).sum(dim=(1, 2, 3)) / pixels
        return {"error": error.sum().item(), "mean_fill_error": baseline.sum().item(), "count": images.shape[0]}

    def report(self, sums: Dict[str, float]) -> str:
        n = max(sums["count"], 1)
        return (f"pretext {self.name} val masked-pixel MSE: {sums['error'] / n:.4f} (context-mean fill "
                f"{sums['mean_fill_error'] / n:.4f}; lower is better)")

    @torch.no_grad()
    def show(self, backbone, images: torch.Tensor, generator: torch.Generator) -> List[Row]:
        mask, _, out = self.reconstruct(backbone, images, generator)
        filled = images * (1 - mask) + self.normalize.inverse(out) * mask
        return [("masked input", images * (1 - mask) + 0.5 * mask, None), ("reconstruction", filled, None),
                ("original", images, None)]


class Inpainting(PretextMethod):
    name = "inpainting"
    task_class = InpaintingTask
