"""Autograd + torch.compile plumbing for the tiled backends.

Each backend is a pair of ``torch.library`` custom ops (forward, backward) joined with
``register_autograd``. The forward returns the per-row losses (R,) and the statistics the
backward needs (lse, and for Triton the inverse norms); the backward recomputes the logit tiles
from them. Being custom ops, they are opaque to torch.compile (no graph break, no tracing into
Python loops or Triton launches) and have fake (meta) implementations for shape propagation.

The gradient of the per-row loss is a vector g (R,), so any reduction of the per-row losses
(mean, sum, weights) differentiates correctly; rows and cols get separate gradients, and when
they are the same tensor (SimCLR) autograd sums the two.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastssl.losses.chunked import DEFAULT_BLOCK_COLS, DEFAULT_BLOCK_ROWS, chunked_bwd, chunked_fwd


def _kernels():
    from fastssl.kernels import info_nce as kernels   # lazy: importing triton is slow
    return kernels


def _opt(v: int):
    return None if v <= 0 else v


def _no_autocast(fn):
    """The ops fix their own precision (fp32 accumulation); an enclosing autocast region must not
    recast the matmuls inside them to bf16/fp16."""
    def wrapped(rows, *args):
        with torch.autocast(rows.device.type, enabled=False):
            return fn(rows, *args)
    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


# ----------------------------------------------------------------------------------- chunked
@torch.library.custom_op("fastssl::info_nce_chunked_fwd", mutates_args=())
def info_nce_chunked_fwd(rows: Tensor, cols: Tensor, positive: Tensor, self_index: Optional[Tensor],
                         temperature: float, block_rows: int, block_cols: int) -> Tuple[Tensor, Tensor]:
    return _no_autocast(chunked_fwd)(rows, cols, positive, self_index, temperature,
                       block_rows or DEFAULT_BLOCK_ROWS, block_cols or DEFAULT_BLOCK_COLS)


@info_nce_chunked_fwd.register_fake
def _(rows, cols, positive, self_index, temperature, block_rows, block_cols):
    r = rows.new_empty(rows.shape[0], dtype=torch.float32)
    return r, torch.empty_like(r)


@torch.library.custom_op("fastssl::info_nce_chunked_bwd", mutates_args=())
def info_nce_chunked_bwd(grad: Tensor, rows: Tensor, cols: Tensor, positive: Tensor,
                         self_index: Optional[Tensor], lse: Tensor, temperature: float,
                         block_rows: int, block_cols: int) -> Tuple[Tensor, Tensor]:
    return _no_autocast(chunked_bwd)(grad, rows, cols, positive, self_index, lse, temperature,
                       block_rows or DEFAULT_BLOCK_ROWS, block_cols or DEFAULT_BLOCK_COLS)


@info_nce_chunked_bwd.register_fake
def _(grad, rows, cols, positive, self_index, lse, temperature, block_rows, block_cols):
    return torch.empty_like(rows), torch.empty_like(cols)


def _chunked_setup(ctx, inputs, output):
    rows, cols, positive, self_index, temperature, block_rows, block_cols = inputs
    ctx.save_for_backward(rows, cols, positive, self_index, output[1])
    ctx.args = (temperature, block_rows, block_cols)


def _chunked_backward(ctx, grad_loss, grad_lse):
    rows, cols, positive, self_index, lse = ctx.saved_tensors
    temperature, block_rows, block_cols = ctx.args
    d_rows, d_cols = info_nce_chunked_bwd(grad_loss, rows, cols, positive, self_index, lse,
                                          temperature, block_rows, block_cols)
    return d_rows, d_cols, None, None, None, None, None


info_nce_chunked_fwd.register_autograd(_chunked_backward, setup_context=_chunked_setup)


# ------------------------------------------------------------------------------------ triton
@torch.library.custom_op("fastssl::info_nce_triton_fwd", mutates_args=())
def info_nce_triton_fwd(rows: Tensor, cols: Tensor, positive: Tensor, self_index: Optional[Tensor],
                        temperature: float, block_r: int, block_c: int,
                        block_d: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _no_autocast(_kernels().info_nce_fwd)(rows, cols, positive, self_index, temperature,
                                   _opt(block_r), _opt(block_c), _opt(block_d))


@info_nce_triton_fwd.register_fake
def _(rows, cols, positive, self_index, temperature, block_r, block_c, block_d):
    r = rows.new_empty(rows.shape[0], dtype=torch.float32)
    return r, torch.empty_like(r), torch.empty_like(r), cols.new_empty(cols.shape[0], dtype=torch.float32)


@torch.library.custom_op("fastssl::info_nce_triton_bwd", mutates_args=())
def info_nce_triton_bwd(grad: Tensor, rows: Tensor, cols: Tensor, positive: Tensor,
                        self_index: Optional[Tensor], lse: Tensor, inv_r: Tensor, inv_c: Tensor,
                        temperature: float, block_r: int, block_c: int,
                        block_d: int) -> Tuple[Tensor, Tensor]:
    return _no_autocast(_kernels().info_nce_bwd)(grad, rows, cols, positive, self_index, lse, inv_r, inv_c,
                                   temperature, _opt(block_r), _opt(block_c), _opt(block_d))


@info_nce_triton_bwd.register_fake
def _(grad, rows, cols, positive, self_index, lse, inv_r, inv_c, temperature, block_r, block_c, block_d):
    return torch.empty_like(rows), torch.empty_like(cols)


def _triton_setup(ctx, inputs, output):
    rows, cols, positive, self_index, temperature, block_r, block_c, block_d = inputs
    _, lse, inv_r, inv_c = output
    ctx.save_for_backward(rows, cols, positive, self_index, lse, inv_r, inv_c)
    ctx.args = (temperature, block_r, block_c, block_d)


def _triton_backward(ctx, grad_loss, grad_lse, grad_inv_r, grad_inv_c):
    rows, cols, positive, self_index, lse, inv_r, inv_c = ctx.saved_tensors
    temperature, block_r, block_c, block_d = ctx.args
    d_rows, d_cols = info_nce_triton_bwd(grad_loss, rows, cols, positive, self_index, lse, inv_r,
                                         inv_c, temperature, block_r, block_c, block_d)
    return d_rows, d_cols, None, None, None, None, None, None


info_nce_triton_fwd.register_autograd(_triton_backward, setup_context=_triton_setup)


def per_row_loss(backend: str, rows: Tensor, cols: Tensor, positive: Tensor,
                 self_index: Optional[Tensor], temperature: float, blocks=(0, 0, 0)) -> Tensor:
    """Per-row InfoNCE losses (R,) in fp32 through the tiled backend ``backend``."""
    if backend == "chunked":
        return info_nce_chunked_fwd(rows, cols, positive, self_index, float(temperature),
                                    int(blocks[0]), int(blocks[1]))[0]
    if backend == "triton":
        return info_nce_triton_fwd(rows, cols, positive, self_index, float(temperature),
                                   int(blocks[0]), int(blocks[1]), int(blocks[2]))[0]
    raise ValueError(f"no tiled backend {backend!r}")
