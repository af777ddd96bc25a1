"""The "fused" backend: drawn parameters -> one per-sample table -> the Triton passes.

Same semantics as the Kornia reference (``simclr.py`` docstring); the kernels and the pass
structure are described in ``kernels/augment.py``. This module resolves the draws into what
the kernels read (sampling coordinates, hue shift in radians, the position of contrast in each
sample's jitter order, blur slots) and checks that the Triton backend can run on the tensor's
device: CUDA, or the CPU under TRITON_INTERPRET=1 set before the first import. Anything else
is an error, never a silent switch to another backend.
"""
import math
import os
from typing import Dict

import torch

from fastssl.data.crops import crop_boxes

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IN_DTYPES = (torch.uint8, torch.float32, torch.bfloat16, torch.float16)


def _kernels(device: torch.device):
    try:
        from fastssl.kernels import augment as kernels   # lazy: importing triton is slow
    except Exception as e:  # noqa: BLE001 - report why, whatever it is
        raise RuntimeError(f"backend='fused' needs Triton ({type(e).__name__}: {e})") from e
    if device.type == "cuda" or kernels.INTERPRETED:
        return kernels
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 was set after fastssl.kernels.augment was imported; set it "
                           "before the first import to run the fused backend on the CPU")
    raise RuntimeError(f"backend='fused' needs a CUDA tensor (got device {device}); on the CPU it runs only "
                       "in Triton's interpreter (set TRITON_INTERPRET=1 before importing fastssl), or use "
                       "backend='kornia'")


def param_table(aug, params: Dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
    """(N, N_COLS) float32 CPU table, columns as ``kernels.augment.COL``; blur_slot -1 = no blur."""
    from fastssl.kernels.augment import COL, N_COLS
    p = {k: v.cpu() for k, v in params.items()}
    n, s = p["flip"].shape[0], aug.size
    if aug.crop:
        x0, y0, bw, bh = crop_boxes(p["crop"], height, width).unbind(1)
    else:
        x0, y0 = torch.zeros(n), torch.zeros(n)
        bw, bh = torch.full((n,), float(width)), torch.full((n,), float(height))
    t = torch.zeros(n, N_COLS)
    # output pixel k samples x0 + (k + 0.5) * bw / s - 0.5 (half-pixel centres), as the reference
    t[:, COL["x_scale"]], t[:, COL["x_off"]] = bw / s, x0 + 0.5 * bw / s - 0.5
    t[:, COL["y_scale"]], t[:, COL["y_off"]] = bh / s, y0 + 0.5 * bh / s - 0.5
    t[:, COL["flip"]] = p["flip"].float()
    t[:, COL["jitter"]] = p["jitter"].float()
    f = p["factors"].float()
    t[:, COL["factors"]:COL["factors"] + 3] = f[:, :3]
    t[:, COL["factors"] + 3] = f[:, 3] * 2 * math.pi          # the reference's radians, same rounding
    t[:, COL["order"]:COL["order"] + 4] = p["order"].float()
    t[:, COL["contrast_step"]] = (p["order"] == 1).float().argmax(1).float()
    t[:, COL["gray"]] = p["grayscale"].float()
    t[:, COL["blur_slot"]] = torch.where(p["blur"], p["blur"].long().cumsum(0) - 1, -1).float()
    t[:, COL["solarize"]] = p["solarize"].float()
    t[:, COL["sigma"]] = p["sigma"].float()
    return t


def apply_fused(aug, images: torch.Tensor, params: Dict[str, torch.Tensor], out_dtype: torch.dtype,
                channels_last: bool) -> torch.Tensor:
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype: the fused backend writes one of {OUT_DTYPES}, got {out_dtype}")
    if images.dtype not in IN_DTYPES:
        raise ValueError(f"images: the fused backend reads one of {IN_DTYPES}, got {images.dtype}")
    k = aug.blur_kernel_size
    if bool(params["blur"].any()) and k // 2 >= aug.size:
        raise ValueError(f"size: blur kernel {k} needs a view of at least {k // 2 + 1} pixels for reflect padding")
    kernels = _kernels(images.device)
    n, _, h, w = images.shape
    table = param_table(aug, params, h, w).to(images.device)
    blurred = params["blur"].cpu().nonzero().squeeze(1).to(images.device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(n, 3, aug.size, aug.size, device=images.device, dtype=out_dtype, memory_format=fmt)
    return kernels.fused_augment(images, table, blurred, aug.size, k, aug.mean, aug.std, out)
