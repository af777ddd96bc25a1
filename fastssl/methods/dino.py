"""DINO (Caron et al. 2021, arXiv 2104.14294): self-distillation with multi-crop.

The student (backbone + head) sees 2 global views and K local views; the teacher, the student's
EMA (momentum 0.996 -> 1, cosine), sees only the 2 global views. The loss is the cross-entropy
between the teacher's sharpened, centred distribution on one global view and the student's on
every other view: H(softmax((t - c) / tau_t), softmax(s / tau_s)), averaged over the pairs.
The centre c is an EMA (0.9) of the teacher's mean output over the global batch; tau_t warms up
linearly from 0.04 to 0.07 over 30 epochs. Centring and sharpening together avoid collapse.

The head: the shared projection MLP (model.proj_*) down to a bottleneck of model.proj_dim, L2
normalisation, then a weight-normalised linear layer (unit-norm rows, no bias) to
method.dino.out_dim prototypes, which takes no update during the first
`freeze_last_layer_epochs` (its gradient is dropped after backward, as DINO does). The teacher's
backbone is the one evaluated.

Collapse is watched: the stats hold the teacher's mean entropy and the KL between teacher and
student; a KL near 0 means both collapsed to the same (uniform or one-hot) output.
"""
import math
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl.config import Config, ConfigError
from fastssl.losses.distributed import world_size
from fastssl.methods.base import (Method, Output, Views, cosine_momentum, ema_update, momentum_teacher,
                                  output_std, split_views)
from fastssl.models import projection_mlp

# Below this KL (nats) between the teacher's and the student's distributions, they have collapsed.
COLLAPSE_KL = 1e-3


class NormalizedLinear(nn.Module):
    """Linear layer whose weight rows are unit-norm (weight norm with the gain fixed at 1), no bias."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, layers: int, out_dim: int):
        super().__init__()
        self.mlp = projection_mlp(in_dim, hidden_dim, bottleneck_dim, layers)
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=1))


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, n_views: int, n_global: int, center: torch.Tensor,
              student_temperature: float, teacher_temperature) -> Dict[str, torch.Tensor]:
    """{'loss', 'teacher_entropy', 'kl'} from the student's logits on every view (n_views * N, K,
    view-major) and the teacher's on the global views (n_global * N, K)."""
    log_s = F.log_softmax(student.float() / student_temperature, dim=1).chunk(n_views)
    p_t = F.softmax((teacher.float() - center) / teacher_temperature, dim=1).detach().chunk(n_global)
    cross, pairs = 0.0, 0
    for i, p in enumerate(p_t):
        for v, log_q in enumerate(log_s):
            if v != i:         # never the same view for student and teacher
                cross = cross + (-(p * log_q).sum(dim=1)).mean()
                pairs += 1
    loss = cross / pairs
    with torch.no_grad():
        entropy = torch.stack([-(p * p.clamp_min(1e-12).log()).sum(dim=1).mean() for p in p_t]).mean()
        # Every teacher view is paired with n_views - 1 student views: mean CE = H(teacher) + mean KL.
        kl = loss.detach() - entropy
    return {"loss": loss, "teacher_entropy": entropy, "kl": kl}


class DINO(Method):
    name = "dino"
    n_global = 2

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        m, s = cfg.model, cfg.method.dino
        self.head = DINOHead(self.feature_dim, m.proj_hidden_dim, m.proj_dim, max(2, m.proj_layers), s.out_dim)
        self.teacher_backbone, self.teacher_head = momentum_teacher(self.backbone), momentum_teacher(self.head)
        self.settings = s
        self.base_momentum = self.momentum = s.momentum
        self.register_buffer("center", torch.zeros(1, s.out_dim))
        # Scheduled, set by before_step: a buffer (not a float attribute) so torch.compile does not recompile.
        self.register_buffer("teacher_temperature", torch.tensor(s.teacher_temperature_start), persistent=False)
        self.pending_center = None
        self.last_layer_frozen = False

    @classmethod
    def default_views(cls, cfg: Config):
        s = cfg.method.dino
        # DINO's recipe: global view 1 always blurred, global view 2 rarely blurred and sometimes solarised.
        views = [dict(crop_scale=s.global_crop_scale, blur_p=1.0, solarize_p=0.0),
                 dict(crop_scale=s.global_crop_scale, blur_p=0.1, solarize_p=0.2)]
        if s.local_crops:
            views.append(dict(size=s.local_size, crop_scale=s.local_crop_scale, blur_p=0.5, solarize_p=0.0,
                              copies=s.local_crops))
        return views

    @classmethod
    def check_views(cls, views) -> None:
        if len(views) < 2:
            raise ConfigError(f"augment.views: dino needs 2 global views (and any local ones), got {len(views)}")
        if views[0].size != views[1].size:
            raise ConfigError(f"augment.views: dino's first 2 views are the global ones and must have the same "
                              f"size, got {views[0].size} and {views[1].size} px")

    def teacher_temperature_at(self, step: int) -> float:
        s = self.settings
        warmup = s.teacher_temperature_warmup_epochs * self.steps_per_epoch
        if step >= warmup:
            return s.teacher_temperature
        return s.teacher_temperature_start + (s.teacher_temperature - s.teacher_temperature_start) * step / warmup

    def before_step(self, step: int) -> None:
        self.momentum = cosine_momentum(self.base_momentum, step, self.total_steps)
        self.teacher_temperature.fill_(self.teacher_temperature_at(step))
        self.last_layer_frozen = step < self.settings.freeze_last_layer_epochs * self.steps_per_epoch

    def before_optimizer_step(self) -> None:
        if self.last_layer_frozen:      # no gradient: the optimiser leaves the layer (and its momentum) alone
            self.head.last_layer.weight.grad = None

    def forward(self, views: Views) -> Output:
        # The backbone runs once per view size; the head once over every view's features.
        student = self.head(torch.cat(split_views(views, self.backbone)))
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(torch.cat(views[:self.n_global])))
        out = dino_loss(student, teacher, len(views), self.n_global, self.center, self.settings.student_temperature,
                        self.teacher_temperature)
        self.pending_center = teacher.float().mean(dim=0, keepdim=True)
        stats = {**output_std(teacher), "teacher_entropy": out["teacher_entropy"].item(), "kl": out["kl"].item(),
                 "teacher_temperature": self.teacher_temperature.item(), "momentum": self.momentum}
        return out["loss"], stats

    @torch.no_grad()
    def after_step(self) -> None:
        ema_update(self.teacher_backbone, self.backbone, self.momentum)
        ema_update(self.teacher_head, self.head, self.momentum)
        if self.pending_center is not None:
            batch_center = self.pending_center
            if world_size() > 1:       # the mean over the global batch (equal local batches)
                torch.distributed.all_reduce(batch_center)
                batch_center /= world_size()
            m = self.settings.center_momentum
            self.center.mul_(m).add_(batch_center, alpha=1 - m)
            self.pending_center = None

    def eval_backbone(self) -> nn.Module:
        return self.teacher_backbone

    def collapse_warning(self, stats: Dict[str, float]) -> Optional[str]:
        if stats.get("kl", math.inf) < COLLAPSE_KL:
            return (f"dino: teacher and student have collapsed to the same output (KL {stats['kl']:.2e} nats, "
                    f"teacher entropy {stats['teacher_entropy']:.3f} of at most {math.log(self.settings.out_dim):.3f})")
        return super().collapse_warning(stats)
