"""Colourisation (Zhang, Isola, Efros 2016, arXiv 1603.08511): the L channel of CIE Lab in, the ab
channels out, as a classification over the quantised in-gamut ab bins (cells of 10:
268 that sRGB colours reach exactly; Zhang et al. count 313).

The target is soft-encoded over the 5 nearest bins; the cross-entropy is rebalanced by the
rarity of each pixel's colour, from the smoothed empirical distribution of the training images
(accumulated online into a buffer, so it is in every checkpoint), so the network does not settle
for desaturated browns. Predictions are made at 1/4 of the side and decoded by the annealed mean
(temperature 0.38). The backbone sees L (scaled to [-1, 1]) on its three input channels, so it
stays a plain torchvision ResNet; `eval_backbone` converts RGB to that input.
"""
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl.config import Config
from fastssl.methods.base import Output
from fastssl.methods.pretext import DenseHead, Normalizer, PretextMethod, PretextTask, Row, feature_maps
from fastssl.pretext.color import ab_bins, bin_prior, colorize, decode_ab, encode_ab, rebalance_weights, rgb_to_lab


def l_input(lab: torch.Tensor) -> torch.Tensor:
    """The backbone's input: L in [-1, 1] on all three channels (N, 3, H, W)."""
    return (lab[:, :1] / 50.0 - 1.0).expand(-1, 3, -1, -1)


class LightnessInput(nn.Module):
    """The evaluated backbone of a colourisation model: normalised RGB -> L input -> features."""

    def __init__(self, backbone: nn.Module, normalize: Normalizer):
        super().__init__()
        self.net, self.normalize = backbone, normalize
        self.input_note = "the input is CIE L on all three channels, scaled to [-1, 1] (L / 50 - 1)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(l_input(rgb_to_lab(self.normalize.inverse(x))))


class ColorizationTask(PretextTask):
    name = "colorization"

    def __init__(self, cfg: Config, feature_dim: int):
        super().__init__(cfg, feature_dim)
        self.settings = s = cfg.method.colorization
        self.register_buffer("bins", ab_bins(s.grid).clone())                  # (Q, 2)
        self.register_buffer("bin_counts", torch.zeros(len(self.bins), dtype=torch.float64))
        self.head = DenseHead(feature_dim, len(self.bins))

    def predict(self, backbone, lab: torch.Tensor) -> torch.Tensor:
        """Logits over the ab bins at 1/output_stride of the side: (N, Q, s, s)."""
        side = max(1, lab.shape[-1] // self.settings.output_stride)
        return self.head(feature_maps(backbone, l_input(lab)), side).float()

    def forward(self, backbone, images: torch.Tensor, generator: torch.Generator) -> Output:
        s = self.settings
        lab = rgb_to_lab(images)
        logits = self.predict(backbone, lab)
        ab = F.adaptive_avg_pool2d(lab[:, 1:], logits.shape[-1])
        target = encode_ab(ab, self.bins, neighbours=s.neighbours, sigma=s.sigma)     # (N, Q, s, s)
        if self.training:
            self.bin_counts += bin_prior(target).double() * target[:, 0].numel()
        prior = (self.bin_counts / self.bin_counts.sum().clamp_min(1)).float()
        weights = rebalance_weights(prior, lam=s.rebalance_lambda, sigma=s.sigma, bins=self.bins)
        pixel_weight = weights[target.argmax(1)]                                     # (N, s, s): w(q*)
        loss = (-(target * F.log_softmax(logits, dim=1)).sum(1) * pixel_weight).mean()
        return loss, {"pretext_ab_error": self.ab_error(logits, lab[:, 1:]).mean().item()}

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        return decode_ab(logits, self.bins, temperature=self.settings.annealed_temperature)

    def ab_error(self, logits: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
        """Per-image mean Euclidean ab distance of the decoded prediction at full resolution."""
        pred = F.interpolate(self.decode(logits), size=ab.shape[-2:], mode="bilinear", align_corners=False)
        return (pred - ab).norm(dim=1).mean(dim=(1, 2))

    @torch.no_grad()
    def evaluate(self, backbone, images: torch.Tensor, generator: torch.Generator) -> Dict[str, float]:
        lab = rgb_to_lab(images)
        error = self.ab_error(self.predict(backbone, lab), lab[:, 1:])
        return {"error": error.sum().item(), "gray_error": lab[:, 1:].norm(dim=1).mean(dim=(1, 2)).sum().item(),
                "count": images.shape[0]}

    def report(self, sums: Dict[str, float]) -> str:
        n = max(sums["count"], 1)
        return (f"pretext {self.name} val ab error: {sums['error'] / n:.2f} (all-gray {sums['gray_error'] / n:.2f}; "
                "lower is better)")

    @torch.no_grad()
    def show(self, backbone, images: torch.Tensor, generator: torch.Generator) -> List[Row]:
        lab = rgb_to_lab(images)
        gray = (lab[:, :1] / 100.0).expand(-1, 3, -1, -1)
        predicted = colorize(lab[:, :1], self.decode(self.predict(backbone, lab)))
        return [("L input", gray, None), ("ab target (the image)", images, None), ("prediction", predicted, None)]


class Colorization(PretextMethod):
    name = "colorization"
    task_class = ColorizationTask

    def eval_backbone(self) -> nn.Module:
        return LightnessInput(self.backbone, self.tasks[self.name].normalize)
