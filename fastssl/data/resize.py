"""The antialiased bilinear resize of a box of an HWC uint8 image into a planar uint8 view,
compiled by numba: the filter of PIL's BILINEAR and of torch's `antialias=True` (the `pil` and
`torch` loaders' resize), used on the CPU by the `ffcv` decoder and, through its C entry point
`resize_antialiased_c`, by DALI's CPU pipeline. It reads only the box's pixels (as the torch
loader's crop-then-resize does; PIL's resize with a box also reads up to one filter support
beyond it). Numba keeps the compiled code on disk (`cache=True`): compiling the resize takes ~9 s
on a small CPU, once per machine rather than once per process."""
import functools
import math

import numba
import numpy as np
from numba import carray, types


@numba.njit(nogil=True, cache=True)
def triangle_weights(n_in, n_out):
    """The 1-D antialiased bilinear filter from n_in to n_out samples (PIL's and torch's
    `antialias=True`): output i averages the inputs within `support` = max(n_in/n_out, 1) of its
    centre (i + 0.5) * n_in / n_out, weighted by a triangle of that half-width, normalised.
    Returns (first input of each output, how many inputs each takes, (n_out, taps) weights)."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    starts = np.empty(n_out, np.int64)
    counts = np.empty(n_out, np.int64)
    weights = np.zeros((n_out, int(math.ceil(support)) * 2 + 1), np.float32)
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        starts[i], counts[i] = lo, hi - lo
        total = 0.0
        for j in range(lo, hi):
            weights[i, j - lo] = max(0.0, 1.0 - abs((j + 0.5 - centre) / support))
            total += weights[i, j - lo]
        weights[i, :hi - lo] /= total
    return starts, counts, weights


# Output rows per strip of resize_antialiased: the strip's intermediate sums (32 rows of the box's
# width in fp32, e.g. 196 KB for a 512-px box) stay in the L2 cache; 1.4x faster on one thread
# than one pass over the whole view (benchmarks/data.py's per-image breakdown).
STRIP_ROWS = 32


@numba.njit(nogil=True, fastmath=True, cache=True)
def resize_antialiased(image, top, bottom, left, right, out):
    """out (3, S, S' uint8, planar) <- the box [top:bottom, left:right] of image (H, W, 3 uint8),
    resized by the antialiased bilinear filter of `triangle_weights`, STRIP_ROWS output rows at a
    time. Both passes are row sums that vectorise: the vertical pass over the box's rows, then the
    horizontal one over the strip's transposed columns, into one row of sums per output column;
    each output row is then written whole (1.33x faster than writing each column's values to
    their rows as they come, on ImageNet photos' random crops)."""
    h, w = bottom - top, right - left
    oh, ow = out.shape[1], out.shape[2]
    ys, yn, yw = triangle_weights(h, oh)
    xs, xn, xw = triangle_weights(w, ow)
    strip = min(STRIP_ROWS, oh)
    rows = np.empty((strip, w * 3), np.float32)
    columns = np.empty((w, strip * 3), np.float32)
    sums = np.empty((ow, strip * 3), np.float32)
    for y0 in range(0, oh, strip):
        n = min(strip, oh - y0)
        for r in range(n):                    # vertical pass: output rows y0 .. y0 + n
            y = y0 + r
            row = rows[r]
            row[:] = 0.0
            for k in range(yn[y]):
                src = image[top + ys[y] + k].reshape(-1)[3 * left:3 * right]     # contiguous: vectorises
                weight = yw[y, k]
                for j in range(w * 3):
                    row[j] += weight * src[j]
        for x in range(w):                    # transpose: one contiguous run of sums per column
            for r in range(n):
                for c in range(3):
                    columns[x, 3 * r + c] = rows[r, 3 * x + c]
        for x in range(ow):                   # horizontal pass
            acc = sums[x]
            acc[:3 * n] = 0.5                 # + 0.5: the uint8 cast below truncates, so this rounds
            for k in range(xn[x]):
                src = columns[xs[x] + k]
                weight = xw[x, k]
                for j in range(3 * n):
                    acc[j] += weight * src[j]
            for j in range(3 * n):
                acc[j] = min(max(acc[j], np.float32(0.0)), np.float32(255.0))
        for r in range(n):                    # each output row, whole
            for c in range(3):
                dst, j = out[c, y0 + r], 3 * r + c
                for x in range(ow):
                    dst[x] = np.uint8(sums[x, j])


@functools.lru_cache(maxsize=None)
def resize_antialiased_c():
    """resize_antialiased as a C function (numba cfunc), compiled on first use:
    (image, height, width, top, bottom, left, right, out, out_height, out_width), with `image` a
    C-contiguous (height, width, 3) uint8 buffer and `out` a (3, out_height, out_width) one. The box
    is clamped to the image (at least one pixel). Compiled code that calls it through its address
    (DALI's numba operator compiles a wrapper for every view) does not compile the resize again."""
    signature = types.void(types.voidptr, types.int64, types.int64, types.int64, types.int64, types.int64,
                           types.int64, types.voidptr, types.int64, types.int64)

    @numba.cfunc(signature, nopython=True, cache=True)
    def entry(image, height, width, top, bottom, left, right, out, out_height, out_width):
        top, left = min(max(top, 0), height - 1), min(max(left, 0), width - 1)
        bottom, right = min(max(bottom, top + 1), height), min(max(right, left + 1), width)
        resize_antialiased(carray(image, (height, width, 3), np.uint8), top, bottom, left, right,
                           carray(out, (3, out_height, out_width), np.uint8))

    return entry
