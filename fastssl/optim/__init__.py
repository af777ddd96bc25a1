"""Optimisers and learning-rate schedules."""
import torch

from fastssl.optim.lars import LARS, param_groups
from fastssl.optim.schedule import lr_at, scaled_lr

OPTIMIZERS = ("lars", "sgd")


def build_optimizer(model: torch.nn.Module, optim_cfg, lr: float) -> torch.optim.Optimizer:
    """The optimiser named by `optim.name`, with biases/norms excluded as configured."""
    groups = param_groups(model, optim_cfg.weight_decay, optim_cfg.exclude_bias_and_norm)
    if optim_cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay,
                    trust_coefficient=optim_cfg.trust_coefficient)
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.momentum)
    raise ValueError(f"optim.name: unknown optimiser {optim_cfg.name!r}; choose one of {', '.join(OPTIMIZERS)}")


__all__ = ["LARS", "OPTIMIZERS", "build_optimizer", "lr_at", "param_groups", "scaled_lr"]
