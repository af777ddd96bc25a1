"""DeepCluster (Caron et al. 2018, arXiv 1807.05520): the network learns to classify images into
the clusters of its own features, and the clusters are made again as the features improve.

Before every `reassign_every_epochs`-th epoch (`before_epoch`):
1. the backbone, in eval mode, computes the features of every training image on its centre view
   (the evaluation's view; under torchrun each rank computes a share and the shares are gathered);
2. the features are PCA-whitened to `pca_dim` dimensions and L2-normalised;
3. k-means (`fastssl.cluster.kmeans`: `kmeans_restarts` runs of `kmeans_iterations` Lloyd
   iterations, seeded by (train.seed, epoch); rank 0's result is broadcast, so every rank has the
   same assignment) groups them into `clusters` clusters: the cluster ids are the images' labels;
4. the linear classifier on the backbone's features is re-initialised (the trainer drops its
   optimiser state): the old classes mean nothing for the new clusters;
5. the epoch samples uniformly over the non-empty clusters (`cluster_uniform_order`), so a few
   large clusters cannot take over the loss and collapse the features into them.
Training is then plain classification: cross-entropy of the classifier's logits against the
labels of the images in the batch (the trainer passes their dataset indices).

With `sobel` (the paper's default) the backbone sees the horizontal and vertical Sobel gradients
of the grey image (2 channels) instead of RGB, so colour cannot make the clusters; the exported
backbone's first convolution then takes those 2 channels.

The assignment (a buffer as long as the training set), the classifier and the epoch of the last
clustering are in the checkpoint, and the epoch order is a function of (assignment, seed, epoch):
a run resumed within an epoch continues it exactly.
"""
import logging
import time
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl.cluster import kmeans, nmi, pca_whiten
from fastssl.config import Config, ConfigError
from fastssl.methods.base import Method, Output, Views, output_std
from fastssl.models import build_backbone

log = logging.getLogger("fastssl")


def sobel(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 2, H, W): the Sobel x and y gradients of the channel mean (grey)."""
    grey = x.mean(dim=1, keepdim=True)
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=x.device, dtype=x.dtype)
    return F.conv2d(grey, torch.stack([kx, kx.T]).unsqueeze(1), padding=1)


class SobelInput(nn.Module):
    """The evaluated backbone with `sobel`: images -> Sobel gradients -> features."""

    input_note = ("the input is the Sobel x and y gradients (2 channels, 3x3 kernels [[1,0,-1],[2,0,-2],[1,0,-1]] "
                  "and its transpose, padding 1) of the mean of the 3 normalised RGB channels")

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.net = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(sobel(x))


def cluster_uniform_order(assignments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """n dataset indices (n = len(assignments)) that visit every non-empty cluster equally often:
    each gets n // k' draws (k' non-empty clusters; n % k' of them, chosen at random, one more),
    taken from its images in a random order, cycling through them when it has fewer images than
    draws; the draws are then shuffled."""
    assignments = assignments.cpu()
    n = len(assignments)
    clusters, counts = assignments.unique(return_counts=True)
    k = len(clusters)
    quota = torch.full((k,), n // k, dtype=torch.long)
    quota[torch.randperm(k, generator=generator)[:n % k]] += 1
    # The images sorted by cluster, in a random order within each cluster.
    shuffled = torch.randperm(n, generator=generator)
    by_cluster = shuffled[torch.argsort(assignments[shuffled], stable=True)]
    first = torch.cumsum(counts, 0) - counts                  # where each cluster starts in by_cluster
    cluster_of_draw = torch.repeat_interleave(torch.arange(k), quota)
    draw_in_cluster = torch.arange(n) - torch.repeat_interleave(torch.cumsum(quota, 0) - quota, quota)
    picks = by_cluster[first[cluster_of_draw] + draw_in_cluster % counts[cluster_of_draw]]
    return picks[torch.randperm(n, generator=generator)]


class DeepCluster(Method):
    name = "deepcluster"
    needs_indices = True

    def __init__(self, cfg: Config):
        self.settings = s = cfg.method.deepcluster
        super().__init__(cfg)
        self.seed = cfg.train.seed
        self.head = nn.Linear(self.feature_dim, s.clusters)
        # Filled by the first clustering, then as long as the training set (see _load_from_state_dict).
        self.register_buffer("assignments", torch.zeros(0, dtype=torch.long))
        self.register_buffer("clustered_epoch", torch.tensor(-1))

    def new_backbone(self, cfg: Config):
        backbone, dim = build_backbone(cfg.model.backbone, cfg.model.stem)
        if self.settings.sobel:
            conv = backbone.conv1
            backbone.conv1 = nn.Conv2d(2, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
        return backbone, dim

    @classmethod
    def default_views(cls, cfg: Config) -> List[dict]:
        return [{}]       # one view with the augment section's settings

    @classmethod
    def check_views(cls, views) -> None:
        if len(views) != 1:
            raise ConfigError(f"augment.views: method {cls.name} takes exactly 1 view, got {len(views)}")

    def eval_backbone(self) -> nn.Module:
        return SobelInput(self.backbone) if self.settings.sobel else self.backbone

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The assignment is as long as the training set, known only once clustered: take the saved length.
        key = prefix + "assignments"
        if key in state_dict:
            self.assignments = torch.zeros_like(state_dict[key], device=self.assignments.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def before_epoch(self, epoch: int, training_features) -> List[nn.Parameter]:
        s = self.settings
        if epoch % s.reassign_every_epochs and len(self.assignments):
            return []
        start = time.perf_counter()
        features = training_features(self.eval_backbone())
        if s.clusters > len(features):
            raise ConfigError(f"method.deepcluster.clusters: {s.clusters} clusters for {len(features)} training "
                              "images; use fewer clusters than images")
        whitened = F.normalize(pca_whiten(features, s.pca_dim), dim=1)
        result = kmeans(whitened, s.clusters, iterations=s.kmeans_iterations, restarts=s.kmeans_restarts,
                        seed=self.seed * 1_000_003 + epoch)
        previous = self.assignments
        self.assignments = result.assignments.to(self.assignments.device)
        self.clustered_epoch.fill_(epoch)
        self.reset_head(epoch)
        sizes = torch.bincount(self.assignments, minlength=s.clusters)
        stability = (f", NMI with the previous clusters {nmi(previous.cpu(), self.assignments.cpu()):.3f}"
                     if len(previous) == len(self.assignments) else "")
        log.info("epoch %d: k-means of %d features (%d dims after PCA) into %d clusters in %.1fs: %d non-empty, "
                 "the largest holds %d images%s", epoch + 1, len(features), whitened.shape[1], s.clusters,
                 time.perf_counter() - start, int((sizes > 0).sum()), int(sizes.max()), stability)
        return list(self.head.parameters())

    @torch.no_grad()
    def reset_head(self, epoch: int) -> None:
        """The classifier from scratch (the paper's N(0, 0.01) weights, zero bias), seeded by the epoch."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=generator) * 0.01)
        self.head.bias.zero_()

    def epoch_order(self, epoch: int) -> Optional[torch.Tensor]:
        if not len(self.assignments):
            raise RuntimeError("deepcluster: no cluster assignment yet (before_epoch makes it)")
        return cluster_uniform_order(self.assignments, torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def forward(self, views: Views, indices: torch.Tensor) -> Output:
        if not len(self.assignments):
            raise RuntimeError("deepcluster: no cluster assignment yet (before_epoch makes it before training)")
        x = sobel(views[0]) if self.settings.sobel else views[0]
        features = self.backbone(x)
        logits = self.head(features).float()
        labels = self.assignments[indices.to(self.assignments.device)]
        loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
        return loss, {**output_std(features), "cluster_accuracy": accuracy}
