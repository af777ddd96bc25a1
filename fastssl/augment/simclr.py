"""The SimCLR augmentation recipe on batched tensors: sample parameters, then apply them.

Recipe (Chen et al. 2020, Appendix A): RandomResizedCrop, horizontal flip, colour jitter
(brightness, contrast, saturation 0.8s, hue 0.2s) with p=0.8 in a random order per sample,
grayscale with p=0.2, Gaussian blur (kernel ~10% of the view, sigma 0.1-2), optional
solarisation, then normalisation with the dataset mean/std.

`sample(n, generator)` draws every random choice as tensors; `apply(images, params)` is a pure
function of images and parameters, so one draw can be replayed through any backend:
"kornia" (this file, the reference) or "fused" (Triton kernels, kernels/augment.py, dispatched
by fused.py). Several views with their own settings (BYOL, multi-crop): multiview.py.

Semantics every backend must share:
- Images are uint8 (N, 3, H, W) or float in [0, 1]; the output is float, normalised.
- Crop + resize: bilinear with half-pixel centres (align_corners=False), coordinates clamped at
  the border, **no antialiasing** (a large crop shrunk a lot aliases, as with
  `F.interpolate(antialias=False)`).
- Colour jitter follows torchvision's definitions: brightness blends with black, contrast with
  the image's mean gray level, saturation with its grayscale (ITU-R 601-2 luma), hue rotates H in
  HSV by factor x 360 degrees; every step clamps to [0, 1].
- Blur: separable Gaussian, reflect padding; solarise: x >= 0.5 -> 1 - x.
"""
import math
from dataclasses import dataclass
from typing import Dict, Sequence

import kornia
import torch

from fastssl.data.crops import crop_boxes, sample_crop_params

BACKENDS = ("kornia", "fused")
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
LUMA = (0.2989, 0.587, 0.114)   # torchvision's rgb_to_grayscale weights


class AugmentConfigError(ValueError):
    """A bad augmentation setting; the message names the field."""


@dataclass
class SimCLRAugment:
    size: int = 224
    crop_scale: Sequence[float] = (0.08, 1.0)
    crop_ratio: Sequence[float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_strength: float = 1.0
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: Sequence[float] = (0.1, 2.0)
    solarize_p: float = 0.0
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)
    crop: bool = True
    """False when the loader already cut the random crops: views are only resized to `size`."""

    def __post_init__(self):
        if not (isinstance(self.size, int) and self.size > 0):
            raise AugmentConfigError(f"size: must be a positive integer, got {self.size!r}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise AugmentConfigError(f"{name}: a probability must lie in [0, 1], got {getattr(self, name)!r}")
        if self.jitter_strength < 0:
            raise AugmentConfigError(f"jitter_strength: must be >= 0, got {self.jitter_strength!r}")
        for name in ("crop_scale", "crop_ratio", "blur_sigma"):
            low_high = getattr(self, name)
            if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1]:
                raise AugmentConfigError(f"{name}: expected (min, max) with 0 < min <= max, got {low_high!r}")
        if self.crop_scale[1] > 1:
            raise AugmentConfigError(f"crop_scale: the area fraction cannot exceed 1, got {self.crop_scale!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise AugmentConfigError(f"mean/std: need 3 values each and std > 0, got {self.mean!r} / {self.std!r}")

    @property
    def blur_kernel_size(self) -> int:
        """Odd kernel of about 10% of the view side (SimCLR), at least 3."""
        return max(3, int(0.1 * self.size) // 2 * 2 + 1)

    def sample(self, batch_size: int, generator: torch.Generator = None) -> Dict[str, torch.Tensor]:
        """Draw every random choice for `batch_size` images (CPU tensors)."""
        n, g, s = batch_size, generator, self.jitter_strength

        def coin(p):
            return torch.rand(n, generator=g) < p

        def uniform(low, high, *shape):
            return low + (high - low) * torch.rand(n, *shape, generator=g)

        return {
            "crop": sample_crop_params(n, self.crop_scale, self.crop_ratio, g),
            "flip": coin(self.flip_p),
            "jitter": coin(self.jitter_p),
            # brightness, contrast, saturation factors in [max(0, 1-0.8s), 1+0.8s]; hue in [-0.2s, 0.2s]
            "factors": torch.cat([uniform(max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, 3),
                                  uniform(-min(0.2 * s, 0.5), min(0.2 * s, 0.5), 1)], dim=1),
            "order": torch.argsort(torch.rand(n, 4, generator=g), dim=1),
            "grayscale": coin(self.grayscale_p),
            "blur": coin(self.blur_p),
            "sigma": uniform(self.blur_sigma[0], self.blur_sigma[1]),
            "solarize": coin(self.solarize_p),
        }

    def apply(self, images: torch.Tensor, params: Dict[str, torch.Tensor], backend: str = "kornia",
              out_dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
        """Apply drawn `params` to (N, 3, H, W) images; returns normalised (N, 3, size, size).

        backend: "kornia" (the reference) or "fused" (Triton kernels, see fastssl/augment/fused.py).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
        if images.shape[2] < 1 or images.shape[3] < 1:
            raise ValueError(f"images must be at least 1x1 pixels, got {images.shape[2]}x{images.shape[3]}")
        if images.shape[0] != params["flip"].shape[0]:
            raise ValueError(f"{images.shape[0]} images but parameters for {params['flip'].shape[0]}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown augmentation backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
        if backend == "fused":
            from fastssl.augment.fused import apply_fused
            return apply_fused(self, images, params, out_dtype, channels_last)
        p = {k: v.to(images.device) for k, v in params.items()}
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = self._crop_resize(x, p["crop"])
        x = torch.where(p["flip"][:, None, None, None], x.flip(-1), x)
        x = color_jitter(x, p["factors"], p["order"], p["jitter"])
        x = torch.where(p["grayscale"][:, None, None, None], grayscale(x).expand_as(x), x)
        x = self._blur(x, p["sigma"], p["blur"])
        x = torch.where(p["solarize"][:, None, None, None] & (x >= 0.5), 1.0 - x, x)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return normalize(x, self.mean, self.std).to(out_dtype).contiguous(memory_format=fmt)

    def __call__(self, images: torch.Tensor, generator: torch.Generator = None, backend: str = "kornia") -> torch.Tensor:
        return self.apply(images, self.sample(images.shape[0], generator), backend=backend)

    def _crop_resize(self, x: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        s = self.size
        if not self.crop:
            if (h, w) == (s, s):
                return x
            boxes = torch.tensor([[0.0, 0.0, w, h]], device=x.device).expand(n, 4)
        else:
            boxes = crop_boxes(crop.cpu(), h, w).to(x.device)
        # Half-pixel centres: output pixel k samples x0 + (k + 0.5) * bw / s - 0.5. Kornia's
        # crop_and_resize (align_corners=True) samples linearly between the first and last
        # point we hand it, so we hand it exactly those two sample positions.
        x0, y0, bw, bh = boxes.unbind(1)
        left, right = x0 + 0.5 * bw / s - 0.5, x0 + (s - 0.5) * bw / s - 0.5
        top, bottom = y0 + 0.5 * bh / s - 0.5, y0 + (s - 0.5) * bh / s - 0.5
        corners = torch.stack([torch.stack([left, top], 1), torch.stack([right, top], 1),
                               torch.stack([right, bottom], 1), torch.stack([left, bottom], 1)], dim=1)
        return kornia.geometry.transform.crop_and_resize(x, corners, (s, s), mode="bilinear",
                                                         padding_mode="border", align_corners=True)

    def _blur(self, x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
        if not bool(apply.any()):
            return x
        idx = apply.nonzero().squeeze(1)
        k = self.blur_kernel_size
        sig = sigma[idx].float()[:, None].expand(-1, 2).contiguous()
        blurred = kornia.filters.gaussian_blur2d(x[idx], (k, k), sig, border_type="reflect")
        return x.index_copy(0, idx, blurred)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (or [0, 1] float) (N, 3, H, W) -> float32 (x - mean) / std: the last step of every view."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma, torchvision's weights."""
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """torchvision ColorJitter with per-sample factors (N, 4) and per-sample op order (N, 4)."""
    for step in range(4):
        for op in range(4):
            idx = (apply & (order[:, step] == op)).nonzero().squeeze(1)
            if idx.numel():
                x = x.index_copy(0, idx, _jitter_op(op, x[idx], factors[idx, op].float()))
    return x


def _jitter_op(op: int, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f4 = f.view(-1, 1, 1, 1)
    if JITTER_OPS[op] == "brightness":
        return (x * f4).clamp(0, 1)
    if JITTER_OPS[op] == "contrast":
        mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        return (f4 * x + (1 - f4) * mean).clamp(0, 1)
    if JITTER_OPS[op] == "saturation":
        return (f4 * x + (1 - f4) * grayscale(x)).clamp(0, 1)
    # hue: Kornia works in radians on H in [0, 2pi); torchvision's factor is a fraction of the turn.
    hsv = kornia.color.rgb_to_hsv(x)
    return kornia.color.hsv_to_rgb(kornia.enhance.adjust_hue_raw(hsv, f * 2 * math.pi)).clamp(0, 1)
