"""PCA whitening, as DeepCluster applies to the features before k-means.

The rows are centred, the covariance (float64, so small eigenvalues keep their digits) is
eigendecomposed, the rows are projected on the top `dim` components and each coordinate is divided
by sqrt(eigenvalue + eps): the output's covariance is about the identity (exactly diag(l / (l + eps))).

A component's sign is arbitrary in an eigendecomposition (it may differ across devices or LAPACK
versions), so it is fixed: the loading of largest magnitude of each component is made positive.
"""
import torch


def pca_whiten(x: torch.Tensor, dim: int, eps: float = 1e-5) -> torch.Tensor:
    """The rows of x (n, d) whitened on their top principal components: (n, dim') in x's dtype.

    dim' = min(dim, d, n - 1): data with fewer dimensions, or fewer rows than dim + 1 (the centred
    rows span at most n - 1 dimensions), gives fewer components than asked. eps > 0 keeps a
    direction of zero variance (repeated or constant columns) finite instead of dividing by 0."""
    if x.dim() != 2:
        raise ValueError(f"pca_whiten: x must be 2-D (n, d), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"pca_whiten: x must be a floating-point tensor, got dtype {x.dtype}")
    n, d = x.shape
    if n < 2:
        raise ValueError(f"pca_whiten: x needs at least 2 rows to have a covariance, got n={n}")
    if d < 1:
        raise ValueError(f"pca_whiten: x needs at least 1 column, got d={d}")
    if dim < 1:
        raise ValueError(f"pca_whiten: dim must be >= 1, got dim={dim}")
    if not eps >= 0:      # written so that NaN fails too
        raise ValueError(f"pca_whiten: eps must be >= 0, got eps={eps}")
    if not torch.isfinite(x).all():
        raise ValueError("pca_whiten: x has non-finite values (NaN or inf)")
    x64 = x.double()
    centred = x64 - x64.mean(dim=0)
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / (n - 1))    # ascending
    components = min(dim, d, n - 1)
    eigenvalues = eigenvalues.flip(0)[:components].clamp(min=0)     # rounding can leave tiny negatives
    eigenvectors = eigenvectors.flip(1)[:, :components]              # (d, dim'), one component a column
    largest = eigenvectors.abs().argmax(dim=0)
    eigenvectors = eigenvectors * eigenvectors[largest, torch.arange(components, device=x.device)].sign()
    return (centred @ eigenvectors / (eigenvalues + eps).sqrt()).to(x.dtype)
