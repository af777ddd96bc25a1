"""Linear probe: a linear classifier on frozen features (computed once), cosine learning rate.

The features of the training and validation images (one centre view each, no augmentation) are
extracted once; they are standardised with the training set's mean and std, and an
`nn.Linear` is trained on them with SGD (momentum 0.9) for `epochs` epochs, the learning rate
following a cosine from `lr` to 0 over all steps. Reports top-1 and top-5 in percent.
"""
import math
from typing import Dict

import torch
import torch.nn.functional as F


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    hit = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return 100.0 * hit.float().mean().item()


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor, *,
                 epochs: int = 100, lr: float = 0.1, batch_size: int = 256, weight_decay: float = 0.0,
                 seed: int = 0, num_classes: int = None) -> Dict[str, float]:
    """{'top1', 'top5'} on the validation features, and {'train_top1'} on the training ones."""
    if train_f.shape[0] == 0:
        raise ValueError("the linear probe needs at least one training feature")
    num_classes = num_classes or int(max(train_y.max(), val_y.max())) + 1
    mean, std = train_f.mean(0, keepdim=True), train_f.std(0, keepdim=True).clamp(min=1e-6)
    train_f, val_f = (train_f - mean) / std, (val_f - mean) / std
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(train_f.shape[1], num_classes).to(train_f.device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    n = train_f.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(train_f.device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(head(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        val_logits, train_logits = head(val_f), head(train_f)
    return {"top1": topk_accuracy(val_logits, val_y, 1), "top5": topk_accuracy(val_logits, val_y, 5),
            "train_top1": topk_accuracy(train_logits, train_y, 1)}
