"""Contrastive losses. ``info_nce`` is the public entry point; ``reference.py`` is the spec."""
import torch

from fastssl.losses.reference import check_views, nt_xent_reference

BACKENDS = ("torch",)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, *,
             backend: str = "torch") -> torch.Tensor:
    """SimCLR NT-Xent of two view batches (N, D): un-normalised projections in, scalar mean loss out."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown loss backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return nt_xent_reference(z1, z2, temperature)


__all__ = ["info_nce", "nt_xent_reference", "check_views", "BACKENDS"]
