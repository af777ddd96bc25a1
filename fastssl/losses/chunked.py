"""The "chunked" backend: the fused kernels' algorithm in plain PyTorch ops, for any device.

Same notation and spec as ``kernels/info_nce.py`` (see ``reference.info_nce_rows_cols_reference``).
Rows are processed in blocks of ``block_rows`` against columns in blocks of ``block_cols``:

* forward: per row block, an online log-sum-exp over the column blocks; only lse and the per-row
  loss (2R floats) are kept;
* backward: recompute each (block_rows x block_cols) logit tile from lse and accumulate the
  gradients of the normalised rows and columns; then the L2-normalisation's backward.

Peak extra memory: the normalised fp32 copies of rows and cols plus their gradients
(O((R + C) D)) and a few block_rows x block_cols tiles; never R x C. All arithmetic is fp32
whatever the input dtype (gradients are returned in the input dtype).

It is the second, independent implementation the Triton kernels are checked against at sizes
the reference cannot hold.
"""
import torch

DEFAULT_BLOCK_ROWS = 1024
DEFAULT_BLOCK_COLS = 4096


def _normalise(x: torch.Tensor):
    x = x.float()
    inv = torch.linalg.vector_norm(x, dim=1).clamp_min(1e-12).reciprocal()
    return x * inv[:, None], inv


def _fill_self_(tile: torch.Tensor, self_b, c0: int, value: float) -> None:
    """tile[i, self_b[i] - c0] = value where that column lies in this tile. O(rows) work via
    gather/scatter (no R x C comparison mask, no host sync)."""
    if self_b is None:
        return
    local = self_b - c0
    inside = (local >= 0) & (local < tile.shape[1])
    idx = local.clamp(0, tile.shape[1] - 1)[:, None]
    cur = tile.gather(1, idx)
    tile.scatter_(1, idx, torch.where(inside[:, None], torch.full_like(cur, value), cur))


@torch.no_grad()
def chunked_fwd(rows, cols, positive, self_index, temperature: float,
                block_rows: int = DEFAULT_BLOCK_ROWS, block_cols: int = DEFAULT_BLOCK_COLS):
    """Returns (loss_rows, lse), fp32 (R,) each."""
    u, _ = _normalise(rows)
    v = u if cols is rows else _normalise(cols)[0]
    n_rows, n_cols = u.shape[0], v.shape[0]
    inv_t = 1.0 / temperature
    # The positive logits: one O(R D) row-wise dot, not a pass over every tile.
    pos_logit = (u * v[positive]).sum(1).mul_(inv_t)
    lse = torch.empty(n_rows, device=u.device, dtype=torch.float32)
    for r0 in range(0, n_rows, block_rows):
        r1 = min(r0 + block_rows, n_rows)
        self_b = None if self_index is None else self_index[r0:r1]
        m = torch.full((r1 - r0,), float("-inf"), device=u.device)
        l_sum = torch.zeros(r1 - r0, device=u.device)
        for c0 in range(0, n_cols, block_cols):
            c1 = min(c0 + block_cols, n_cols)
            logits = (u[r0:r1] @ v[c0:c1].T).mul_(inv_t)
            _fill_self_(logits, self_b, c0, float("-inf"))
            m_new = torch.maximum(m, logits.amax(1))
            # rows whose every column so far is masked keep m = -inf; shift by 0 there (no nan)
            shift = torch.where(torch.isfinite(m_new), m_new, 0.0)
            l_sum = l_sum * torch.exp(m - shift) + logits.sub_(shift[:, None]).exp_().sum(1)
            m = m_new
        lse[r0:r1] = torch.where(torch.isfinite(m), m, 0.0) + torch.log(l_sum)
    return lse - pos_logit, lse


@torch.no_grad()
def chunked_bwd(grad_loss_rows, rows, cols, positive, self_index, lse, temperature: float,
                block_rows: int = DEFAULT_BLOCK_ROWS, block_cols: int = DEFAULT_BLOCK_COLS):
    """(d rows, d cols) in the input dtype, for an upstream gradient (R,) of the per-row loss."""
    same = cols is rows
    u, inv_r = _normalise(rows)
    v, inv_c = (u, inv_r) if same else _normalise(cols)
    n_rows, n_cols = u.shape[0], v.shape[0]
    inv_t = 1.0 / temperature
    coef = grad_loss_rows.float() * inv_t      # dL/dlogit_ij = g_i (softmax_ij - [j == pos_i])
    gu = torch.zeros_like(u)                   # dL/du (normalised rows)
    gv = torch.zeros_like(v)                   # dL/dv (normalised cols)
    for r0 in range(0, n_rows, block_rows):
        r1 = min(r0 + block_rows, n_rows)
        self_b = None if self_index is None else self_index[r0:r1]
        for c0 in range(0, n_cols, block_cols):
            c1 = min(c0 + block_cols, n_cols)
            p = (u[r0:r1] @ v[c0:c1].T).mul_(inv_t).sub_(lse[r0:r1, None]).exp_()   # softmax tile
            _fill_self_(p, self_b, c0, 0.0)
            p.mul_(coef[r0:r1, None])
            gu[r0:r1].addmm_(p, v[c0:c1])
            gv[c0:c1].addmm_(p.T, u[r0:r1])
    # The -[j == pos_i] part of dL/dlogit: O(R D), outside the tile loop.
    gu.sub_(coef[:, None] * v[positive])
    gv.index_add_(0, positive, coef[:, None] * u, alpha=-1.0)
    # Backward of u = x / ||x||: dx = (gu - u (u . gu)) / ||x||.
    d_rows = (gu - u * (u * gu).sum(1, keepdim=True)) * inv_r[:, None]
    d_cols = (gv - v * (v * gv).sum(1, keepdim=True)) * inv_c[:, None]
    return d_rows.to(rows.dtype), d_cols.to(cols.dtype)
