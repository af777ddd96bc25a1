"""Split-brain autoencoders (Zhang, Isola, Efros 2017, arXiv 1611.09842): the Lab channels are
split in two; one network sees L and predicts ab, the other sees ab and predicts L, each as a
classification (ab over the quantised in-gamut bins, L over `l_bins` bins), at 1/4 of the side.
The representation is the two networks' features concatenated (`SplitBrainNet`, which is what
kNN and the linear probe evaluate).

The two halves are two ResNets of the configured architecture whose first convolution takes 1
(L) and 2 (ab) channels.
"""
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl.config import Config
from fastssl.methods.base import Output
from fastssl.methods.pretext import DenseHead, Normalizer, PretextMethod, PretextTask, Row, feature_maps
from fastssl.models import build_backbone
from fastssl.pretext.color import ab_bins, colorize, lab_to_rgb, nearest_bin, rgb_to_lab

AB_SCALE = 110.0     # |a|, |b| < 110 for sRGB colours: ab / 110 lies in [-1, 1]


def half_network(cfg: Config, in_channels: int):
    """(ResNet whose first convolution takes `in_channels`, its feature dimension)."""
    net, dim = build_backbone(cfg.model.backbone, cfg.model.stem)
    old = net.conv1
    net.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    return net, dim


class SplitBrainNet(nn.Module):
    """The representation: L network and ab network features, concatenated, from normalised RGB."""

    def __init__(self, cfg: Config):
        super().__init__()
        (self.l_net, half), (self.ab_net, _) = half_network(cfg, 1), half_network(cfg, 2)
        self.feature_dim = 2 * half
        self.normalize = Normalizer(cfg.augment.mean, cfg.augment.std)
        self.input_note = ("two ResNets: l_net.* sees L / 50 - 1 (1 channel), ab_net.* sees ab / 110 (2 channels); "
                           "the representation is their features concatenated")

    @staticmethod
    def split(lab: torch.Tensor):
        """(L input (N, 1, H, W), ab input (N, 2, H, W)) scaled to about [-1, 1]."""
        return lab[:, :1] / 50.0 - 1.0, lab[:, 1:] / AB_SCALE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        l_in, ab_in = self.split(rgb_to_lab(self.normalize.inverse(x)))
        return torch.cat([self.l_net(l_in), self.ab_net(ab_in)], dim=1)


class SplitBrainTask(PretextTask):
    name = "split_brain"

    def __init__(self, cfg: Config, feature_dim: int):
        super().__init__(cfg, feature_dim)
        self.settings = s = cfg.method.split_brain
        self.register_buffer("bins", ab_bins(s.grid).clone())
        half = feature_dim // 2
        self.l_to_ab, self.ab_to_l = DenseHead(half, len(self.bins)), DenseHead(half, s.l_bins)

    def predict(self, net: SplitBrainNet, lab: torch.Tensor):
        """(ab logits, L logits, ab targets, L targets) at 1/output_stride of the side."""
        side = max(1, lab.shape[-1] // self.settings.output_stride)
        l_in, ab_in = net.split(lab)
        ab_logits = self.l_to_ab(feature_maps(net.l_net, l_in), side).float()
        l_logits = self.ab_to_l(feature_maps(net.ab_net, ab_in), side).float()
        small = F.adaptive_avg_pool2d(lab, side)
        ab_target = nearest_bin(small[:, 1:], self.bins)
        l_target = (small[:, 0] / 100.0 * self.settings.l_bins).long().clamp(0, self.settings.l_bins - 1)
        return ab_logits, l_logits, ab_target, l_target

    def forward(self, net, images: torch.Tensor, generator: torch.Generator) -> Output:
        ab_logits, l_logits, ab_target, l_target = self.predict(net, rgb_to_lab(images))
        ab_loss, l_loss = F.cross_entropy(ab_logits, ab_target), F.cross_entropy(l_logits, l_target)
        return ab_loss + l_loss, {"pretext_ab_loss": ab_loss.item(), "pretext_l_loss": l_loss.item()}

    @torch.no_grad()
    def evaluate(self, net, images: torch.Tensor, generator: torch.Generator) -> Dict[str, float]:
        ab_logits, l_logits, ab_target, l_target = self.predict(net, rgb_to_lab(images))
        return {"ab_correct": (ab_logits.argmax(1) == ab_target).sum().item(),
                "l_correct": (l_logits.argmax(1) == l_target).sum().item(), "pixels": ab_target.numel(),
                # per-bin counts: the most frequent bin is what a constant guess reaches
                "ab_counts": torch.bincount(ab_target.flatten(), minlength=len(self.bins)).cpu(),
                "l_counts": torch.bincount(l_target.flatten(), minlength=self.settings.l_bins).cpu()}

    def report(self, sums: Dict[str, float]) -> str:
        n = max(sums["pixels"], 1)
        return (f"pretext {self.name} val accuracy: L->ab {100 * sums['ab_correct'] / n:.1f}% (most frequent bin "
                f"{100 * sums['ab_counts'].max().item() / n:.1f}%), ab->L {100 * sums['l_correct'] / n:.1f}% "
                f"(most frequent bin {100 * sums['l_counts'].max().item() / n:.1f}%)")

    @torch.no_grad()
    def show(self, net, images: torch.Tensor, generator: torch.Generator) -> List[Row]:
        lab = rgb_to_lab(images)
        ab_logits, l_logits, _, _ = self.predict(net, lab)
        ab_pred = self.bins[ab_logits.argmax(1)].permute(0, 3, 1, 2)                          # (N, 2, s, s)
        step = 100.0 / self.settings.l_bins
        l_pred = F.interpolate((l_logits.argmax(1, keepdim=True).float() + 0.5) * step, size=lab.shape[-2:],
                               mode="nearest")
        ab_only = lab_to_rgb(torch.cat([torch.full_like(lab[:, :1], 60.0), lab[:, 1:]], dim=1))
        return [("L input", (lab[:, :1] / 100).expand(-1, 3, -1, -1), None),
                ("L -> ab prediction", colorize(lab[:, :1], ab_pred), None),
                ("ab input (at L = 60)", ab_only, None),
                ("ab -> L prediction", (l_pred / 100).expand(-1, 3, -1, -1), None),
                ("original", images, None)]


class SplitBrain(PretextMethod):
    name = "split_brain"
    task_class = SplitBrainTask

    def new_backbone(self, cfg: Config):
        net = SplitBrainNet(cfg)
        return net, net.feature_dim
