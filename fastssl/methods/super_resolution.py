"""Super-resolution as a pretext task (after Ledig et al. 2017, SRGAN, arXiv 1609.04802): the
image downsampled by `scale` (area averaging) and upsampled back bilinearly goes in; the network
predicts the residual to the full-resolution image (MSE). With `adversarial_weight` > 0 a small
patch discriminator adds SRGAN's adversarial term.

The discriminator trains in the same backward pass as the rest: its own loss reaches only its
parameters, and the generator's adversarial loss goes through a copy of it whose parameters are
detached (torch.func.functional_call), so neither side's loss moves the other.
"""
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from fastssl.config import Config
from fastssl.methods.base import Output
from fastssl.methods.pretext import DenseHead, PretextMethod, PretextTask, Row, feature_maps


def patch_discriminator(width: int = 64) -> nn.Sequential:
    """A PatchGAN-style discriminator: strided 4x4 convs with LeakyReLU, one logit per patch (no
    batch norm, so functional_call with detached parameters needs no buffers)."""
    return nn.Sequential(nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
                         nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
                         nn.Conv2d(2 * width, 1, 3, 1, 1))


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [0, 1] images."""
    mse = ((x - y) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


class SuperResolutionTask(PretextTask):
    name = "super_resolution"

    def __init__(self, cfg: Config, feature_dim: int):
        super().__init__(cfg, feature_dim)
        self.settings = s = cfg.method.super_resolution
        self.head = DenseHead(feature_dim, 3)
        self.discriminator = patch_discriminator() if s.adversarial_weight > 0 else None

    def low_resolution(self, images: torch.Tensor) -> torch.Tensor:
        """Downsampled by `scale` and upsampled back to the full side (the network's input, [0, 1])."""
        side = images.shape[-1]
        low = F.interpolate(images, size=max(1, side // self.settings.scale), mode="area")
        return F.interpolate(low, size=side, mode="bilinear", align_corners=False).clamp(0, 1)

    def restore(self, backbone, upsampled: torch.Tensor) -> torch.Tensor:
        """The normalised full-resolution prediction: the input plus the predicted residual."""
        x = self.normalize(upsampled)
        return x + self.head(feature_maps(backbone, x), upsampled.shape[-1]).float()

    def forward(self, backbone, images: torch.Tensor, generator: torch.Generator) -> Output:
        target = self.normalize(images)
        out = self.restore(backbone, self.low_resolution(images))
        loss = F.mse_loss(out, target)
        stats = {"pretext_mse": loss.item()}
        if self.discriminator is not None:
            real, fake = self.discriminator(target), self.discriminator(out.detach())
            d_loss = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                      + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
            frozen = {k: p.detach() for k, p in self.discriminator.named_parameters()}
            judged = functional_call(self.discriminator, frozen, (out,))
            g_loss = F.binary_cross_entropy_with_logits(judged, torch.ones_like(judged))
            loss = loss + self.settings.adversarial_weight * g_loss + d_loss
            stats.update(d_loss=d_loss.item(), g_adv=g_loss.item())
        return loss, stats

    @torch.no_grad()
    def evaluate(self, backbone, images: torch.Tensor, generator: torch.Generator) -> Dict[str, float]:
        upsampled = self.low_resolution(images)
        restored = self.normalize.inverse(self.restore(backbone, upsampled))
        return {"psnr": psnr(restored, images).sum().item(), "bilinear_psnr": psnr(upsampled, images).sum().item(),
                "count": images.shape[0]}

    def report(self, sums: Dict[str, float]) -> str:
        n = max(sums["count"], 1)
        return (f"pretext {self.name} val PSNR: {sums['psnr'] / n:.2f} dB (bilinear upsampling "
                f"{sums['bilinear_psnr'] / n:.2f} dB; higher is better)")

    @torch.no_grad()
    def show(self, backbone, images: torch.Tensor, generator: torch.Generator) -> List[Row]:
        upsampled = self.low_resolution(images)
        restored = self.normalize.inverse(self.restore(backbone, upsampled))
        return [(f"input (1/{self.settings.scale} resolution)", upsampled, None), ("output", restored, None),
                ("original", images, None)]


class SuperResolution(PretextMethod):
    name = "super_resolution"
    task_class = SuperResolutionTask
