"""SimCLR (Chen et al. 2020): backbone + projection MLP, NT-Xent between the two views."""
import torch

from fastssl.config import Config
from fastssl.losses import info_nce
from fastssl.methods.base import Method, Output, Views, output_std


class SimCLR(Method):
    name = "simclr"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.projector = self.new_projector(cfg)
        self.temperature, self.loss_backend = cfg.method.simclr.temperature, cfg.loss.backend

    def forward(self, views: Views) -> Output:
        # One pass over both views: batch-norm statistics cover all 2N images. Under torchrun,
        # info_nce gathers every rank's projections (with gradient): the negatives are global.
        z1, z2 = self.projector(self.backbone(torch.cat(views))).float().chunk(2)
        loss = info_nce(z1, z2, self.temperature, backend=self.loss_backend)
        return loss, output_std(z1)
