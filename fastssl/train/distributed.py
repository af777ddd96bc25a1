"""Several processes, one per GPU (or CPU process with gloo), started by `torchrun`.

`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_distributed`
reads them and joins the process group (nccl on CUDA, gloo on CPU). Without them (a plain
`fastssl train`) everything here is a no-op and the run is single-process.

`train.batch_size` is the global batch, split evenly over the ranks; the loss gathers the
projections of all ranks (with gradient), and with `train.sync_bn` the batch-norm statistics
cover the global batch too. Parameter gradients then equal the single-process ones (DDP
averages the per-rank gradients of the per-rank losses, each a mean over its rows).
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_world() -> DistInfo:
    """(rank, world size, local rank) from torchrun's environment variables (defaults: one process)."""
    try:
        return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                        int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise RuntimeError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({exc})") from None


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when WORLD_SIZE > 1 (or use the one already initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    info = env_world()
    if info.world_size <= 1:
        return info
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={info.world_size} but {var} is not set; start with torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(minutes=30))
    info.initialised_here = True
    return info


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    """On CUDA with several processes, each process uses the GPU numbered by its LOCAL_RANK."""
    if device.type == "cuda" and info.enabled:
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return device


def cleanup(info: DistInfo) -> None:
    if info.initialised_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def gather_objects(obj, info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (a collective: every rank must call it)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_rows(rows: torch.Tensor, indices: torch.Tensor, n: int, info: DistInfo) -> torch.Tensor:
    """(n, D): every rank's `rows` placed at their dataset `indices`, on every rank (a collective;
    the ranks' shares may differ in size by one: they are padded to the same length to be gathered)."""
    out = rows.new_zeros(n, rows.shape[1])
    if not info.enabled:
        out[indices.to(rows.device)] = rows
        return out
    share = -(-n // info.world_size)
    pad = share - rows.shape[0]
    rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
    indices = torch.cat([indices.to(rows.device), torch.full((pad,), -1, dtype=torch.long, device=rows.device)])
    all_rows, all_indices = [torch.empty_like(rows) for _ in range(info.world_size)], \
        [torch.empty_like(indices) for _ in range(info.world_size)]
    dist.all_gather(all_rows, rows)
    dist.all_gather(all_indices, indices)
    all_rows, all_indices = torch.cat(all_rows), torch.cat(all_indices)
    real = all_indices >= 0
    out[all_indices[real]] = all_rows[real]
    return out


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, with gradient: every rank's output is the sum, so the gradient of the total
    objective (the sum of the ranks' losses) with respect to each input is the sum of the output gradients."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics cover every rank's batch, on any device (torch's
    SyncBatchNorm runs on GPUs only). Two-pass (mean, then the mean squared deviation), each an
    autograd-aware all_reduce; the state dict is that of an ordinary BatchNorm. Meant for CPU
    processes (gloo): it accumulates in float64."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        n = x.numel() // x.shape[1] * dist.get_world_size()     # every rank holds the same batch size
        # Statistics accumulated in float64 (this path serves CPU processes, where it costs little).
        x64 = x.double()
        mean = (all_reduce(x64.sum(dims)) / n).to(x.dtype)
        var = (all_reduce((x64 - mean.double().view(shape)).square().sum(dims)) / n).to(x.dtype)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(var.detach() * n / max(n - 1, 1), alpha=momentum)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """torch's SyncBatchNorm on CUDA; AllReduceBatchNorm elsewhere (CPU with gloo)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        out = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        out.load_state_dict(module.state_dict())
        if module.affine:      # the same parameter objects, as torch's conversion keeps them (frozen teachers stay frozen)
            out.weight, out.bias = module.weight, module.bias
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device))
    return out


__all__ = ["AllReduceBatchNorm", "DistInfo", "barrier", "cleanup", "convert_sync_batchnorm", "env_world",
           "init_distributed", "local_device"]
