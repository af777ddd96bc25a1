import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from fastssl.augment import AugmentConfigError, SimCLRAugment, color_jitter

IDENTITY = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0,
                mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def images(n=6, h=37, w=29, seed=0):
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_output_shape_dtype_and_range():
    aug = SimCLRAugment(size=24)
    views = aug(images(), torch.Generator().manual_seed(0))
    assert views.shape == (6, 3, 24, 24) and views.dtype == torch.float32
    low = (0 - max(aug.mean)) / min(aug.std)
    high = (1 - min(aug.mean)) / min(aug.std)
    assert views.min() >= low - 1e-5 and views.max() <= high + 1e-5
    assert torch.isfinite(views).all()


def test_replay_is_exact_and_draws_are_per_sample():
    aug = SimCLRAugment(size=16)
    x = images()
    params = aug.sample(6, torch.Generator().manual_seed(1))
    assert torch.equal(aug.apply(x, params), aug.apply(x, params))
    assert len(set(params["factors"][:, 0].tolist())) == 6            # each image its own brightness
    other = aug.sample(6, torch.Generator().manual_seed(2))
    assert not torch.equal(params["crop"], other["crop"])


def test_float_input_equals_uint8_input():
    aug = SimCLRAugment(size=16)
    x = images()
    params = aug.sample(6, torch.Generator().manual_seed(3))
    torch.testing.assert_close(aug.apply(x, params), aug.apply(x.float() / 255, params))


def test_full_crop_is_a_plain_bilinear_resize():
    aug = SimCLRAugment(size=20, crop=False, **IDENTITY)
    x = images().float() / 255
    expected = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False, antialias=False)
    torch.testing.assert_close(aug.apply(x, aug.sample(6)), expected, atol=1e-5, rtol=0)


def test_crop_matches_torchvision_resized_crop():
    """A box on whole pixels (here 24 x 32 at (6, 8) in a 48 x 48 image) equals torchvision's resized_crop."""
    import math
    aug = SimCLRAugment(size=12, **IDENTITY)
    x = images(n=2, h=48, w=48).float() / 255
    params = aug.sample(2)
    params["crop"] = torch.tensor([[24 * 32 / 48 ** 2, math.log(24 / 32), 6 / 24, 8 / 16]] * 2)
    ours = aug.apply(x, params)
    for i in range(2):
        ref = TF.resized_crop(x[i], 8, 6, 32, 24, [12, 12], antialias=False)
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=0)


def test_flip_and_grayscale_and_solarize():
    x = images(n=2).float() / 255
    aug = SimCLRAugment(size=16, crop=False, **IDENTITY)
    base = aug.apply(x, aug.sample(2))
    p = aug.sample(2)
    p["flip"] = torch.tensor([True, False])
    out = aug.apply(x, p)
    assert torch.equal(out[0], base[0].flip(-1)) and torch.equal(out[1], base[1])
    p = aug.sample(2)
    p["grayscale"] = torch.tensor([True, False])
    out = aug.apply(x, p)
    assert torch.allclose(out[0][0], out[0][1]) and torch.allclose(out[0][1], out[0][2])
    torch.testing.assert_close(out[0][0], TF.rgb_to_grayscale(base[0])[0], atol=1e-6, rtol=0)
    p = aug.sample(2)
    p["solarize"] = torch.tensor([True, False])
    out = aug.apply(x, p)
    torch.testing.assert_close(out[0], torch.where(base[0] >= 0.5, 1 - base[0], base[0]))


@pytest.mark.parametrize("op,fn,factor", [(0, TF.adjust_brightness, 1.4), (1, TF.adjust_contrast, 0.5),
                                          (2, TF.adjust_saturation, 1.7), (3, TF.adjust_hue, 0.15),
                                          (3, TF.adjust_hue, -0.4)])
def test_each_jitter_op_follows_torchvision(op, fn, factor):
    x = torch.rand(3, 3, 11, 13, generator=torch.Generator().manual_seed(op))
    factors = torch.ones(3, 4)
    factors[:, 3] = 0
    factors[:, op] = factor
    order = torch.tensor([[op] + [o for o in range(4) if o != op]] * 3)
    out = color_jitter(x, factors, order, torch.tensor([True, True, False]))
    for i in range(2):
        torch.testing.assert_close(out[i], fn(x[i], factor), atol=2e-6, rtol=0)
    assert torch.equal(out[2], x[2])                       # jitter flag off: untouched


def test_jitter_order_is_applied_per_sample():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    factors = torch.tensor([[1.5, 0.5, 1.0, 0.0]] * 2)
    order = torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3]])   # brightness then contrast, and the reverse
    out = color_jitter(x, factors, order, torch.tensor([True, True]))
    torch.testing.assert_close(out[0], TF.adjust_contrast(TF.adjust_brightness(x[0], 1.5), 0.5))
    torch.testing.assert_close(out[1], TF.adjust_brightness(TF.adjust_contrast(x[1], 0.5), 1.5))
    assert not torch.allclose(out[0], out[1].flip(0))


def test_blur_smooths_only_where_drawn():
    x = images(n=2, h=32, w=32).float() / 255
    aug = SimCLRAugment(size=32, crop=False, **IDENTITY)
    p = aug.sample(2)
    p["blur"], p["sigma"] = torch.tensor([True, False]), torch.tensor([2.0, 2.0])
    out = aug.apply(x, p)
    assert torch.equal(out[1], x[1])
    assert out[0].diff(dim=-1).abs().mean() < 0.5 * x[0].diff(dim=-1).abs().mean()


def test_sampled_rates_and_ranges():
    aug = SimCLRAugment(size=16, jitter_strength=0.5)
    p = aug.sample(20000, torch.Generator().manual_seed(0))
    for key, rate in (("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.5), ("solarize", 0.0)):
        assert abs(p[key].float().mean().item() - rate) < 0.015, key
    f = p["factors"]
    assert f[:, :3].min() >= 0.6 and f[:, :3].max() <= 1.4
    assert f[:, 3].min() >= -0.1 and f[:, 3].max() <= 0.1
    assert (p["order"].sort(dim=1).values == torch.arange(4)).all()       # permutations
    assert len({tuple(o) for o in p["order"].tolist()}) == 24             # all 24 orders occur


@pytest.mark.parametrize("kwargs,field", [(dict(size=0), "size"), (dict(flip_p=1.5), "flip_p"),
                                          (dict(jitter_strength=-1), "jitter_strength"),
                                          (dict(crop_scale=(0.9, 0.1)), "crop_scale"),
                                          (dict(blur_sigma=(0.0, 1.0)), "blur_sigma")])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(AugmentConfigError, match=field):
        SimCLRAugment(**kwargs)


def test_bad_images():
    aug = SimCLRAugment(size=8)
    with pytest.raises(ValueError, match="at least 1x1"):
        aug.apply(torch.zeros(2, 3, 0, 5, dtype=torch.uint8), aug.sample(2))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        aug.apply(torch.zeros(2, 4, 5, 5, dtype=torch.uint8), aug.sample(2))
    with pytest.raises(ValueError, match="unknown augmentation backend"):
        aug.apply(torch.zeros(2, 3, 5, 5, dtype=torch.uint8), aug.sample(2), backend="nope")
