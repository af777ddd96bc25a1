"""The pure-PyTorch NT-Xent / InfoNCE reference: the spec every faster backend is tested against.

SimCLR (Chen et al. 2020, arXiv 2002.05709, eq. 1). For a batch of N images with projections
z1 (view 1) and z2 (view 2), stack z = [z1; z2] (2N rows). Anchor i's positive is the other view
of the same image (i + N or i - N); the remaining 2N - 2 rows are its negatives; its own row is
*excluded* from the softmax (masked to -inf, which also removes it from the gradient; subtracting
exp(1/t) afterwards would not). The loss is the mean over the 2N anchors of

    -log( exp(s_ip / t) / sum_{k != i} exp(s_ik / t) ),   s = cosine similarity.

It materialises the 2N x 2N similarity matrix, so memory grows with N^2: that is what the
chunked and fused backends avoid.
"""
import torch
import torch.nn.functional as F


def check_views(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> None:
    """Raise a clear error for inputs no backend can accept."""
    for name, z in (("z1", z1), ("z2", z2)):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {z.dtype}")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.dtype != z2.dtype:
        raise TypeError(f"z1 and z2 must have the same dtype, got {z1.dtype} and {z2.dtype}")
    if z1.device != z2.device:
        raise ValueError(f"z1 and z2 must be on the same device, got {z1.device} and {z2.device}")
    if z1.shape[0] == 0 or z1.shape[1] == 0:
        raise ValueError(f"empty batch: z1 has shape {tuple(z1.shape)}; NT-Xent needs N >= 1 and D >= 1")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1,
                      *, upcast: bool = True) -> torch.Tensor:
    """SimCLR NT-Xent of two view batches (N, D); un-normalised projections in, scalar mean out.

    With ``upcast`` the computation runs in fp32 whatever the input dtype (the oracle); without,
    in the input's own precision (what a user's eager code would do, used to derive tolerances).
    """
    check_views(z1, z2, temperature)
    n = z1.shape[0]
    z = torch.cat([z1, z2])                                   # (2N, D)
    if upcast:
        z = z.float()
    z = F.normalize(z, dim=1)
    logits = (z @ z.T) / temperature                          # (2N, 2N)
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits.float() if upcast else logits, positives)
