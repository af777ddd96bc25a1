"""Learning rate as a pure function of the step: batch-size scaling, linear warm-up, cosine decay."""
import math


def scaled_lr(base_lr: float, batch_size: int, rule: str) -> float:
    """`linear`: base x batch/256 (SimCLR: 0.3); `sqrt`: base x sqrt(batch) (SimCLR: 0.075); `none`."""
    if rule == "linear":
        return base_lr * batch_size / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size)
    if rule == "none":
        return base_lr
    raise ValueError(f"optim.lr_scaling: unknown rule {rule!r}; choose linear, sqrt or none")


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from peak/warmup to peak over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
