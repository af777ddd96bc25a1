"""Public InfoNCE / NT-Xent API: functional forms, backend choice, the nn.Module wrapper.

Backends (all compute the same loss, fp32 result):
  "torch"   the reference (materialises the R x C logits; the spec),
  "chunked" the tiled algorithm in plain PyTorch (any device; O((R + C) D) memory),
  "triton"  the fused Triton kernels (CUDA; CPU only under TRITON_INTERPRET=1),
  "auto"    Triton on a CUDA device; elsewhere the reference while R x C is small
            (<= AUTO_REFERENCE_MAX_ELEMENTS), "chunked" beyond. Logged once per choice.
An explicit backend that cannot run raises; it never falls back silently.
"""
import logging
import os
from typing import Optional, Sequence

import torch
from torch import nn

from fastssl.losses import ops
from fastssl.losses.distributed import gather_with_grad, world_size
from fastssl.losses.reference import (check_rows_cols, check_views, info_nce_rows_cols_reference,
                                      nt_xent_reference, simclr_indices)

log = logging.getLogger("fastssl.losses")

BACKENDS = ("auto", "triton", "chunked", "torch")
# "auto" keeps the reference up to a 4096 x 4096 logit matrix (64 MiB per fp32 copy).
AUTO_REFERENCE_MAX_ELEMENTS = 4096 * 4096
_announced = set()


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _triton_problem(x: torch.Tensor) -> Optional[str]:
    """Why the Triton backend cannot run on ``x`` (None if it can)."""
    try:
        from fastssl.kernels import info_nce as kernels
    except Exception as e:  # noqa: BLE001 - report whatever stops the import
        return f"the Triton kernels cannot be imported ({type(e).__name__}: {e})"
    if x.is_cuda or kernels.INTERPRETED:
        return None
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return ("TRITON_INTERPRET=1 was set after fastssl.kernels.info_nce was imported; set it "
                "before the first import to run the kernels on the CPU")
    return (f"backend='triton' needs a CUDA tensor (got device {x.device}); on the CPU it runs "
            "only in Triton's interpreter (set TRITON_INTERPRET=1 before importing fastssl), "
            "or use backend='chunked'")


def resolve_backend(backend: str, x: torch.Tensor, n_rows: int, n_cols: int) -> str:
    """The concrete backend ("triton", "chunked" or "torch") for ``backend`` on inputs like ``x``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown loss backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "triton":
        problem = _triton_problem(x)
        if problem is not None:
            raise RuntimeError(problem)
        return backend
    if backend != "auto":
        return backend
    if x.is_cuda and _triton_problem(x) is None:
        choice, why = "triton", "CUDA tensor"
    elif n_rows * n_cols <= AUTO_REFERENCE_MAX_ELEMENTS:
        choice, why = "torch", f"{n_rows} x {n_cols} logits fit the reference (<= {AUTO_REFERENCE_MAX_ELEMENTS})"
    else:
        choice, why = "chunked", f"{n_rows} x {n_cols} logits are too many for the reference"
    if choice not in _announced and not _compiling():
        _announced.add(choice)
        log.info("info_nce backend='auto' chose %r on %s (%s)", choice, x.device.type, why)
    return choice


def _rows_cols(rows, cols, positive, self_index, temperature, backend, blocks):
    if backend == "torch":
        return info_nce_rows_cols_reference(rows, cols, positive, temperature, self_index=self_index,
                                            check_values=False)
    return ops.per_row_loss(backend, rows, cols, positive, self_index, temperature, blocks).mean()


def info_nce_rows_cols(rows: torch.Tensor, cols: torch.Tensor, positive: torch.Tensor,
                       temperature: float = 0.1, *, self_index: Optional[torch.Tensor] = None,
                       backend: str = "auto", blocks: Sequence[int] = (0, 0, 0)) -> torch.Tensor:
    """General InfoNCE: ``rows`` (R, D) queries against ``cols`` (C, D) candidates.

    ``positive`` (R,) int64: the column index of each row's positive. ``self_index`` (R,) int64 or
    None: a column to mask out of each row's softmax (its own embedding; -1 = none). Both sides
    are L2-normalised inside; returns the mean over rows of -log softmax(logits / t)[positive],
    as an fp32 scalar. Gradients flow to rows and cols. ``blocks`` = (rows, cols, D) tile sizes
    of the tiled backends (0 = default).
    """
    check = not (_compiling() or _capturing(rows))
    check_rows_cols(rows, cols, positive, temperature, self_index, check_values=check)
    chosen = resolve_backend(backend, rows, rows.shape[0], cols.shape[0])
    return _rows_cols(rows, cols, positive, self_index, temperature, chosen, blocks)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, *, gather="auto",
             backend: str = "auto", blocks: Sequence[int] = (0, 0, 0), group=None) -> torch.Tensor:
    """SimCLR NT-Xent of two view batches (N, D): un-normalised projections in, fp32 scalar out.

    ``gather``: "auto" (default) gathers every rank's embeddings (with gradient) when
    torch.distributed is initialised with more than one process; True/False force it. Gathered,
    each rank's loss is the mean over its own 2N rows against all 2N * W columns; the mean of the
    per-rank losses equals the single-process loss on the concatenated batch, and with DDP's
    gradient averaging the parameter gradients equal the single-process ones (see
    fastssl/losses/distributed.py). Every rank must use the same N.
    """
    check_views(z1, z2, temperature)
    if gather not in ("auto", True, False):
        raise ValueError(f"gather must be 'auto', True or False, got {gather!r}")
    n = z1.shape[0]
    w = world_size(group)
    if gather is True and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("gather=True needs an initialised torch.distributed process group")
    if w > 1 and gather in ("auto", True):
        rank = torch.distributed.get_rank(group)
        rows = torch.cat([z1, z2])
        cols = torch.cat([gather_with_grad(z1, group), gather_with_grad(z2, group)])
        positive, self_index = simclr_indices(n, z1.device, offset=rank * n, n_global=w * n)
        chosen = resolve_backend(backend, z1, 2 * n, 2 * n * w)
        return _rows_cols(rows, cols, positive, self_index, temperature, chosen, blocks)
    chosen = resolve_backend(backend, z1, 2 * n, 2 * n)
    if chosen == "torch":
        return nt_xent_reference(z1, z2, temperature)
    z = torch.cat([z1, z2])
    positive, self_index = simclr_indices(n, z1.device)
    # rows and cols are the same tensor: autograd adds the row and the column gradient.
    return ops.per_row_loss(chosen, z, z, positive, self_index, temperature, blocks).mean()


class InfoNCELoss(nn.Module):
    """``nn.Module`` form of :func:`info_nce` (SimCLR NT-Xent); ``forward(z1, z2)``.

    ``forward(rows, cols, positive, self_index=None)`` with ``rows_cols=True`` gives the general
    form (:func:`info_nce_rows_cols`, e.g. MoCo queries against keys + queue).
    """

    def __init__(self, temperature: float = 0.1, *, gather="auto", backend: str = "auto",
                 rows_cols: bool = False):
        super().__init__()
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown loss backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.temperature, self.gather, self.backend, self.rows_cols = float(temperature), gather, backend, rows_cols

    def forward(self, a, b, positive=None, self_index=None):
        if self.rows_cols:
            if positive is None:
                raise ValueError("rows_cols=True: forward(rows, cols, positive, self_index=None)")
            return info_nce_rows_cols(a, b, positive, self.temperature, self_index=self_index,
                                      backend=self.backend)
        return info_nce(a, b, self.temperature, gather=self.gather, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather={self.gather!r}, backend={self.backend!r}"
