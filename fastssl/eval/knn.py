"""Weighted k-nearest-neighbour evaluation of frozen features (Wu et al. 2018, InstDisc; DINO).

Each validation image votes among its k most cosine-similar training images, neighbour j with
weight exp(sim_j / t) for its class; the class with the largest total wins.
"""
import copy
from typing import Callable, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Precise BN (Wu & Johnson 2021) estimates the population statistics from ~10^4 images.
BN_ESTIMATE_IMAGES = 10_000


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, loader, preprocess: Callable,
                     normalize: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 features (L2-normalised unless `normalize=False`) and labels for every image the loader
    yields (eval mode)."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for views, y, _ in loader:
        f = backbone(preprocess(views[0])).float()
        feats.append(F.normalize(f, dim=1) if normalize else f)
        labels.append(y)
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def with_estimated_batch_norm(backbone: nn.Module, loader, preprocess: Callable,
                              max_images: int = BN_ESTIMATE_IMAGES) -> nn.Module:
    """A copy of `backbone`, in eval mode, whose batch-norm running statistics are re-estimated on
    (the first `max_images` of) the images `loader` yields: each layer's batch mean and variance,
    averaged over the batches. The weights are untouched, so kNN of a random-init copy measures
    what fitting the normalisation to the data gives without any training; a random network's
    initial statistics (mean 0, variance 1) fit no real activations."""
    net = copy.deepcopy(backbone).eval()
    norms = [m for m in net.modules() if isinstance(m, BATCH_NORMS)]
    if not norms:
        return net
    for m in norms:
        m.reset_running_stats()
        m.momentum = None              # a cumulative average over the batches, not an EMA
    net.train()
    seen = 0
    for views, _, _ in loader:
        if seen >= max_images:
            break
        net(preprocess(views[0]))
        seen += len(views[0])
    return net.eval()


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                k: int = 200, temperature: float = 0.07, num_classes: int = None, chunk: int = 1024) -> torch.Tensor:
    """Predicted class for each query row (features already L2-normalised)."""
    if train_features.shape[0] == 0:
        raise ValueError("kNN needs at least one training feature")
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
    preds = []
    for start in range(0, query_features.shape[0], chunk):
        sim = query_features[start:start + chunk] @ train_features.T             # (q, n_train)
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(train_features, train_labels, val_features, val_labels, k=200, temperature=0.07) -> float:
    """Top-1 accuracy in percent."""
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    pred = knn_predict(train_features, train_labels, val_features, k, temperature, num_classes)
    return 100.0 * (pred == val_labels).float().mean().item()
