"""Backbones (torchvision ResNets, registered by name) and the projection MLP."""
from typing import Tuple

import torch.nn as nn
import torchvision

BACKBONES = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
}
STEMS = ("imagenet", "small")


def build_backbone(name: str, stem: str = "imagenet") -> Tuple[nn.Module, int]:
    """(backbone, feature_dim): a torchvision ResNet without its classifier (fc = Identity).

    stem="small" replaces the 7x7 stride-2 conv and the max-pool by a 3x3 stride-1 conv, the
    usual change for 32-96 px images (SimCLR's CIFAR-10 setting); the state dict still loads
    into a torchvision ResNet whose conv1 is replaced the same way.
    """
    if name not in BACKBONES:
        raise ValueError(f"model.backbone: unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if stem not in STEMS:
        raise ValueError(f"model.stem: unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    net = BACKBONES[name](weights=None)
    if stem == "small":
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2,
                   last_bn: bool = False) -> nn.Sequential:
    """SimCLR's projection head: (Linear-BN-ReLU) x (layers - 1), then Linear to out_dim (with
    `last_bn`, followed by BatchNorm without affine parameters: SimSiam, MoCo v3)."""
    if layers < 1:
        raise ValueError(f"model.proj_layers: must be >= 1, got {layers}")
    blocks, dim = [], in_dim
    for _ in range(layers - 1):
        blocks += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    blocks.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        blocks.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*blocks)
