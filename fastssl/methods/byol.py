"""BYOL (Grill et al. 2020, arXiv 2006.07733): an online network (backbone, projector, predictor)
predicts the projection of the other view by a target network, the online network's EMA with
momentum 0.996 -> 1 on a cosine schedule. No negatives; loss 2 - 2 cos(prediction, target),
summed over both directions. The views follow BYOL's asymmetric recipe (view 1 always blurred,
view 2 rarely blurred and sometimes solarised) unless `method.byol.asymmetric_views=false`.
"""
import torch
import torch.nn.functional as F

from fastssl.augment.multiview import RECIPES
from fastssl.config import Config
from fastssl.methods.base import (Method, Output, Views, cosine_momentum, ema_update, momentum_teacher,
                                  output_std, predictor_mlp)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z), averaged over the batch (the target `z` carries no gradient)."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=1)).mean()


class BYOL(Method):
    name = "byol"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        s = cfg.method.byol
        self.projector = self.new_projector(cfg)
        self.predictor = predictor_mlp(cfg.model.proj_dim, s.pred_hidden_dim)
        self.target_backbone, self.target_projector = momentum_teacher(self.backbone), momentum_teacher(self.projector)
        self.base_momentum = self.momentum = s.momentum

    @classmethod
    def default_views(cls, cfg: Config):
        if not cfg.method.byol.asymmetric_views:
            return [{}, {}]
        # Only the blur/solarise asymmetry: the jitter strength stays the augment section's.
        return [{k: v for k, v in view.items() if k in ("blur_p", "solarize_p")} for view in RECIPES["byol"]]

    def before_step(self, step: int) -> None:
        self.momentum = cosine_momentum(self.base_momentum, step, self.total_steps)

    def forward(self, views: Views) -> Output:
        x = torch.cat(views)
        p1, p2 = self.predictor(self.projector(self.backbone(x))).chunk(2)
        with torch.no_grad():
            t1, t2 = self.target_projector(self.target_backbone(x)).chunk(2)
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        return loss, {**output_std(p1), "momentum": self.momentum}

    @torch.no_grad()
    def after_step(self) -> None:
        ema_update(self.target_backbone, self.backbone, self.momentum)
        ema_update(self.target_projector, self.projector, self.momentum)
