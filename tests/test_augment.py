import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from fastssl.augment import AugmentConfigError, MultiViewAugment, SimCLRAugment, color_jitter
from fastssl.data.crops import crop_boxes

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

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


# ----------------------------------------------------------- sampling distributions, multi-view

def test_crop_area_and_aspect_ranges():
    import math
    aug = SimCLRAugment(size=16, crop_scale=(0.2, 0.6))
    crop = aug.sample(20000, torch.Generator().manual_seed(0))["crop"]
    scale, log_ratio = crop[:, 0], crop[:, 1]
    assert scale.min() >= 0.2 and scale.max() <= 0.6 and abs(scale.mean().item() - 0.4) < 0.005
    assert log_ratio.min() >= math.log(3 / 4) - 1e-6 and log_ratio.max() <= math.log(4 / 3) + 1e-6
    assert abs(log_ratio.mean().item()) < 0.005                       # uniform in log space
    boxes = crop_boxes(crop, 400, 400)       # large enough: never clamped (max side sqrt(0.6 * 4/3) * 400)
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 400 + 1e-3).all() and (y0 + h <= 400 + 1e-3).all()
    torch.testing.assert_close(w * h / 400 ** 2, scale, rtol=1e-4, atol=0)
    torch.testing.assert_close((w / h).log(), log_ratio, rtol=0, atol=1e-4)


def test_jitter_factor_ranges_cover_the_interval():
    f = SimCLRAugment(size=16, jitter_strength=1.0).sample(20000, torch.Generator().manual_seed(1))["factors"]
    assert f[:, :3].min() >= 0.2 and f[:, :3].max() <= 1.8
    assert f[:, :3].min() < 0.21 and f[:, :3].max() > 1.79
    assert f[:, 3].min() >= -0.2 and f[:, 3].max() <= 0.2 and f[:, 3].min() < -0.19 and f[:, 3].max() > 0.19
    assert (f[:, :3].mean(0) - 1.0).abs().max() < 0.02                 # uniform: centred on 1


def test_jitter_order_is_uniform_over_24_permutations():
    order = SimCLRAugment(size=16).sample(24000, torch.Generator().manual_seed(2))["order"]
    counts = torch.unique(order, dim=0, return_counts=True)[1]
    assert counts.numel() == 24 and counts.min() > 800 and counts.max() < 1200   # 1000 +- 6 sigma


def test_flip_and_grayscale_rates_follow_settings():
    p = SimCLRAugment(size=16, flip_p=0.3, grayscale_p=0.7).sample(20000, torch.Generator().manual_seed(3))
    assert abs(p["flip"].float().mean().item() - 0.3) < 0.015
    assert abs(p["grayscale"].float().mean().item() - 0.7) < 0.015


def test_byol_recipe_rates_per_view():
    views = MultiViewAugment.recipe("byol").sample(20000, torch.Generator().manual_seed(4))
    assert len(views) == 2
    assert views[0]["blur"].all() and not views[0]["solarize"].any()
    assert abs(views[1]["blur"].float().mean().item() - 0.1) < 0.01
    assert abs(views[1]["solarize"].float().mean().item() - 0.2) < 0.01
    assert not torch.equal(views[0]["crop"], views[1]["crop"])         # independent draws


def test_multi_crop_views_from_plain_dicts():
    mv = MultiViewAugment([{"size": 16, "crop_scale": [0.14, 1.0], "copies": 2},
                           {"size": 8, "crop_scale": [0.05, 0.14], "copies": 3}])
    assert [v.size for v in mv.views] == [16, 16, 8, 8, 8] and len(mv) == 5
    params = mv.sample(4000, torch.Generator().manual_seed(5))
    assert params[2]["crop"][:, 0].min() >= 0.05 and params[2]["crop"][:, 0].max() <= 0.14
    assert params[0]["crop"][:, 0].min() >= 0.14
    outs = mv(images(n=3), torch.Generator().manual_seed(6))
    assert [tuple(o.shape) for o in outs] == [(3, 3, 16, 16)] * 2 + [(3, 3, 8, 8)] * 3
    assert MultiViewAugment.recipe("multi_crop").views[-1].size == 96


def test_kornia_output_layout_and_dtype():
    aug = SimCLRAugment(size=12)
    p = aug.sample(2, torch.Generator().manual_seed(7))
    out = aug.apply(images(n=2), p, out_dtype=torch.bfloat16, channels_last=True)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.float(), aug.apply(images(n=2), p), atol=0, rtol=2 ** -8)


@pytest.mark.parametrize("views,field", [([{"size": 0}], r"views\[0\]\.size"),
                                         ([{}, {"blur_p": 2.0}], r"views\[1\]\.blur_p"),
                                         ([{}, {"blurp": 0.5}], r"views\[1\]\.blurp: unknown"),
                                         ([{"copies": 0}], r"views\[0\]\.copies"),
                                         ([{}, "small"], r"views\[1\]"),
                                         ([], "views"), ({"size": 8}, "views")])
def test_bad_view_settings_name_the_field(views, field):
    with pytest.raises(AugmentConfigError, match=field):
        MultiViewAugment(views)


def test_unknown_recipe_and_view_count():
    with pytest.raises(AugmentConfigError, match="recipe"):
        MultiViewAugment.recipe("dino")
    mv = MultiViewAugment.recipe("simclr")
    with pytest.raises(ValueError, match="2 views but 1"):
        mv.apply(images(n=2), mv.sample(2)[:1])
