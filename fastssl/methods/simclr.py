"""SimCLR (Chen et al. 2020): backbone + projection MLP, NT-Xent between the two views."""
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from fastssl.losses import info_nce
from fastssl.models import build_backbone, projection_mlp


class SimCLR(nn.Module):
    name = "simclr"

    def __init__(self, backbone: str = "resnet50", stem: str = "imagenet", proj_hidden_dim: int = 2048,
                 proj_dim: int = 128, proj_layers: int = 2, temperature: float = 0.1, loss_backend: str = "auto"):
        super().__init__()
        self.backbone, feature_dim = build_backbone(backbone, stem)
        self.projector = projection_mlp(feature_dim, proj_hidden_dim, proj_dim, proj_layers)
        self.temperature, self.loss_backend = temperature, loss_backend

    def forward(self, views: List[torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Two augmented view batches (N, 3, S, S) -> (loss, stats)."""
        if len(views) != 2:
            raise ValueError(f"SimCLR takes exactly 2 views, got {len(views)}")
        # One pass over both views: batch-norm statistics cover all 2N images.
        z = self.projector(self.backbone(torch.cat(views)))
        z1, z2 = z.float().chunk(2)
        loss = info_nce(z1, z2, self.temperature, backend=self.loss_backend)
        # Collapse indicator (SimSiam): std of the normalised outputs, ~1/sqrt(D) when healthy, 0 if collapsed.
        with torch.no_grad():
            std = torch.nn.functional.normalize(z1, dim=1).std(dim=0).mean().item()
        return loss, {"z_std": std}
