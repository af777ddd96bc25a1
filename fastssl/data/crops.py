"""RandomResizedCrop parameters, in one place for the loaders and the GPU augmentation.

A crop is drawn as four numbers independent of the image size: an area fraction `scale`, a
log aspect ratio `log_ratio` (width / height), and the box position `u, v` in [0, 1] within the
room left over. `crop_box` resolves them for an H x W image: the box has area scale*H*W and
aspect exp(log_ratio), clamped to the image (where torchvision would retry up to 10 times and
then fall back to a centre crop, we clamp: the distribution of the in-range draws is the same).
"""
import math
from typing import List, Sequence, Tuple

import torch


def sample_crop_params(n: int, scale: Sequence[float], ratio: Sequence[float],
                       generator: torch.Generator = None) -> torch.Tensor:
    """(n, 4) float32 tensor of [scale, log_ratio, u, v] per crop."""
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    return crop_params(torch.rand(n, 4, generator=generator), scale[0], scale[1] - scale[0], lo, hi - lo)


def crop_params(u: torch.Tensor, scale_lo, scale_span, log_ratio_lo, log_ratio_span) -> torch.Tensor:
    """[scale, log_ratio, u, v] rows from (n, 4) uniform draws `u`: the first two draws mapped
    onto their ranges (numbers, or (n,) tensors of one range per row)."""
    return torch.stack([scale_lo + scale_span * u[:, 0], log_ratio_lo + log_ratio_span * u[:, 1],
                        u[:, 2], u[:, 3]], dim=1)


def crop_boxes(params: torch.Tensor, height, width) -> torch.Tensor:
    """(n, 4) boxes [x0, y0, w, h] in pixels (float) for images of the given size(s).

    `height` and `width` are ints or (n,) tensors (images of different sizes in one batch).
    """
    height = torch.as_tensor(height, dtype=torch.float32)
    width = torch.as_tensor(width, dtype=torch.float32)
    area = params[:, 0] * height * width
    ratio = params[:, 1].exp()
    w = torch.minimum(torch.sqrt(area * ratio), width).clamp(min=1.0)
    h = torch.minimum(torch.sqrt(area / ratio), height).clamp(min=1.0)
    x0 = params[:, 2] * (width - w)
    y0 = params[:, 3] * (height - h)
    return torch.stack([x0, y0, w, h], dim=1)


def crop_box_pixels(box: Sequence[float]) -> Tuple[int, int, int, int]:
    """Round a float box to the integer (left, top, right, bottom) that PIL crops with."""
    x0, y0, w, h = (float(v) for v in box)
    left, top = int(round(x0)), int(round(y0))
    return left, top, left + max(1, int(round(w))), top + max(1, int(round(h)))


def view_boxes(views, height: int, width: int, generator: torch.Generator) -> List[Tuple[int, int, int, int]]:
    """The pixel boxes (left, top, right, bottom) of one H x W image's views (each with `.scale`
    and `.ratio`): sample_crop_params, crop_boxes and crop_box_pixels view after view, from the
    same draws, computed for all the views at once (a loader worker's cost per image: a few tensor
    operations instead of some twenty per view)."""
    log_ratios = [(math.log(v.ratio[0]), math.log(v.ratio[1])) for v in views]

    def per_view(values):      # float32, as sample_crop_params' Python numbers become in its arithmetic
        return torch.tensor(values, dtype=torch.float32)

    params = crop_params(torch.rand(len(views), 4, generator=generator),
                         per_view([v.scale[0] for v in views]), per_view([v.scale[1] - v.scale[0] for v in views]),
                         per_view([lo for lo, _ in log_ratios]), per_view([hi - lo for lo, hi in log_ratios]))
    return [crop_box_pixels(box) for box in crop_boxes(params, height, width).tolist()]
