"""Contrastive losses. ``info_nce`` is the public entry point; ``reference.py`` is the spec.

* ``info_nce(z1, z2, temperature, *, gather="auto", backend="auto")``: SimCLR NT-Xent;
* ``info_nce_rows_cols(rows, cols, positive, temperature, *, self_index=None, backend="auto")``:
  the general form (MoCo queries against keys + queue, distributed rows against gathered cols);
* ``InfoNCELoss``: the nn.Module wrapper;
* ``gather_with_grad``: all_gather that carries gradient back to the owning rank.
"""
from fastssl.losses.contrastive import (AUTO_REFERENCE_MAX_ELEMENTS, BACKENDS, InfoNCELoss, info_nce,
                                        info_nce_rows_cols, resolve_backend)
from fastssl.losses.distributed import gather_with_grad
from fastssl.losses.reference import (check_rows_cols, check_views, info_nce_rows_cols_reference,
                                      nt_xent_reference, simclr_indices)

__all__ = [
    "info_nce", "info_nce_rows_cols", "InfoNCELoss", "gather_with_grad", "resolve_backend",
    "nt_xent_reference", "info_nce_rows_cols_reference", "check_views", "check_rows_cols",
    "simclr_indices", "BACKENDS", "AUTO_REFERENCE_MAX_ELEMENTS",
]
