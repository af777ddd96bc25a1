"""Fused InfoNCE / NT-Xent Triton kernels (rows/cols form), forward and backward.

Spec: ``fastssl.losses.reference.info_nce_rows_cols_reference``. Notation: rows r_i (R x D),
cols c_j (C x D), a_i = 1/||r_i||, b_j = 1/||c_j||, logit_ij = a_i b_j (r_i . c_j) / t,
lse_i = logsumexp over unmasked j, loss_i = lse_i - logit_{i,pos_i}.

Flash-attention style tiling; no R x C tensor is ever allocated:

* forward (grid: row blocks): loop over column tiles, online max / sum-exp in fp32, pick up the
  positive logit on the way; store only lse_i and loss_i (2R floats).
* backward rows (grid: row blocks x D chunks) and backward cols (grid: col blocks x D chunks):
  recompute each logit tile from lse, dlogit_ij = g_i (softmax_ij - [j == pos_i]) (0 at the
  masked column), and accumulate the gradient. Two kernels, no atomics: deterministic.

L2-normalisation is fused: the launcher computes the inverse norms a, b (one cheap O((R+C)D)
reduction to R + C floats, no normalised copy); the kernels apply them to the fp32 dot products,
and the normalisation's backward is folded into the epilogue. With u_i = a_i r_i and
gu_i = dL/du_i = (1/t) sum_j dlogit_ij b_j c_j, the chain rule through u = r / ||r|| gives

    dL/dr_i = a_i (gu_i - u_i (u_i . gu_i)),   u_i . gu_i = sum_j dlogit_ij logit_ij,

so the only extra state is one running scalar per row (and per column in the column kernel).

Precision: inputs fp32/bf16/fp16, every accumulation fp32. For fp32 inputs tl.dot runs with
input_precision="tf32x3": the default tf32 would round the inputs to 10 mantissa bits, an error
(~1e-3 relative in each logit, times 1/t = 33 at t = 0.03) far above fp32 reference accuracy;
"ieee" is exact but runs on the CUDA cores, where Triton's FMA dot spills registers (on an H100,
2N = 4,096, D = 128: 138 ms forward + backward against eager PyTorch's 1.3 ms). tf32x3 splits
each operand into a tf32 head and a tf32 tail and adds three tensor-core products (head x head,
head x tail, tail x head); the dropped tail x tail term is ~2^-22 relative, and an emulation of
it in PyTorch gives losses as close to float64 as fp32 matmuls do.
In the backward the dlogit tile is cast to the input dtype for the tensor-core dot (as flash
attention does); it is scaled into [-1, 1] first (g / max|g|, normalised cols) so fp16 does not
underflow for huge R.

For D above one D tile the kernels loop over D for the dot products; the backward's output is
then split over D chunks (grid axis 1), which recomputes the logit tiles once per chunk.
"""
import os

import torch
import triton
import triton.language as tl

# triton.jit decides at decoration time (TRITON_INTERPRET=1) whether to compile or interpret;
# INTERPRETED (set below the kernels) records which, so the loss can refuse CPU tensors with a
# clear error instead of crashing inside Triton.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _logit_tile(R_ptr, C_ptr, offs_r, offs_c, r_in, c_in, dim, stride_r, stride_c, r_tile, c_tile,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                ONE_D_TILE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Raw dot products r_i . c_j of one (BLOCK_R, BLOCK_C) tile, fp32."""
    if ONE_D_TILE:
        a = r_tile
        b = c_tile
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        s = tl.dot(a, tl.trans(b), input_precision=PRECISION)
    else:
        s = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_in = offs_d < dim
            a = tl.load(R_ptr + offs_r[:, None] * stride_r + offs_d[None, :],
                        mask=r_in[:, None] & d_in[None, :], other=0.0)
            b = tl.load(C_ptr + offs_c[:, None] * stride_c + offs_d[None, :],
                        mask=c_in[:, None] & d_in[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            s = tl.dot(a, tl.trans(b), s, input_precision=PRECISION)
    return s


@triton.jit
def _fwd_kernel(R_ptr, C_ptr, POS_ptr, SELF_ptr, INV_R_ptr, INV_C_ptr, LOSS_ptr, LSE_ptr,
                n_rows, n_cols, dim, stride_r, stride_c, inv_t,
                HAS_SELF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_D: tl.constexpr, ONE_D_TILE: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_in = offs_r < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < dim
    row_scale = tl.load(INV_R_ptr + offs_r, mask=r_in, other=0.0) * inv_t
    pos = tl.load(POS_ptr + offs_r, mask=r_in, other=-1)
    if HAS_SELF:
        slf = tl.load(SELF_ptr + offs_r, mask=r_in, other=-1)
    r_tile = tl.zeros([BLOCK_R, BLOCK_D], dtype=R_ptr.dtype.element_ty)
    if ONE_D_TILE:
        r_tile = tl.load(R_ptr + offs_r[:, None] * stride_r + offs_d[None, :],
                         mask=r_in[:, None] & d_in[None, :], other=0.0)
    # finite "minus infinity" for the running max: a fully masked tile gives exp(-inf - m) = 0, not nan
    m_i = tl.zeros([BLOCK_R], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    pos_logit = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_in = offs_c < n_cols
        c_tile = tl.zeros([BLOCK_C, BLOCK_D], dtype=C_ptr.dtype.element_ty)
        if ONE_D_TILE:
            c_tile = tl.load(C_ptr + offs_c[:, None] * stride_c + offs_d[None, :],
                             mask=c_in[:, None] & d_in[None, :], other=0.0)
        s = _logit_tile(R_ptr, C_ptr, offs_r, offs_c, r_in, c_in, dim, stride_r, stride_c,
                        r_tile, c_tile, BLOCK_R, BLOCK_C, BLOCK_D, ONE_D_TILE, UPCAST, PRECISION)
        col_scale = tl.load(INV_C_ptr + offs_c, mask=c_in, other=0.0)
        logits = s * row_scale[:, None] * col_scale[None, :]
        is_pos = offs_c[None, :] == pos[:, None]
        pos_logit += tl.sum(tl.where(is_pos, logits, 0.0), axis=1)
        valid = c_in[None, :] & r_in[:, None]
        if HAS_SELF:
            valid = valid & (offs_c[None, :] != slf[:, None])
        logits = tl.where(valid, logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log(tl.where(r_in, l_i, 1.0))
    tl.store(LSE_ptr + offs_r, lse, mask=r_in)
    tl.store(LOSS_ptr + offs_r, lse - pos_logit, mask=r_in)


@triton.jit
def _dlogit_tile(s, offs_r, offs_c, r_in, c_in, row_scale, col_scale, lse, g, pos, slf,
                 HAS_SELF: tl.constexpr):
    """(logits, dlogits / max|g|) of one tile; both finite (0 outside the valid region)."""
    logits = s * row_scale[:, None] * col_scale[None, :]
    valid = c_in[None, :] & r_in[:, None]
    if HAS_SELF:
        valid = valid & (offs_c[None, :] != slf[:, None])
    p = tl.where(valid, tl.exp(logits - lse[:, None]), 0.0)
    onehot = tl.where(offs_c[None, :] == pos[:, None], 1.0, 0.0)
    dl = (p - onehot) * g[:, None]
    return logits, dl


@triton.jit
def _row_state(INV_R_ptr, POS_ptr, SELF_ptr, LSE_ptr, G_ptr, offs_r, r_in, HAS_SELF: tl.constexpr):
    """Per-row inputs of the backward: 1/||r_i||, positive and masked column, lse_i, upstream g_i."""
    inv_r = tl.load(INV_R_ptr + offs_r, mask=r_in, other=0.0)
    pos = tl.load(POS_ptr + offs_r, mask=r_in, other=-1)
    slf = pos          # unused without a mask; any value keeps the tuple's types fixed
    if HAS_SELF:
        slf = tl.load(SELF_ptr + offs_r, mask=r_in, other=-1)
    lse = tl.load(LSE_ptr + offs_r, mask=r_in, other=0.0)
    g = tl.load(G_ptr + offs_r, mask=r_in, other=0.0)
    return inv_r, pos, slf, lse, g


@triton.jit
def _bwd_rows_kernel(R_ptr, C_ptr, POS_ptr, SELF_ptr, INV_R_ptr, INV_C_ptr, LSE_ptr, G_ptr, GMAX_ptr,
                     DR_ptr, n_rows, n_cols, dim, stride_r, stride_c, stride_dr, inv_t,
                     HAS_SELF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_D: tl.constexpr, ONE_D_TILE: tl.constexpr, UPCAST: tl.constexpr,
                     PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_in = offs_r < n_rows
    offs_do = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)      # this program's output D chunk
    do_in = offs_do < dim
    inv_r, pos, slf, lse, g = _row_state(INV_R_ptr, POS_ptr, SELF_ptr, LSE_ptr, G_ptr, offs_r, r_in, HAS_SELF)
    row_scale = inv_r * inv_t
    r_tile = tl.zeros([BLOCK_R, BLOCK_D], dtype=R_ptr.dtype.element_ty)
    if ONE_D_TILE:
        r_tile = tl.load(R_ptr + offs_r[:, None] * stride_r + offs_do[None, :],
                         mask=r_in[:, None] & do_in[None, :], other=0.0)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    rowdot = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_in = offs_c < n_cols
        c_tile = tl.load(C_ptr + offs_c[:, None] * stride_c + offs_do[None, :],
                         mask=c_in[:, None] & do_in[None, :], other=0.0)
        s = _logit_tile(R_ptr, C_ptr, offs_r, offs_c, r_in, c_in, dim, stride_r, stride_c,
                        r_tile, c_tile, BLOCK_R, BLOCK_C, BLOCK_D, ONE_D_TILE, UPCAST, PRECISION)
        col_scale = tl.load(INV_C_ptr + offs_c, mask=c_in, other=0.0)
        logits, dl = _dlogit_tile(s, offs_r, offs_c, r_in, c_in, row_scale, col_scale, lse, g,
                                  pos, slf, HAS_SELF)
        rowdot += tl.sum(dl * logits, axis=1)
        c_unit = (c_tile.to(tl.float32) * col_scale[:, None]).to(C_ptr.dtype.element_ty)
        dl_in = dl.to(C_ptr.dtype.element_ty)
        if UPCAST:
            c_unit = c_unit.to(tl.float32)
            dl_in = dl_in.to(tl.float32)
        acc = tl.dot(dl_in, c_unit, acc, input_precision=PRECISION)
    r_out = tl.load(R_ptr + offs_r[:, None] * stride_r + offs_do[None, :],
                    mask=r_in[:, None] & do_in[None, :], other=0.0).to(tl.float32)
    gmax = tl.load(GMAX_ptr)
    dr = gmax * (row_scale[:, None] * acc - (inv_r * inv_r * rowdot)[:, None] * r_out)
    tl.store(DR_ptr + offs_r[:, None] * stride_dr + offs_do[None, :],
             dr.to(DR_ptr.dtype.element_ty), mask=r_in[:, None] & do_in[None, :])


@triton.jit
def _bwd_cols_kernel(R_ptr, C_ptr, POS_ptr, SELF_ptr, INV_R_ptr, INV_C_ptr, LSE_ptr, G_ptr, GMAX_ptr,
                     DC_ptr, n_rows, n_cols, dim, stride_r, stride_c, stride_dc, inv_t,
                     HAS_SELF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_D: tl.constexpr, ONE_D_TILE: tl.constexpr, UPCAST: tl.constexpr,
                     PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = offs_c < n_cols
    offs_do = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    do_in = offs_do < dim
    col_scale = tl.load(INV_C_ptr + offs_c, mask=c_in, other=0.0)
    c_tile = tl.zeros([BLOCK_C, BLOCK_D], dtype=C_ptr.dtype.element_ty)
    if ONE_D_TILE:
        c_tile = tl.load(C_ptr + offs_c[:, None] * stride_c + offs_do[None, :],
                         mask=c_in[:, None] & do_in[None, :], other=0.0)
    acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    coldot = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_in = offs_r < n_rows
        inv_r, pos, slf, lse, g = _row_state(INV_R_ptr, POS_ptr, SELF_ptr, LSE_ptr, G_ptr, offs_r, r_in,
                                             HAS_SELF)
        row_scale = inv_r * inv_t
        r_tile = tl.load(R_ptr + offs_r[:, None] * stride_r + offs_do[None, :],
                         mask=r_in[:, None] & do_in[None, :], other=0.0)
        s = _logit_tile(R_ptr, C_ptr, offs_r, offs_c, r_in, c_in, dim, stride_r, stride_c,
                        r_tile, c_tile, BLOCK_R, BLOCK_C, BLOCK_D, ONE_D_TILE, UPCAST, PRECISION)
        logits, dl = _dlogit_tile(s, offs_r, offs_c, r_in, c_in, row_scale, col_scale, lse, g,
                                  pos, slf, HAS_SELF)
        coldot += tl.sum(dl * logits, axis=0)
        r_unit = (r_tile.to(tl.float32) * inv_r[:, None]).to(R_ptr.dtype.element_ty)
        dl_in = dl.to(R_ptr.dtype.element_ty)
        if UPCAST:
            r_unit = r_unit.to(tl.float32)
            dl_in = dl_in.to(tl.float32)
        acc = tl.dot(tl.trans(dl_in), r_unit, acc, input_precision=PRECISION)
    c_out = tl.load(C_ptr + offs_c[:, None] * stride_c + offs_do[None, :],
                    mask=c_in[:, None] & do_in[None, :], other=0.0).to(tl.float32)
    gmax = tl.load(GMAX_ptr)
    dc = gmax * ((col_scale * inv_t)[:, None] * acc - (col_scale * col_scale * coldot)[:, None] * c_out)
    tl.store(DC_ptr + offs_c[:, None] * stride_dc + offs_do[None, :],
             dc.to(DC_ptr.dtype.element_ty), mask=c_in[:, None] & do_in[None, :])


INTERPRETED = not isinstance(_fwd_kernel, triton.runtime.JITFunction)


# ------------------------------------------------------------------------------------ launchers
def _inv_norm(x: torch.Tensor) -> torch.Tensor:
    """1 / max(||x_i||, 1e-12) in fp32, like F.normalize (R floats; no fp32 copy of x)."""
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).clamp_min(1e-12).reciprocal()


def _config(dim: int, dtype: torch.dtype, block_r=None, block_c=None, block_d=None) -> dict:
    """The kernels' tile sizes, flags and warps for rows of `dim` features in `dtype` (also what
    tests/test_losses.py compiles for sm_90 to count register spills)."""
    if block_d is None:
        block_d = max(16, min(triton.next_power_of_2(dim), 128 if dtype == torch.float32 else 256))
    # The interpreter's dot mishandles bf16 (stored as uint16); bf16 x bf16 products are exact in
    # fp32, so an fp32 dot of the upcast tile computes the same thing there.
    upcast = INTERPRETED and dtype == torch.bfloat16
    # fp32 operands: three tf32 tensor-core products (see the module docstring; the interpreter
    # computes every dot exactly); bf16/fp16 operands: the default (None), the flag only
    # concerns fp32 operands.
    precision = "tf32x3" if (dtype == torch.float32 or upcast) else None
    # Pipeline stages of the tile loads: fp32 tiles with three stages need 233,472 bytes of shared
    # memory in the column backward at D = 128, over the 232,448 an H100 block can have (the
    # kernel did not launch there); two need 198,656. bf16 tiles take at most 78 KB with three.
    stages = 2 if dtype == torch.float32 else 3
    return dict(BLOCK_R=block_r or 64, BLOCK_C=block_c or 64, BLOCK_D=block_d, ONE_D_TILE=block_d >= dim,
                UPCAST=upcast, PRECISION=precision, num_warps=4 if block_d <= 128 else 8, num_stages=stages)


def _prepare(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()


def _index(idx):
    """Index vectors as int64 (one dtype for the kernels' loads; R elements, cheap)."""
    return None if idx is None else idx.to(torch.int64)


def info_nce_fwd(rows, cols, positive, self_index, temperature: float,
                 block_r=None, block_c=None, block_d=None):
    """Returns (loss_rows, lse, inv_r, inv_c), each fp32: (R,), (R,), (R,), (C,)."""
    rows, cols = _prepare(rows), _prepare(cols)
    positive, self_index = _index(positive), _index(self_index)
    n_rows, dim = rows.shape
    n_cols = cols.shape[0]
    meta = _config(dim, rows.dtype, block_r, block_c, block_d)
    inv_r, inv_c = _inv_norm(rows), _inv_norm(cols)
    loss = torch.empty(n_rows, device=rows.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    has_self = self_index is not None
    slf = self_index if has_self else positive
    _fwd_kernel[(triton.cdiv(n_rows, meta["BLOCK_R"]),)](
        rows, cols, positive, slf, inv_r, inv_c, loss, lse,
        n_rows, n_cols, dim, rows.stride(0), cols.stride(0), 1.0 / temperature, HAS_SELF=has_self, **meta)
    return loss, lse, inv_r, inv_c


def info_nce_bwd(grad_loss_rows, rows, cols, positive, self_index, lse, inv_r, inv_c,
                 temperature: float, block_r=None, block_c=None, block_d=None):
    """Gradients (d rows, d cols) in the input dtype for upstream grad (R,) of the per-row loss."""
    rows, cols = _prepare(rows), _prepare(cols)
    positive, self_index = _index(positive), _index(self_index)
    n_rows, dim = rows.shape
    n_cols = cols.shape[0]
    meta = dict(_config(dim, rows.dtype, block_r, block_c, block_d), HAS_SELF=self_index is not None)
    g = grad_loss_rows.float()
    # Scale the upstream gradient into [-1, 1] (kept on device: no host sync, graph-capturable).
    gmax = g.abs().amax().reshape(1)
    g = g / gmax.clamp_min(torch.finfo(torch.float32).tiny)
    d_rows = torch.empty_like(rows)
    d_cols = torch.empty_like(cols)
    slf = self_index if meta["HAS_SELF"] else positive
    n_d = triton.cdiv(dim, meta["BLOCK_D"])
    _bwd_rows_kernel[(triton.cdiv(n_rows, meta["BLOCK_R"]), n_d)](
        rows, cols, positive, slf, inv_r, inv_c, lse, g, gmax, d_rows,
        n_rows, n_cols, dim, rows.stride(0), cols.stride(0), d_rows.stride(0), 1.0 / temperature, **meta)
    _bwd_cols_kernel[(triton.cdiv(n_cols, meta["BLOCK_C"]), n_d)](
        rows, cols, positive, slf, inv_r, inv_c, lse, g, gmax, d_cols,
        n_rows, n_cols, dim, rows.stride(0), cols.stride(0), d_cols.stride(0), 1.0 / temperature, **meta)
    return d_rows, d_cols
