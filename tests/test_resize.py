"""The numba antialiased resize that the `ffcv` decoder and DALI's CPU pipeline cut their views
with (fastssl.data.resize), against torch's."""
import numpy as np
import pytest
import torch

from fastssl.data.resize import resize_antialiased


@pytest.mark.parametrize("box, size", [
    ((0, 375, 0, 500), 224),          # a whole photo, down by 1.7-2.2
    ((10, 110, 20, 120), 224),        # a small crop, up by 2.2
    ((0, 64, 0, 64), 32),             # down by exactly 2
    ((5, 96, 3, 80), 37),             # odd sizes, not multiples of anything
    ((10, 11, 10, 12), 16),           # a 1 x 2 px box
    ((17, 283, 41, 399), 96),         # down by 2.8-3.7, off the origin
])
def test_resize_antialiased_matches_torch(box, size):
    """The views' resize is torch's antialiased bilinear resize of the box, to the rounding."""
    image = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    top, bottom, left, right = box
    out = np.empty((3, size, size), np.uint8)                     # planar, as the loader's views
    resize_antialiased(image, top, bottom, left, right, out)
    crop = torch.from_numpy(image[top:bottom, left:right]).permute(2, 0, 1)[None].float()
    ref = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                                          align_corners=False)[0].round().clamp(0, 255)
    assert np.abs(out.astype(np.float32) - ref.numpy()).max() <= 1.0
