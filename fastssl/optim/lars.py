"""LARS (You et al. 2017) as used by SimCLR and MoCo v3, and the parameter groups it needs.

Per parameter p with gradient g, weight decay wd, trust coefficient eta, momentum m, lr:
    u     = g + wd * p
    ratio = eta * |p| / |u|        (1 where |p| or |u| is 0)
    mu    = m * mu + ratio * u     (mu starts at zero)
    p     = p - lr * mu
Parameters in a group with `lars_exclude=True` (biases and normalisation weights, ndim <= 1) get
neither weight decay nor the trust ratio: u = g, ratio = 1 (plain SGD with momentum).

`LARS(..., foreach=True)` (the default) runs the update with multi-tensor `torch._foreach_*`
ops: a handful of kernel launches per (device, dtype) bucket instead of ~8 per parameter.
`foreach=False` is the per-parameter loop, kept as the reference. Both keep the momentum in
`state[p]["momentum_buffer"]`, so their state dicts are interchangeable.
"""
from collections import defaultdict
from typing import List

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    """Reference LARS: a plain loop over parameters, the formula above line by line."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, foreach: bool = True):
        if lr < 0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: momentum must lie in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"LARS: weight_decay must be >= 0, got {weight_decay}")
        if trust_coefficient <= 0:
            raise ValueError(f"LARS: trust_coefficient must be > 0, got {trust_coefficient}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, lars_exclude=False)
        super().__init__(params, defaults)
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.foreach:
            for group in self.param_groups:
                self._foreach_group(group)
        else:
            self._reference_step()
        return loss

    def _foreach_group(self, group) -> None:
        """The update for one parameter group with multi-tensor ops, per (device, dtype) bucket."""
        buckets = defaultdict(list)
        for p in group["params"]:
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                buckets[(p.device, p.dtype)].append(p)
        m, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        for params in buckets.values():
            grads = [p.grad for p in params]
            if group["lars_exclude"]:
                u = grads
            else:
                u = torch._foreach_add(grads, params, alpha=wd)
                p_norm = torch.stack(torch._foreach_norm(params))
                u_norm = torch.stack(torch._foreach_norm(u))
                ratio = torch.where((p_norm > 0) & (u_norm > 0), group["trust_coefficient"] * p_norm / u_norm,
                                    torch.ones_like(p_norm))
                torch._foreach_mul_(u, list(ratio.unbind(0)))
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, m)
            torch._foreach_add_(bufs, u)
            torch._foreach_add_(params, bufs, alpha=-lr)

    def _reference_step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                u = p.grad
                if not group["lars_exclude"]:
                    u = u.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(u)
                    ratio = torch.where((p_norm > 0) & (u_norm > 0),
                                        group["trust_coefficient"] * p_norm / u_norm, torch.ones_like(p_norm))
                    u = u * ratio
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                mu = state["momentum_buffer"]
                mu.mul_(group["momentum"]).add_(u)
                p.add_(mu, alpha=-group["lr"])


def param_groups(model: torch.nn.Module, weight_decay: float, exclude_bias_and_norm: bool = True) -> List[dict]:
    """Two groups: regular weights, and (when excluding) ndim <= 1 parameters with no decay and no trust ratio."""
    regular, excluded = [], []
    for p in model.parameters():
        if p.requires_grad:
            (excluded if exclude_bias_and_norm and p.ndim <= 1 else regular).append(p)
    groups = [{"params": regular, "weight_decay": weight_decay, "lars_exclude": False}]
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "lars_exclude": True})
    return groups
