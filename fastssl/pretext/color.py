"""Colourisation helpers: CIE Lab, the quantised ab gamut, soft targets, rebalancing, decoding.

Zhang, Isola, Efros, "Colorful Image Colorization", ECCV 2016: predict a distribution over
quantised ab bins (grid 10) from L; soft-encode the target with the 5 nearest bins under a
Gaussian (sigma 5); reweight the loss by w ∝ ((1 - lam) * smoothed prior + lam / Q)^-1 with
E[w] = 1; decode with the annealed mean (T = 0.38).

Conventions: sRGB in [0, 1] with the standard gamma, D65 white, the sRGB -> XYZ matrix; L in
[0, 100], a/b roughly in [-110, 110]. Every function is batched and runs in float32 on the
input's device (half inputs are upcast).
"""
import functools

import torch
import torch.nn.functional as F

# sRGB (linear) -> XYZ, D65 (IEC 61966-2-1, as tabulated by Lindbloom); the inverse is computed in
# float64 so that the round trip is exact to float32 precision.
_M64 = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                     [0.2126729, 0.7151522, 0.0721750],
                     [0.0193339, 0.1191920, 0.9503041]], dtype=torch.float64)
_RGB_TO_XYZ, _XYZ_TO_RGB = _M64.float(), torch.linalg.inv(_M64).float()
WHITE_D65 = (0.95047, 1.0, 1.08883)
_DELTA = 6 / 29   # CIE f(t): cube root above delta^3, linear (matching slope and value) below


def _srgb_to_linear(c: torch.Tensor) -> torch.Tensor:
    # clamp inside the power branch only so that torch.where never sees NaN (nor its gradient)
    return torch.where(c <= 0.04045, c / 12.92, ((c.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(c: torch.Tensor) -> torch.Tensor:
    return torch.where(c <= 0.0031308, 12.92 * c, 1.055 * c.clamp_min(0.0031308) ** (1 / 2.4) - 0.055)


def _f(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > _DELTA ** 3, t.clamp_min(_DELTA ** 3) ** (1 / 3), t / (3 * _DELTA ** 2) + 4 / 29)


def _f_inv(f: torch.Tensor) -> torch.Tensor:
    return torch.where(f > _DELTA, f ** 3, 3 * _DELTA ** 2 * (f - 4 / 29))


def _white(device) -> torch.Tensor:
    return torch.tensor(WHITE_D65, device=device).view(1, 3, 1, 1)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) sRGB in [0, 1] -> (N, 3, H, W) float32 CIE Lab (D65)."""
    lin = _srgb_to_linear(rgb.float())
    xyz = torch.einsum("ij,njhw->nihw", _RGB_TO_XYZ.to(lin.device), lin) / _white(lin.device)
    fx, fy, fz = _f(xyz).unbind(1)                                        # each (N, H, W)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) CIE Lab -> (N, 3, H, W) float32 sRGB, clamped to [0, 1] (out-of-gamut Lab clips)."""
    L, a, b = lab.float().unbind(1)
    fy = (L + 16) / 116
    xyz = _f_inv(torch.stack([fy + a / 500, fy, fy - b / 200], dim=1)) * _white(lab.device)
    lin = torch.einsum("ij,njhw->nihw", _XYZ_TO_RGB.to(lab.device), xyz)
    return _linear_to_srgb(lin).clamp(0, 1)


@functools.lru_cache(maxsize=None)
def _gamut(grid: float) -> torch.Tensor:
    # Only the surface of the 256^3 cube is converted (6 x 256^2 colours, not 16.7M): Lab is a
    # homeomorphic image of the cube, and the vertical (L) line through any colour leaves the solid
    # through its surface at the same ab, so the surface hits every ab cell the whole solid does.
    # (All 256^3 colours give the same 268 cells at grid 10.)
    t = torch.arange(256) / 255.0
    u, v = (c.flatten() for c in torch.meshgrid(t, t, indexing="ij"))              # (65536,) each
    faces = [torch.stack([u, v][:axis] + [torch.full_like(u, side)] + [u, v][axis:])
             for axis in range(3) for side in (0.0, 1.0)]
    lab = rgb_to_lab(torch.cat(faces, dim=1).view(1, 3, -1, 1))                    # (1, 3, 393216, 1)
    cells = torch.floor(lab[0, 1:, :, 0] / grid).long()                          # (2, 393216)
    # one integer key per cell, counted: much faster than sorting rows with unique(dim=0)
    low = cells.min(dim=1, keepdim=True).values
    width = int(cells[1].max() - low[1]) + 1
    keys = torch.bincount((cells[0] - low[0]) * width + cells[1] - low[1]).nonzero().squeeze(1)
    return (torch.stack([keys // width, keys % width], dim=1) + low.T + 0.5).float() * grid


def ab_bins(grid: float = 10) -> torch.Tensor:
    """(Q, 2) centres of the grid x grid ab cells hit by some sRGB colour, sorted by (a, b).

    Cell of v: floor(v / grid); centre (floor(v / grid) + 0.5) * grid. Computed from the 256^3
    sRGB cube (cached). Grid 10 gives Q = 268, not the 313 of Zhang et al.: their bins, centred on
    multiples of 10, come from their own gamut estimate (centring ours that way gives about 261).
    """
    return _gamut(float(grid)).clone()


def _sq_dist(ab: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    # (N, 2, H, W), (Q, 2) -> (N, Q, H, W) squared distances; per-coordinate differences rather
    # than |x|^2 - 2x.c + |c|^2, which cancels badly at ab ~ 100.
    ab, bins = ab.float(), bins.to(ab.device, torch.float32)
    return ((ab[:, None, 0] - bins[None, :, 0, None, None]) ** 2
            + (ab[:, None, 1] - bins[None, :, 1, None, None]) ** 2)


def nearest_bin(ab: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """(N, 2, H, W) ab -> (N, H, W) long index of the nearest bin centre."""
    return _sq_dist(ab, bins).argmin(dim=1)


def encode_ab(ab: torch.Tensor, bins: torch.Tensor, neighbours: int = 5, sigma: float = 5.0) -> torch.Tensor:
    """(N, 2, H, W) ab -> (N, Q, H, W) soft target: the `neighbours` nearest bins, Gaussian weights summing to 1."""
    d2, idx = _sq_dist(ab, bins).topk(neighbours, dim=1, largest=False)   # (N, k, H, W), nearest first
    # shift by the nearest distance: same weights after normalising, but no underflow to 0/0 far
    # from the gamut
    w = torch.exp(-(d2 - d2[:, :1]) / (2 * sigma ** 2))
    target = torch.zeros(ab.shape[0], bins.shape[0], *ab.shape[2:], device=ab.device)
    return target.scatter_(1, idx, w / w.sum(dim=1, keepdim=True))


def bin_prior(targets: torch.Tensor, num_bins: int = None) -> torch.Tensor:
    """Empirical (Q,) bin distribution of a batch: soft (N, Q, H, W) targets (their argmax, the
    nearest bin) or hard (N, H, W) indices with `num_bins` given. Sums to 1."""
    if targets.dim() == 4:
        num_bins, targets = targets.shape[1], targets.argmax(dim=1)
    elif num_bins is None:
        raise ValueError("bin_prior: hard (N, H, W) indices need num_bins")
    counts = torch.bincount(targets.flatten(), minlength=num_bins).float()
    return counts / counts.sum()


def rebalance_weights(prior: torch.Tensor, lam: float = 0.5, sigma: float = 5.0,
                      bins: torch.Tensor = None) -> torch.Tensor:
    """(Q,) per-bin loss weights: w ∝ ((1 - lam) * smoothed + lam / Q)^-1 with sum(smoothed * w) == 1.

    `smoothed` is `prior` smoothed by a Gaussian (`sigma`, in ab units) between the bin centres
    (`bins`, default ab_bins(10)), renormalised to sum to 1.
    """
    bins = ab_bins() if bins is None else bins
    prior = prior.float()
    if prior.shape != (bins.shape[0],):
        raise ValueError(f"prior has shape {tuple(prior.shape)}, expected ({bins.shape[0]},) for these bins")
    centres = bins.to(prior.device, torch.float32)
    kernel = torch.exp(-torch.cdist(centres, centres) ** 2 / (2 * sigma ** 2))     # (Q, Q)
    # a local weighted average (rows normalised) rather than a plain convolution: bins on the gamut
    # edge have fewer neighbours, and a uniform prior must stay uniform
    smoothed = (kernel @ prior) / kernel.sum(dim=1)
    smoothed = smoothed / smoothed.sum()
    w = 1 / ((1 - lam) * smoothed + lam / prior.numel())
    return w / (smoothed * w).sum()


def decode_ab(logits: torch.Tensor, bins: torch.Tensor, temperature: float = 0.38) -> torch.Tensor:
    """(N, Q, H, W) logits -> (N, 2, H, W) ab, the annealed mean (T=1: the mean, T->0: the mode).

    exp(log z / T) renormalised is softmax(logits / T), since log z = logits - logsumexp.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    p = torch.softmax(logits.float() / temperature, dim=1)
    return torch.einsum("nqhw,qc->nchw", p, bins.to(p.device, torch.float32))


def colorize(L: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """L (N, 1, H, W) and ab (N, 2, h, w) -> (N, 3, H, W) sRGB; ab is resized bilinearly to H x W."""
    ab = ab.float()
    if ab.shape[-2:] != L.shape[-2:]:
        ab = F.interpolate(ab, size=L.shape[-2:], mode="bilinear", align_corners=False)
    return lab_to_rgb(torch.cat([L.float(), ab], dim=1))
