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


def test_c_entry_point_gives_the_same_pixels_and_clamps_the_box_to_the_image():
    """DALI's CPU pipeline calls the resize through its C entry point, by address: the same views,
    and a box reaching outside the image is cut to the image rather than read beyond it."""
    from fastssl.data.resize import resize_antialiased_c

    resize = resize_antialiased_c().ctypes
    image = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    for (top, bottom, left, right), clamped in [((5, 30, 7, 45), (5, 30, 7, 45)),
                                                ((-3, 60, -2, 70), (0, 40, 0, 50)),
                                                ((39, 39, 49, 80), (39, 40, 49, 50))]:
        out = np.zeros((3, 16, 12), np.uint8)
        resize(image.ctypes.data, 40, 50, top, bottom, left, right, out.ctypes.data, 16, 12)
        ref = np.zeros_like(out)
        resize_antialiased(image, *clamped, ref)
        assert np.array_equal(out, ref) and ref.any()
