"""Normalised mutual information (NMI) of two labelings, DeepCluster's measure of how much the
clusters change from one epoch to the next (and of how well they match the classes).

NMI(a, b) = I(a; b) / ((H(a) + H(b)) / 2), the arithmetic-mean normalisation (scikit-learn's
default), from the contingency table of the two labelings in float64. It is 1 for the same
partition under any relabelling and about 0 for independent ones. When both labelings put every
element in one cluster, I = H(a) = H(b) = 0; the partitions are identical, and NMI is defined as 1
there (as scikit-learn does). When only one of them is a single cluster, NMI is 0.
"""
import torch


def nmi(a: torch.Tensor, b: torch.Tensor) -> float:
    """NMI of two labelings: integer tensors of the same length n >= 1 (any label values)."""
    for name, t in (("a", a), ("b", b)):
        if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"nmi: {name} must be a 1-D integer tensor, got shape {tuple(t.shape)} "
                             f"and dtype {t.dtype}")
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"nmi: a and b must have the same non-zero length, got {a.numel()} and {b.numel()}")
    a_classes, a_index = torch.unique(a, return_inverse=True)
    b_classes, b_index = torch.unique(b.to(a.device), return_inverse=True)
    if len(a_classes) == len(b_classes) == 1:
        return 1.0
    ka, kb = len(a_classes), len(b_classes)
    joint = torch.bincount(a_index * kb + b_index, minlength=ka * kb).reshape(ka, kb).double() / a.numel()
    pa, pb = joint.sum(dim=1), joint.sum(dim=0)
    nonzero = joint > 0
    mutual = (joint[nonzero] * (joint[nonzero] / torch.outer(pa, pb)[nonzero]).log()).sum().clamp(min=0)
    h_a, h_b = -(pa * pa.log()).sum(), -(pb * pb.log()).sum()     # every marginal is > 0
    return float(mutual / ((h_a + h_b) / 2))
