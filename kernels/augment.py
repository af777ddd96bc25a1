"""Fused per-sample augmentation kernels (the "fused" backend of fastssl.augment).

Spec: ``fastssl.augment.simclr.SimCLRAugment.apply(backend="kornia")`` and the semantics in that
module's docstring. Op order per sample: crop/resize -> flip -> colour jitter (brightness,
contrast, saturation, hue in the sample's drawn order) -> grayscale -> blur -> solarise ->
normalise. Every sample's parameters are one row of a float32 table (columns: `COL` below),
built by ``fastssl.augment.fused``; grid axis 0 is the sample, axis 1 a tile of output pixels.

Passes (each reads its input once; no full-size float copy for samples without blur):

1. ``_contrast_stats_kernel``: contrast blends with the image's mean gray level *at the moment
   contrast runs*, i.e. after the jitter ops drawn before it. The pass recomputes, per pixel,
   crop/resize and those earlier ops (pointwise, cheap) and writes per-tile partial sums of the
   luma; the launcher sums the few tiles per sample (deterministic, no atomics).
2. ``_main_kernel``: everything up to grayscale; then, for samples without blur, solarise +
   normalise + the store (any dtype, any output strides: channels_last included); samples
   with blur go to an fp32 scratch plane instead.
3. ``_blur_kernel`` twice (only over blurred samples): horizontal then vertical separable
   Gaussian with reflect padding (kornia's kernel: exp(-d^2 / 2 sigma^2), normalised); the
   vertical pass finishes with solarise + normalise + the store.

All arithmetic is fp32; only the final store rounds to the output dtype. Divisions use
``tl.math.div_rn`` (IEEE round-to-nearest, as torch on the CPU) so that e.g. uint8 / 255 and the
normalisation reproduce the reference's values exactly where no resampling is involved (torch on
CUDA multiplies by the reciprocal of a scalar divisor instead: it may differ by one ulp).
"""
import os

import torch
import triton
import triton.language as tl

# Same convention as kernels/info_nce.py: INTERPRETED (re-set below the kernels) records whether
# triton.jit interprets (TRITON_INTERPRET=1 before the first import) or compiles.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Columns of the per-sample parameter table (constexpr globals: the kernels read them too).
X_SCALE = tl.constexpr(0)
X_OFF = tl.constexpr(1)
Y_SCALE = tl.constexpr(2)
Y_OFF = tl.constexpr(3)
FLIP = tl.constexpr(4)
JITTER = tl.constexpr(5)
FACTORS = tl.constexpr(6)         # 4 columns: brightness, contrast, saturation, hue (radians)
ORDER = tl.constexpr(10)          # 4 columns: the jitter op run at each step
CONTRAST_STEP = tl.constexpr(14)  # the step at which contrast runs
GRAY = tl.constexpr(15)
BLUR_SLOT = tl.constexpr(16)      # index into the blur scratch, -1 = no blur
SOLARIZE = tl.constexpr(17)
SIGMA = tl.constexpr(18)
N_COLS = 19
COL = dict(x_scale=X_SCALE.value, x_off=X_OFF.value, y_scale=Y_SCALE.value, y_off=Y_OFF.value, flip=FLIP.value,
           jitter=JITTER.value, factors=FACTORS.value, order=ORDER.value, contrast_step=CONTRAST_STEP.value,
           gray=GRAY.value, blur_slot=BLUR_SLOT.value, solarize=SOLARIZE.value, sigma=SIGMA.value)


@triton.jit
def _source_rgb(X, T, n, oy, ox, mask, H, W, sxn, sxc, sxh, sxw, S, IS_U8: tl.constexpr):
    """Steps 1-2: bilinear half-pixel sample of the crop (border clamp, no antialias) + flip."""
    flip = tl.load(T + FLIP)
    ox = tl.where(flip != 0, S - 1 - ox, ox)
    sx = ox.to(tl.float32) * tl.load(T + X_SCALE) + tl.load(T + X_OFF)
    sy = oy.to(tl.float32) * tl.load(T + Y_SCALE) + tl.load(T + Y_OFF)
    sx = tl.minimum(tl.maximum(sx, 0.0), W - 1.0)
    sy = tl.minimum(tl.maximum(sy, 0.0), H - 1.0)
    x0f = tl.floor(sx)
    y0f = tl.floor(sy)
    wx = sx - x0f
    wy = sy - y0f
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    x1 = tl.minimum(x0 + 1, W - 1)
    y1 = tl.minimum(y0 + 1, H - 1)
    base = X + n.to(tl.int64) * sxn
    o00 = y0 * sxh + x0 * sxw
    o01 = y0 * sxh + x1 * sxw
    o10 = y1 * sxh + x0 * sxw
    o11 = y1 * sxh + x1 * sxw
    w00 = (1.0 - wx) * (1.0 - wy)
    w01 = wx * (1.0 - wy)
    w10 = (1.0 - wx) * wy
    w11 = wx * wy
    r = _bilerp(base, o00, o01, o10, o11, w00, w01, w10, w11, mask, IS_U8)
    g = _bilerp(base + sxc, o00, o01, o10, o11, w00, w01, w10, w11, mask, IS_U8)
    b = _bilerp(base + 2 * sxc, o00, o01, o10, o11, w00, w01, w10, w11, mask, IS_U8)
    return r, g, b


@triton.jit
def _bilerp(p, o00, o01, o10, o11, w00, w01, w10, w11, mask, IS_U8: tl.constexpr):
    v00 = tl.load(p + o00, mask=mask, other=0).to(tl.float32)
    v01 = tl.load(p + o01, mask=mask, other=0).to(tl.float32)
    v10 = tl.load(p + o10, mask=mask, other=0).to(tl.float32)
    v11 = tl.load(p + o11, mask=mask, other=0).to(tl.float32)
    if IS_U8:   # the reference converts to [0, 1] before interpolating
        v00 = tl.math.div_rn(v00, 255.0)
        v01 = tl.math.div_rn(v01, 255.0)
        v10 = tl.math.div_rn(v10, 255.0)
        v11 = tl.math.div_rn(v11, 255.0)
    return w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11


@triton.jit
def _clamp01(x):
    return tl.minimum(tl.maximum(x, 0.0), 1.0)


@triton.jit
def _hue(r, g, b, shift):
    """Kornia's rgb_to_hsv -> adjust_hue_raw (radians) -> hsv_to_rgb, op for op."""
    mx = tl.maximum(tl.maximum(r, g), b)
    mn = tl.minimum(tl.minimum(r, g), b)
    d = mx - mn
    s = tl.math.div_rn(d, tl.where(mx == 0.0, 1.0, mx + 1e-8))
    dd = tl.where(d == 0.0, 1.0, d)
    rc = mx - r
    gc = mx - g
    bc = mx - b
    # sextant of the first maximal channel (torch.max tie-breaking)
    h = tl.where((r >= g) & (r >= b), bc - gc, tl.where(g >= b, (rc - bc) + 2.0 * dd, (gc - rc) + 4.0 * dd))
    h = tl.math.div_rn(h, dd)
    h = tl.math.div_rn(h, 6.0)
    h = h - tl.floor(h)                         # torch's % (floored remainder) by 1
    two_pi = 6.283185307179586
    h = two_pi * h
    h = tl.where(h >= two_pi, 0.0, h)
    h = h + shift
    h = h - tl.floor(tl.math.div_rn(h, two_pi)) * two_pi
    h = tl.where(h >= two_pi, 0.0, h)
    h = tl.math.div_rn(h, two_pi)
    h6 = h * 6.0
    hi = tl.floor(h6)
    hi = hi - tl.floor(tl.math.div_rn(hi, 6.0)) * 6.0
    f = (h6 - tl.floor(tl.math.div_rn(h6, 6.0)) * 6.0) - hi
    hi = tl.minimum(tl.maximum(hi, 0.0), 5.0)
    p = mx * (1.0 - s)
    q = mx * (1.0 - f * s)
    t = mx * (1.0 - (1.0 - f) * s)
    v = mx
    r2 = tl.where(hi == 0, v, tl.where(hi == 1, q, tl.where(hi == 2, p, tl.where(hi == 3, p, tl.where(hi == 4, t, v)))))
    g2 = tl.where(hi == 0, t, tl.where(hi == 1, v, tl.where(hi == 2, v, tl.where(hi == 3, q, tl.where(hi == 4, p, p)))))
    b2 = tl.where(hi == 0, p, tl.where(hi == 1, p, tl.where(hi == 2, t, tl.where(hi == 3, v, tl.where(hi == 4, v, q)))))
    return _clamp01(r2), _clamp01(g2), _clamp01(b2)


@triton.jit
def _jitter_op(op, f, mean, r, g, b):
    """Step 3, one torchvision ColorJitter op (0 brightness, 1 contrast, 2 saturation, 3 hue)."""
    if op == 0:
        r = _clamp01(r * f)
        g = _clamp01(g * f)
        b = _clamp01(b * f)
    elif op == 1:
        r = _clamp01(f * r + (1.0 - f) * mean)
        g = _clamp01(f * g + (1.0 - f) * mean)
        b = _clamp01(f * b + (1.0 - f) * mean)
    elif op == 2:
        y = 0.2989 * r + 0.587 * g + 0.114 * b
        r = _clamp01(f * r + (1.0 - f) * y)
        g = _clamp01(f * g + (1.0 - f) * y)
        b = _clamp01(f * b + (1.0 - f) * y)
    else:
        r, g, b = _hue(r, g, b, f)
    return r, g, b


@triton.jit
def _finish_and_store(OUT, offs_out, mask, x, solarize, mean, std):
    """Steps 6-7: solarise (x >= 0.5 -> 1 - x) and normalise, then the only rounding store."""
    if solarize != 0:
        x = tl.where(x >= 0.5, 1.0 - x, x)
    x = tl.math.div_rn(x - mean, std)
    tl.store(OUT + offs_out, x.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _contrast_stats_kernel(X, TABLE, PART, H, W, sxn, sxc, sxh, sxw, S, n_tiles,
                           IS_U8: tl.constexpr, NCOL: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    tile = tl.program_id(1)
    T = TABLE + n * NCOL
    if tl.load(T + JITTER) != 0:                       # mean only needed where jitter runs
        offs = tile * BLOCK + tl.arange(0, BLOCK)
        mask = offs < S * S
        r, g, b = _source_rgb(X, T, n, offs // S, offs % S, mask, H, W, sxn, sxc, sxh, sxw, S, IS_U8)
        contrast_step = tl.load(T + CONTRAST_STEP)
        for step in tl.static_range(3):           # contrast is never preceded by more than 3 ops
            if step < contrast_step:
                op = tl.load(T + ORDER + step).to(tl.int32)
                r, g, b = _jitter_op(op, tl.load(T + FACTORS + op), 0.0, r, g, b)
        y = 0.2989 * r + 0.587 * g + 0.114 * b
        tl.store(PART + n * n_tiles + tile, tl.sum(tl.where(mask, y, 0.0), axis=0))


@triton.jit
def _main_kernel(X, TABLE, MEAN, OUT, SCRATCH, H, W, sxn, sxc, sxh, sxw, S,
                 son, soc, soh, sow, m0, m1, m2, s0, s1, s2,
                 IS_U8: tl.constexpr, NCOL: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    T = TABLE + n * NCOL
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S * S
    oy = offs // S
    ox = offs % S
    # 1-2. crop + bilinear resize + flip
    r, g, b = _source_rgb(X, T, n, oy, ox, mask, H, W, sxn, sxc, sxh, sxw, S, IS_U8)
    # 3. colour jitter in this sample's order
    if tl.load(T + JITTER) != 0:
        mean = tl.load(MEAN + n)
        for step in tl.static_range(4):
            op = tl.load(T + ORDER + step).to(tl.int32)
            r, g, b = _jitter_op(op, tl.load(T + FACTORS + op), mean, r, g, b)
    # 4. grayscale
    if tl.load(T + GRAY) != 0:
        y = 0.2989 * r + 0.587 * g + 0.114 * b
        r = y
        g = y
        b = y
    slot = tl.load(T + BLUR_SLOT).to(tl.int32)
    if slot >= 0:
        # 5. blur follows in _blur_kernel: park the pre-blur values (fp32, contiguous planes)
        base = SCRATCH + slot.to(tl.int64) * 3 * S * S + offs
        tl.store(base, r, mask=mask)
        tl.store(base + S * S, g, mask=mask)
        tl.store(base + 2 * S * S, b, mask=mask)
    else:
        # 6-7. solarise + normalise + store
        solarize = tl.load(T + SOLARIZE)
        o = n.to(tl.int64) * son + oy * soh + ox * sow
        _finish_and_store(OUT, o, mask, r, solarize, m0, s0)
        _finish_and_store(OUT, o + soc, mask, g, solarize, m1, s1)
        _finish_and_store(OUT, o + 2 * soc, mask, b, solarize, m2, s2)


@triton.jit
def _blur_kernel(SRC, DST, TABLE, SAMPLES, OUT, S, son, soc, soh, sow, m0, m1, m2, s0, s1, s2,
                 VERTICAL: tl.constexpr, KSIZE: tl.constexpr, NCOL: tl.constexpr, BLOCK: tl.constexpr):
    plane = tl.program_id(0)                      # blurred sample slot * 3 + channel
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S * S
    oy = offs // S
    ox = offs % S
    n = tl.load(SAMPLES + plane // 3)
    T = TABLE + n * NCOL
    sigma = tl.load(T + SIGMA)
    denom = 2.0 * sigma * sigma
    src = SRC + plane.to(tl.int64) * S * S
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    wsum = 0.0
    # 5. one separable Gaussian pass, reflect padding (-1 -> 1, S -> S - 2)
    for j in tl.static_range(KSIZE):
        d = (j - KSIZE // 2) * 1.0
        w = tl.exp(tl.math.div_rn(-(d * d), denom))
        if VERTICAL:
            yy = oy + (j - KSIZE // 2)
            yy = tl.where(yy < 0, -yy, yy)
            yy = tl.where(yy > S - 1, 2 * (S - 1) - yy, yy)
            v = tl.load(src + yy * S + ox, mask=mask, other=0.0)
        else:
            xx = ox + (j - KSIZE // 2)
            xx = tl.where(xx < 0, -xx, xx)
            xx = tl.where(xx > S - 1, 2 * (S - 1) - xx, xx)
            v = tl.load(src + oy * S + xx, mask=mask, other=0.0)
        acc += w * v
        wsum += w
    x = tl.math.div_rn(acc, wsum)
    if VERTICAL:
        c = plane % 3
        mean = tl.where(c == 0, m0, tl.where(c == 1, m1, m2))
        std = tl.where(c == 0, s0, tl.where(c == 1, s1, s2))
        o = n.to(tl.int64) * son + c * soc + oy * soh + ox * sow
        _finish_and_store(OUT, o, mask, x, tl.load(T + SOLARIZE), mean, std)
    else:
        tl.store(DST + plane.to(tl.int64) * S * S + offs, x, mask=mask)


INTERPRETED = not isinstance(_main_kernel, triton.runtime.JITFunction)


# ------------------------------------------------------------------------------------- launcher
def fused_augment(images: torch.Tensor, table: torch.Tensor, blurred: torch.Tensor, size: int,
                  blur_kernel_size: int, mean, std, out: torch.Tensor, block: int = None) -> torch.Tensor:
    """Run the passes. `table`: (N, N_COLS) fp32 on the images' device; `blurred`: (B,) int64
    indices of the samples with blur, slot k = blurred[k]; `out`: (N, 3, size, size), any strides."""
    n, _, h, w = images.shape
    block = block or min(1024, triton.next_power_of_2(size * size))
    n_tiles = triton.cdiv(size * size, block)
    sx = images.stride()
    so = out.stride()
    norm = (*[float(m) for m in mean], *[float(s) for s in std])
    is_u8 = images.dtype == torch.uint8
    partial = torch.zeros(n, n_tiles, device=images.device, dtype=torch.float32)
    _contrast_stats_kernel[(n, n_tiles)](images, table, partial, h, w, *sx, size, n_tiles,
                                         IS_U8=is_u8, NCOL=N_COLS, BLOCK=block)
    contrast_mean = partial.sum(1) / (size * size)
    n_blur = blurred.numel()
    scratch = torch.empty(n_blur, 3, size, size, device=images.device, dtype=torch.float32)
    _main_kernel[(n, n_tiles)](images, table, contrast_mean, out, scratch, h, w, *sx, size, *so, *norm,
                               IS_U8=is_u8, NCOL=N_COLS, BLOCK=block)
    if n_blur:
        tmp = torch.empty_like(scratch)
        for vertical, src, dst in ((False, scratch, tmp), (True, tmp, scratch)):
            _blur_kernel[(3 * n_blur, n_tiles)](src, dst, table, blurred, out, size, *so, *norm,
                                                VERTICAL=vertical, KSIZE=blur_kernel_size,
                                                NCOL=N_COLS, BLOCK=block)
    return out
