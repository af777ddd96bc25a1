"""The method interface: everything method-specific, in one place per method.

A method is an `nn.Module` that owns its networks (backbone, projector, predictor, a momentum
teacher) and says:
- `default_views(cfg)`: the views it needs, one mapping of augmentation overrides per view (over
  the `augment` section), `copies` for repeated views and `size`/`crop_scale` for multi-crop;
  `check_views(views)` refuses view lists it cannot use (`augment.views` replaces the default);
- `forward(views)`: (loss, stats) from the augmented views (a list of float NCHW batches);
- `before_optimizer_step()`: a last say on the gradients after backward (DINO drops its last
  layer's while that layer is frozen);
- `before_step(step)`: its scheduled values for that step (EMA momentum, temperatures);
- `after_step()`: what it updates after the optimiser step (the teacher's EMA, a queue, a centre),
  from what `forward` left pending. The trainer skips it with the step when the loss is not finite;
- `before_epoch(epoch, training_features)`: work on the whole training set at the start of an
  epoch (DeepCluster's clustering), and `epoch_order(epoch)`: the order the epoch visits the
  images in (DeepCluster's cluster-uniform sampling); `needs_indices` makes the trainer pass the
  batch's dataset indices to `forward` (the pseudo-labels are per image).

Everything a method keeps between steps is a parameter or a buffer, and its schedules are
functions of the step, so the checkpoint's state_dict holds it and a resumed run continues
exactly. The trainer, the loaders, the checkpoints and the evaluation know nothing more.
"""
import copy
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl.config import Config, ConfigError
from fastssl.models import build_backbone, projection_mlp

# A healthy embedding spreads over its D dimensions: the std of the L2-normalised outputs is about
# 1/sqrt(D) (SimSiam, Sec. 4.1). Below this fraction of that, the outputs have collapsed.
COLLAPSE_STD_FRACTION = 0.1

Views = List[torch.Tensor]                       # the augmented views, float NCHW, one batch per view
Output = Tuple[torch.Tensor, Dict[str, float]]   # (loss, stats for the metrics)


class Method(nn.Module):
    """Base class: the backbone, the schedule, and the hooks' defaults (two plain views, no updates)."""

    name = ""
    # True where per-process batch statistics would leak the positive (MoCo): under torchrun the
    # trainer then requires train.sync_bn.
    needs_global_batch_norm = False
    # True where forward needs each image's dataset index (per-image pseudo-labels): the trainer
    # then calls forward(views, indices).
    needs_indices = False

    def __init__(self, cfg: Config):
        super().__init__()
        self.backbone, self.feature_dim = self.new_backbone(cfg)
        self.steps_per_epoch, self.total_steps = 1, 1

    def new_backbone(self, cfg: Config) -> Tuple[nn.Module, int]:
        """(backbone, feature dimension): the configured ResNet (split-brain has two)."""
        return build_backbone(cfg.model.backbone, cfg.model.stem)

    @classmethod
    def default_views(cls, cfg: Config) -> List[dict]:
        """Per-view overrides of the `augment` section; two views with its settings by default."""
        return [{}, {}]

    @classmethod
    def check_views(cls, views: Sequence) -> None:
        """Raise ConfigError for views this method cannot use (`views`: one SimCLRAugment per view)."""
        if len(views) != 2:
            raise ConfigError(f"augment.views: method {cls.name} takes exactly 2 views, got {len(views)}"
                              " (multi-crop needs a method that uses it: dino)")
        if views[0].size != views[1].size:
            raise ConfigError(f"augment.views: method {cls.name} takes 2 views of the same size, got "
                              f"{views[0].size} and {views[1].size} px")

    def new_projector(self, cfg: Config, last_bn: bool = False) -> nn.Sequential:
        """The projection MLP shared by the methods (model.proj_*) on the backbone's features."""
        m = cfg.model
        return projection_mlp(self.feature_dim, m.proj_hidden_dim, m.proj_dim, m.proj_layers, last_bn=last_bn)

    def set_schedule(self, steps_per_epoch: int, total_steps: int) -> None:
        """The run's length, for the schedules of `before_step` (the trainer calls this once)."""
        self.steps_per_epoch, self.total_steps = max(1, steps_per_epoch), max(1, total_steps)

    def before_step(self, step: int) -> None:
        """Set the scheduled values of global step `step` (0-based) before its forward."""

    def before_optimizer_step(self) -> None:
        """Called after backward, before gradient clipping and the optimiser step."""

    @torch.no_grad()
    def after_step(self) -> None:
        """Apply the updates that follow the optimiser step (EMA, queue, centre)."""

    def before_epoch(self, epoch: int, training_features: Callable[[nn.Module], torch.Tensor]) -> List[nn.Parameter]:
        """Called before epoch `epoch` (0-based) starts from its first batch; not when a run resumes
        within the epoch, since what it did then is in the checkpoint. `training_features(net)`
        gives net's fp32 features of every training image (centre view, eval mode, rows in
        dataset order, the same on every rank; a collective under torchrun). Returns the
        parameters it re-initialised, whose optimiser state the trainer drops."""
        return []

    def epoch_order(self, epoch: int) -> Optional[torch.Tensor]:
        """The dataset indices epoch `epoch` visits, in order (as many as there are images, the same
        on every rank), or None for the loader's seeded permutation."""
        return None

    def eval_backbone(self) -> nn.Module:
        """The backbone whose features are evaluated and exported."""
        return self.backbone

    def pretext_tasks(self) -> list:
        """(task, backbone) pairs whose held-out metric is reported (pretext tasks); none here."""
        return []

    def collapse_warning(self, stats: Dict[str, float]) -> Optional[str]:
        """A message when the stats show a collapse (logged by the trainer), else None."""
        std, dim = stats.get("z_std"), stats.get("z_dim")
        if std is not None and dim and std < COLLAPSE_STD_FRACTION / math.sqrt(dim):
            return (f"{self.name}: the outputs have collapsed (std of the normalised outputs {std:.2e}, "
                    f"healthy is about 1/sqrt({dim:.0f}) = {1 / math.sqrt(dim):.2e})")
        return None


def output_std(z: torch.Tensor) -> Dict[str, float]:
    """SimSiam's collapse indicator: the per-dimension std of the L2-normalised outputs, averaged
    (about 1/sqrt(D) when healthy, 0 when every output is the same), with D."""
    with torch.no_grad():
        std = F.normalize(z.detach().float(), dim=1).std(dim=0).mean().item()
    return {"z_std": std, "z_dim": float(z.shape[1])}


def momentum_teacher(student: nn.Module) -> nn.Module:
    """A copy of `student` that receives no gradient (updated by `ema_update` only)."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (the
    teacher's batch-norm statistics are its own, from its forward passes)."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    torch._foreach_lerp_(t_params, [p.detach() for p in s_params], 1.0 - momentum)


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL's schedule: `base` at step 0 rising to 1 at the last step, 1 - (1 - base)(cos(pi k/K) + 1)/2."""
    progress = min(step, total_steps) / max(1, total_steps)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def split_views(views: Sequence[torch.Tensor], encoder: nn.Module) -> List[torch.Tensor]:
    """`encoder` over each run of same-sized views in one batch (so batch-norm statistics cover
    them together), returned per view."""
    out, i = [], 0
    while i < len(views):
        j = i
        while j < len(views) and views[j].shape[-2:] == views[i].shape[-2:]:
            j += 1
        out += list(encoder(torch.cat(list(views[i:j]))).chunk(j - i))
        i = j
    return out


def predictor_mlp(dim: int, hidden_dim: int) -> nn.Sequential:
    """BYOL / SimSiam / MoCo v3 predictor: Linear-BN-ReLU-Linear, `dim` -> `hidden_dim` -> `dim`."""
    return nn.Sequential(nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, dim))
