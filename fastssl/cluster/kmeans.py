"""Euclidean k-means (Lloyd's algorithm) in batched torch, on the device of the data.

One iteration: assign every row of x to its nearest centroid, then move each centroid to the mean
of its rows. `iterations` such steps run, then the rows are assigned once more against the final
centroids; that assignment and its inertia (sum of squared distances of the rows to their
centroid) are the result.

- Restarts: the `restarts` runs share every step as a leading batch dimension (R, k, d) and the
  one of lowest inertia wins (ties: the lowest restart).
- Distances: ||x||^2 - 2 x.c + ||c||^2, one matmul per chunk of `chunk_size` rows, so the memory
  of a step is about R * chunk_size * k * 4 bytes on top of x, whatever n is.
- Initialisation (`initial_centroids`): for each restart, k distinct rows of x drawn by
  torch.randperm on a CPU generator seeded from `seed`, so the result depends on the seed only,
  never on torch's global RNG or on the device.
- Empty clusters are re-seeded by splitting a large one, as Faiss does (faiss/Clustering.cpp,
  split_clusters), but deterministically: the most populated cluster (ties: lowest index) gives
  the empty centroid a copy of itself scaled by (1 + eps) on even dimensions and (1 - eps) on odd
  ones, and takes the opposite perturbation itself; its count is treated as split in half. Several
  empty clusters in one iteration are handled in increasing index order, each splitting the then
  largest cluster. (k <= n, so a cluster of at least 2 rows always exists to split.)
- Distributed: under torch.distributed with more than one rank and `sync_ranks`, every rank is
  assumed to hold the same x; each computes the clustering and rank 0's result (centroids,
  assignments, inertia, restart) is broadcast, so every rank holds exactly the same assignment even
  where floating point differed across ranks (e.g. atomic adds on GPUs).
"""
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

SPLIT_EPS = 1 / 1024
"""Relative perturbation between the two halves of a split cluster (Faiss's EPS)."""


class KMeansResult(NamedTuple):
    centroids: torch.Tensor
    """(k, d) float32, the winning restart's final centroids."""
    assignments: torch.Tensor
    """(n,) int64, the index of each row's nearest final centroid."""
    inertia: float
    """Sum over the rows of the squared distance to their centroid."""
    restart: int
    """Which restart won (the index into `init` or the initial centroids)."""


def initial_centroids(x: torch.Tensor, k: int, restarts: int, generator: torch.Generator) -> torch.Tensor:
    """(restarts, k, d) float32 on x's device: for each restart, k distinct rows of x drawn at random.

    The draw is torch.randperm on `generator`, a CPU generator (kmeans seeds one with
    `torch.Generator().manual_seed(seed)`), so it is the same on every device."""
    rows = torch.stack([torch.randperm(x.shape[0], generator=generator)[:k] for _ in range(restarts)])
    return x.float()[rows.to(x.device)]


def kmeans(x: torch.Tensor, k: int, *, iterations: int = 20, restarts: int = 1, seed: int = 0,
           init: Optional[torch.Tensor] = None, chunk_size: int = 65536, sync_ranks: bool = True) -> KMeansResult:
    """k-means of the rows of x (n, d), any float dtype, computed in float32 on x's device.

    `iterations` Lloyd steps from `restarts` starts, the one of lowest inertia kept. `init`
    (restarts, k, d) replaces the starts drawn from `seed` (which it makes unused). `chunk_size`
    rows are compared with the centroids at a time. Under torch.distributed (world size > 1) with
    `sync_ranks`, every rank must pass the same x and receives rank 0's result, so the assignments
    are identical on every rank; every rank must call it (it broadcasts). The module docstring has
    the details, the empty-cluster rule included."""
    _check_arguments(x, k, iterations, restarts, init, chunk_size)
    x = x.float()
    if init is None:
        centroids = initial_centroids(x, k, restarts, torch.Generator().manual_seed(seed))
    else:
        centroids = init.to(device=x.device, dtype=torch.float32)
    for _ in range(iterations):
        labels, _ = _assign(x, centroids, chunk_size)
        centroids = _update(x, labels, k)
    labels, distances = _assign(x, centroids, chunk_size)
    inertias = distances.double().sum(dim=1)     # float64: n float32 terms lose digits otherwise
    best = int(inertias.argmin())                # the first minimum: the lowest restart on ties
    result = KMeansResult(centroids[best].clone(), labels[best].clone(), float(inertias[best]), best)
    if sync_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        result = _broadcast_from_rank_0(result)
    return result


def _check_arguments(x, k, iterations, restarts, init, chunk_size) -> None:
    if x.dim() != 2:
        raise ValueError(f"kmeans: x must be 2-D (n, d), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"kmeans: x must be a floating-point tensor, got dtype {x.dtype}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans: k must be between 1 and the number of rows of x ({n}), got k={k}")
    if iterations < 1:
        raise ValueError(f"kmeans: iterations must be >= 1, got iterations={iterations}")
    if restarts < 1:
        raise ValueError(f"kmeans: restarts must be >= 1, got restarts={restarts}")
    if chunk_size < 1:
        raise ValueError(f"kmeans: chunk_size must be >= 1, got chunk_size={chunk_size}")
    if not torch.isfinite(x).all():
        raise ValueError("kmeans: x has non-finite values (NaN or inf)")
    if init is not None:
        expected = (restarts, k, x.shape[1])
        if tuple(init.shape) != expected:
            raise ValueError(f"kmeans: init must have shape (restarts, k, d) = {expected}, got {tuple(init.shape)}")
        if not torch.isfinite(init).all():
            raise ValueError("kmeans: init has non-finite values (NaN or inf)")


def _assign(x: torch.Tensor, centroids: torch.Tensor, chunk_size: int):
    """The nearest centroid of every row for each restart, (R, n) int64, and its squared distance,
    (R, n) float32 (clamped at 0: the expanded form can round below it)."""
    centroid_sq = (centroids ** 2).sum(dim=2)[:, None, :]                     # (R, 1, k)
    labels, distances = [], []
    for chunk in x.split(chunk_size):
        # ||x||^2 is the same for every centroid, so it is added after the argmin.
        partial = centroid_sq - 2 * torch.matmul(chunk, centroids.transpose(1, 2))   # (R, m, k)
        best, label = partial.min(dim=2)       # ties: the lowest centroid index
        distances.append((best + (chunk ** 2).sum(dim=1)).clamp(min=0))
        labels.append(label)
    return torch.cat(labels, dim=1), torch.cat(distances, dim=1)


def _update(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """The mean of each cluster's rows, (R, k, d); empty clusters re-seeded by splitting (module docstring)."""
    restarts, (n, d) = labels.shape[0], x.shape
    # expand() makes views, not R copies of x.
    sums = x.new_zeros(restarts, k, d).scatter_add_(1, labels[:, :, None].expand(restarts, n, d),
                                                   x.expand(restarts, n, d))
    counts = torch.zeros(restarts, k, dtype=torch.int64, device=x.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    centroids = sums / counts.clamp(min=1)[:, :, None]
    empty = counts == 0
    if not empty.any():
        return centroids
    counts = counts.cpu()
    # +1 on even dimensions, -1 on odd ones: the empty centroid moves one way, the split one the other.
    sign = torch.tensor([1.0, -1.0], device=x.device).repeat((d + 1) // 2)[:d]
    for r, j in empty.nonzero().tolist():       # restart-major, then increasing cluster index
        big = int(counts[r].argmax())           # the first maximum: the lowest index on ties
        centroids[r, j] = centroids[r, big] * (1 + SPLIT_EPS * sign)
        centroids[r, big] = centroids[r, big] * (1 - SPLIT_EPS * sign)
        counts[r, j] = counts[r, big] // 2
        counts[r, big] -= counts[r, j]
    return centroids


def _broadcast_from_rank_0(result: KMeansResult) -> KMeansResult:
    """Every rank gets rank 0's result (tensors on the result's device, which the backend must support)."""
    centroids, assignments = result.centroids.contiguous(), result.assignments.contiguous()
    scalars = torch.tensor([result.inertia, result.restart], dtype=torch.float64, device=centroids.device)
    for t in (centroids, assignments, scalars):
        dist.broadcast(t, src=0)
    return KMeansResult(centroids, assignments, float(scalars[0]), int(scalars[1]))
