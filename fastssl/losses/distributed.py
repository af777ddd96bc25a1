"""All-gather *with gradient*, for contrastive losses over the global batch.

HAZARD: ``torch.distributed.all_gather`` carries no gradient. Its outputs are fresh tensors with
no autograd history, so a loss over the gathered columns silently trains each rank only through
its own rows: the negatives from other ranks contribute nothing to the gradient, and the
gradients of the columns a rank owns (computed on every other rank) are dropped. The result
trains, but it is not the global-batch loss. ``gather_with_grad`` fixes that.

Forward: all_gather, concatenated in rank order (rank r's rows at [r*n, (r+1)*n)).
Backward: every rank holds dL_r/d(all columns); the owner of a slice needs the sum over ranks,
so the gradient is all-reduced (SUM) and each rank keeps its own slice.

Scaling convention (tested in tests/test_losses.py): with equal local batches, the global loss is
L = mean_r L_r (each rank's loss is the mean over its own rows). The gradient this gives on rank
r is sum_r' dL_r'/dz_r = W * dL/dz_r (W = world size). DDP then *averages* parameter gradients
over ranks, which divides by W again: the parameter gradients equal the single-process gradients
of the global-batch loss. (Without DDP, divide by W yourself, or all-reduce-average as DDP does.)
"""
import torch
import torch.distributed as dist


def world_size(group=None) -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def rank(group=None) -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group)
    return 0


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.n = x.shape[0]
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, x, group=group)
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


@torch.compiler.disable   # collectives + autograd.Function: a clean graph break under compile
def gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks, with gradient flowing back.

    Every rank must pass the same shape. A no-op without an initialised process group.
    """
    if world_size(group) == 1:
        return x
    return _GatherWithGrad.apply(x, group)
