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


# --------------------------------------------------------------------------------------------
# The general rows/cols form (MoCo-style queries against keys, the distributed case, SimCLR).
#
# R query embeddings ("rows") against C candidate embeddings ("cols"). Row i's positive is
# column positive[i]; column self_index[i] (if given and >= 0) is row i's own embedding and is
# masked out of the softmax. Both sides are L2-normalised. Loss = mean over rows of
#
#     -log( exp(s_{i,pos_i} / t) / sum_{j != self_i} exp(s_ij / t) ).
#
# SimCLR is rows = cols = [z1; z2], positive = i +- N, self_index = i (== nt_xent_reference).
# --------------------------------------------------------------------------------------------
def check_rows_cols(rows: torch.Tensor, cols: torch.Tensor, positive: torch.Tensor,
                    temperature: float, self_index=None, *, check_values: bool = True) -> None:
    """Raise a clear error for rows/cols inputs no backend can accept.

    ``check_values`` also checks the index *values* (range, positive != self); that reads the
    index tensors back to the host (a device sync), so the fast paths skip it while compiling
    or capturing a CUDA graph.
    """
    for name, z in (("rows", rows), ("cols", cols)):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {z.dtype}")
        if z.shape[0] == 0 or z.shape[1] == 0:
            raise ValueError(f"empty batch: {name} has shape {tuple(z.shape)}; need >= 1 row and D >= 1")
    if rows.shape[1] != cols.shape[1]:
        raise ValueError(f"rows and cols must have the same embedding dim, got {tuple(rows.shape)} and {tuple(cols.shape)}")
    if rows.dtype != cols.dtype:
        raise TypeError(f"rows and cols must have the same dtype, got {rows.dtype} and {cols.dtype}")
    if rows.device != cols.device:
        raise ValueError(f"rows and cols must be on the same device, got {rows.device} and {cols.device}")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    n_rows, n_cols = rows.shape[0], cols.shape[0]
    for name, idx in (("positive", positive), ("self_index", self_index)):
        if idx is None and name == "self_index":
            continue
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of column indices, got {type(idx).__name__}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an int64 (or int32) tensor of column indices, got {idx.dtype}")
        if idx.shape != (n_rows,):
            raise ValueError(f"{name} must have shape ({n_rows},) (one column index per row), got {tuple(idx.shape)}")
        if idx.device != rows.device:
            raise ValueError(f"{name} must be on {rows.device}, got {idx.device}")
    if not check_values:
        return
    lo, hi = int(positive.min()), int(positive.max())
    if lo < 0 or hi >= n_cols:
        raise IndexError(f"positive index out of range: values span [{lo}, {hi}] but there are {n_cols} columns")
    if self_index is not None:
        lo, hi = int(self_index.min()), int(self_index.max())
        if lo < -1 or hi >= n_cols:
            raise IndexError(f"self_index out of range: values span [{lo}, {hi}]; need -1 (none) or [0, {n_cols})")
        if bool((self_index == positive).any()):
            raise ValueError("a row's positive column equals its masked self column")


def info_nce_rows_cols_reference(rows: torch.Tensor, cols: torch.Tensor, positive: torch.Tensor,
                                 temperature: float = 0.1, *, self_index=None,
                                 upcast: bool = True, check_values: bool = True) -> torch.Tensor:
    """Rows/cols InfoNCE, materialising the R x C logits (the spec; see the comment above).

    With ``upcast`` the computation runs in fp32 (the oracle); without, in the input precision.
    """
    check_rows_cols(rows, cols, positive, temperature, self_index, check_values=check_values)
    if upcast:
        rows, cols = rows.float(), cols.float()
    r = F.normalize(rows, dim=1)
    c = F.normalize(cols, dim=1)
    logits = (r @ c.T) / temperature                           # (R, C)
    if self_index is not None:
        col = torch.arange(cols.shape[0], device=logits.device)
        logits = logits.masked_fill(self_index[:, None] == col[None, :], float("-inf"))  # -1: none
    return F.cross_entropy(logits, positive.long())


def simclr_indices(n: int, device=None, offset: int = 0, n_global=None):
    """(positive, self_index) of SimCLR rows [z1; z2] (2n rows) against cols [z1_g; z2_g].

    Single process: offset = 0, n_global = n. Distributed: the local 2n rows are rank r's
    [z1_r; z2_r], the columns are the gathered [z1_0..z1_{W-1}; z2_0..z2_{W-1}], offset = r * n.
    """
    n_global = n if n_global is None else n_global
    i = torch.arange(n, device=device, dtype=torch.int64) + offset
    self_index = torch.cat([i, i + n_global])
    positive = torch.cat([i + n_global, i])
    return positive, self_index
