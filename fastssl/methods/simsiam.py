"""SimSiam (Chen & He 2021, arXiv 2011.10566): one network, a predictor with a bottleneck, and a
stop-gradient on the target branch; no negatives, no momentum encoder. Loss: the negative cosine
similarity of each view's prediction with the other view's (detached) projection, averaged over
both directions (minimum -1).
"""
import torch
import torch.nn.functional as F

from fastssl.config import Config
from fastssl.methods.base import Method, Output, Views, output_std, predictor_mlp


class SimSiam(Method):
    name = "simsiam"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.projector = self.new_projector(cfg, last_bn=True)
        self.predictor = predictor_mlp(cfg.model.proj_dim, cfg.method.simsiam.pred_hidden_dim)

    def forward(self, views: Views) -> Output:
        z = self.projector(self.backbone(torch.cat(views)))
        p1, p2 = self.predictor(z).float().chunk(2)
        z1, z2 = z.float().detach().chunk(2)        # the stop-gradient
        loss = -(F.cosine_similarity(p1, z2, dim=1).mean() + F.cosine_similarity(p2, z1, dim=1).mean()) / 2
        return loss, output_std(z1)
