"""MoCo v2 (Chen et al. 2020, arXiv 2003.04297) and MoCo v3 (Chen et al. 2021, arXiv 2104.02057).

Both have a query encoder (backbone + projector, trained) and a key encoder, its EMA copy, and
an InfoNCE loss of each query against the keys through `fastssl.losses.info_nce_rows_cols`, so
the fused kernels apply. Keys carry no gradient.

- v2: the negatives are a FIFO queue of the keys of earlier batches (`method.moco_v2.queue_size`),
  the momentum is constant. Under torchrun every rank gathers the keys of the global batch, so
  the queue is the same on every rank. The loss is symmetrised (each view is the query once, as
  in solo-learn's MoCo v2+), and both views' keys are enqueued.
- v3: no queue; a predictor on the query side; each query against the keys of the whole global
  batch, symmetrised and scaled by 2t as in the paper's code; momentum 0.99 -> 1 (cosine).

Batch statistics must not leak the positive key to the query (MoCo's "shuffle BN"): under
torchrun `train.sync_bn` computes them over the global batch, which the trainer requires for these
methods; in one process they already cover the whole batch.
"""
import torch
import torch.nn.functional as F

from fastssl.config import Config
from fastssl.losses import info_nce_rows_cols
from fastssl.losses.distributed import gather_with_grad, world_size
from fastssl.methods.base import (Method, Output, Views, cosine_momentum, ema_update, momentum_teacher,
                                  output_std, predictor_mlp)


def global_keys(k: torch.Tensor) -> torch.Tensor:
    """The keys of every rank, in rank order (no gradient: they come from the key encoder)."""
    return gather_with_grad(k.detach())


def positives_in_global_batch(n: int, device) -> torch.Tensor:
    """Column of each local query's positive among the gathered keys: this rank's slice."""
    rank = torch.distributed.get_rank() if world_size() > 1 else 0
    return torch.arange(rank * n, (rank + 1) * n, device=device)


class MoCo(Method):
    """What v2 and v3 share: the query encoder's projector, the key encoder and its EMA."""
    needs_global_batch_norm = True

    def __init__(self, cfg: Config, settings, last_bn: bool):
        super().__init__(cfg)
        self.projector = self.new_projector(cfg, last_bn=last_bn)
        self.key_backbone, self.key_projector = momentum_teacher(self.backbone), momentum_teacher(self.projector)
        self.temperature, self.loss_backend = settings.temperature, cfg.loss.backend
        self.base_momentum = self.momentum = settings.momentum

    def keys(self, x: torch.Tensor):
        """The key encoder's projections of both views (no gradient), each gathered over the ranks."""
        with torch.no_grad():
            return [global_keys(k) for k in self.key_projector(self.key_backbone(x)).float().chunk(2)]

    @torch.no_grad()
    def after_step(self) -> None:
        ema_update(self.key_backbone, self.backbone, self.momentum)
        ema_update(self.key_projector, self.projector, self.momentum)


class MoCoV2(MoCo):
    name = "moco_v2"

    def __init__(self, cfg: Config):
        s = cfg.method.moco_v2
        super().__init__(cfg, s, last_bn=False)
        # The queue starts with random unit keys (as in the paper's code) and fills from the front.
        self.register_buffer("queue", F.normalize(torch.randn(s.queue_size, cfg.model.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.pending_keys = None

    def forward(self, views: Views) -> Output:
        x = torch.cat(views)
        q1, q2 = self.projector(self.backbone(x)).float().chunk(2)
        k1, k2 = (F.normalize(k, dim=1) for k in self.keys(x))
        queue = self.queue.clone()       # after_step overwrites the buffer in place
        positive = positives_in_global_batch(q1.shape[0], q1.device)
        loss = (info_nce_rows_cols(q1, torch.cat([k2, queue]), positive, self.temperature, backend=self.loss_backend)
                + info_nce_rows_cols(q2, torch.cat([k1, queue]), positive, self.temperature,
                                     backend=self.loss_backend)) / 2
        self.pending_keys = torch.cat([k1, k2])
        return loss, output_std(q1)

    @torch.no_grad()
    def after_step(self) -> None:
        super().after_step()
        if self.pending_keys is not None:
            enqueue(self.queue, self.queue_ptr, self.pending_keys)
            self.pending_keys = None


@torch.no_grad()
def enqueue(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Write `keys` into the FIFO `queue` at `ptr`, wrapping around, and advance `ptr` (in place).
    More keys than the queue holds keep the newest."""
    size = queue.shape[0]
    keys = keys[-size:]
    rows = (ptr + torch.arange(keys.shape[0], device=queue.device)) % size
    queue[rows] = keys.to(queue.dtype)
    ptr.copy_((ptr + keys.shape[0]) % size)


class MoCoV3(MoCo):
    name = "moco_v3"

    def __init__(self, cfg: Config):
        s = cfg.method.moco_v3
        super().__init__(cfg, s, last_bn=True)
        self.predictor = predictor_mlp(cfg.model.proj_dim, s.pred_hidden_dim)

    def before_step(self, step: int) -> None:
        self.momentum = cosine_momentum(self.base_momentum, step, self.total_steps)

    def forward(self, views: Views) -> Output:
        x = torch.cat(views)
        q1, q2 = self.predictor(self.projector(self.backbone(x))).float().chunk(2)
        k1, k2 = self.keys(x)
        positive = positives_in_global_batch(q1.shape[0], q1.device)
        t = self.temperature
        loss = 2 * t * (info_nce_rows_cols(q1, k2, positive, t, backend=self.loss_backend)
                         + info_nce_rows_cols(q2, k1, positive, t, backend=self.loss_backend))
        return loss, {**output_std(q1), "momentum": self.momentum}
