"""Optimisers and learning-rate schedules."""
import torch

from fastssl.optim.lars import LARS, param_groups
from fastssl.optim.schedule import lr_at, scaled_lr

OPTIMIZERS = ("lars", "sgd", "adamw")
IMPLS = ("foreach", "reference", "apex")


def _check(optim_cfg, lr: float) -> None:
    """The settings every optimiser shares; the message names the key."""
    if optim_cfg.name not in OPTIMIZERS:
        raise ValueError(f"optim.name: unknown optimiser {optim_cfg.name!r}; choose one of {', '.join(OPTIMIZERS)}")
    impl = getattr(optim_cfg, "impl", "foreach")
    if impl not in IMPLS:
        raise ValueError(f"optim.impl: unknown implementation {impl!r}; choose one of {', '.join(IMPLS)}")
    if not lr >= 0:
        raise ValueError(f"optim.lr: the learning rate must be >= 0, got {lr}")
    if not 0.0 <= optim_cfg.momentum < 1.0:
        raise ValueError(f"optim.momentum: must lie in [0, 1), got {optim_cfg.momentum}")
    if not optim_cfg.weight_decay >= 0:
        raise ValueError(f"optim.weight_decay: must be >= 0, got {optim_cfg.weight_decay}")
    if optim_cfg.name == "lars" and not optim_cfg.trust_coefficient > 0:
        raise ValueError(f"optim.trust_coefficient: must be > 0, got {optim_cfg.trust_coefficient}")


def build_apex_lars(groups, optim_cfg, lr: float):
    """NVIDIA apex's LARC (trust ratio, no clipping) around its FusedSGD; apex must be installed.

    Differences from `LARS`: LARC applies the trust ratio to every group (including the excluded
    biases and norms; their weight decay is still 0) and computes it from the gradient before
    momentum, as `LARS` does.
    """
    try:
        from apex.optimizers import FusedSGD
        from apex.parallel import LARC
    except ImportError as exc:
        raise RuntimeError("optim.impl=apex: NVIDIA apex is not installed (pip install it from "
                           "https://github.com/NVIDIA/apex with its CUDA extensions), or use "
                           f"optim.impl=foreach ({type(exc).__name__}: {exc})") from exc
    base = FusedSGD(groups, lr=lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay)
    return LARC(base, trust_coefficient=optim_cfg.trust_coefficient, clip=False)


def build_optimizer(model: torch.nn.Module, optim_cfg, lr: float) -> torch.optim.Optimizer:
    """The optimiser named by `optim.name` in the implementation `optim.impl`, with biases/norms
    excluded as configured (no weight decay, and no trust ratio for LARS)."""
    _check(optim_cfg, lr)
    impl = getattr(optim_cfg, "impl", "foreach")
    groups = param_groups(model, optim_cfg.weight_decay, optim_cfg.exclude_bias_and_norm)
    if impl == "apex":
        if optim_cfg.name != "lars":
            raise ValueError(f"optim.impl=apex: only optim.name=lars has an apex implementation, "
                             f"not {optim_cfg.name!r}")
        return build_apex_lars(groups, optim_cfg, lr)
    foreach = impl == "foreach"
    if optim_cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay,
                    trust_coefficient=optim_cfg.trust_coefficient, foreach=foreach)
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.momentum, foreach=foreach)
    for group in groups:          # AdamW ignores `lars_exclude`; the excluded group has weight decay 0
        group.pop("lars_exclude")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=optim_cfg.weight_decay, foreach=foreach)


__all__ = ["IMPLS", "LARS", "OPTIMIZERS", "build_apex_lars", "build_optimizer", "lr_at", "param_groups",
           "scaled_lr"]
