import random

import pytest
import torch

from fastssl.pretext.color import (ab_bins, bin_prior, colorize, decode_ab, encode_ab, lab_to_rgb,
                                   nearest_bin, rebalance_weights, rgb_to_lab)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def rand(*shape, seed=0, low=0.0, high=1.0):
    return low + (high - low) * torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def in_gamut_ab(n=4, h=5, w=6, seed=0):
    return rgb_to_lab(rand(n, 3, h, w, seed=seed))[:, 1:]


def reference_lab(r, g, b):
    """Per-colour CIE Lab from the textbook formulas (math only): sRGB gamma, sRGB matrix, D65."""
    def linear(c):
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    def f(t):
        return t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29

    r, g, b = linear(r), linear(g), linear(b)
    x = (0.4124564 * r + 0.3575761 * g + 0.1804375 * b) / 0.95047
    y = 0.2126729 * r + 0.7151522 * g + 0.0721750 * b
    z = (0.0193339 * r + 0.1191920 * g + 0.9503041 * b) / 1.08883
    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


# Published sRGB -> Lab (D65) values, e.g. Lindbloom's / EasyRGB's calculators.
@pytest.mark.parametrize("rgb, lab", [
    ((1, 1, 1), (100.0, 0.0, 0.0)),
    ((0, 0, 0), (0.0, 0.0, 0.0)),
    ((1, 0, 0), (53.24, 80.09, 67.20)),
    ((0, 1, 0), (87.73, -86.18, 83.18)),
    ((0, 0, 1), (32.30, 79.19, -107.86)),
    ((0.5, 0.5, 0.5), (53.39, 0.0, 0.0)),
])
def test_known_colours(rgb, lab):
    got = rgb_to_lab(torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1)).flatten()
    assert torch.allclose(got, torch.tensor(lab), atol=0.01)


def test_matches_pure_python_reference():
    rng = random.Random(0)
    colours = [(rng.random(), rng.random(), rng.random()) for _ in range(200)]
    colours += [(0.01, 0.02, 0.03), (0.04, 0.0, 0.05)]           # the linear pieces (dark colours)
    got = rgb_to_lab(torch.tensor(colours).T.reshape(1, 3, -1, 1))[0, :, :, 0].T
    want = torch.tensor([reference_lab(*c) for c in colours])
    assert torch.allclose(got, want, atol=2e-3)


def test_rgb_round_trip():
    x = rand(3, 3, 17, 13)
    lab = rgb_to_lab(x)
    assert lab.shape == x.shape and lab.dtype == torch.float32
    assert torch.allclose(lab_to_rgb(lab), x, atol=1e-4)


def test_lab_round_trip_in_gamut():
    lab = rgb_to_lab(rand(2, 3, 9, 11, seed=1, low=0.02, high=0.98))   # away from the clamp
    assert torch.allclose(rgb_to_lab(lab_to_rgb(lab)), lab, atol=5e-3)


def test_lab_to_rgb_clamps_out_of_gamut():
    lab = torch.tensor([[50.0, 120.0, -120.0], [100.0, 0.0, 100.0]]).T.reshape(1, 3, 2, 1)
    rgb = lab_to_rgb(lab)
    assert rgb.min() == 0 or rgb.max() == 1
    assert rgb.min() >= 0 and rgb.max() <= 1 and torch.isfinite(rgb).all()


def test_gamut_bins_count_grid_and_order():
    bins = ab_bins()
    assert bins.shape == (268, 2) and bins.dtype == torch.float32   # documented: 268 (paper: 313)
    offset = bins / 10 - 0.5
    assert torch.equal(offset, offset.round())                      # every centre on the grid
    keys = (offset[:, 0] * 100 + offset[:, 1]).tolist()
    assert keys == sorted(set(keys))                                  # unique, sorted by (a, b)
    assert bins.abs().max() <= 110
    bins[0] = 1e6                                                     # a copy: the cache is safe
    assert ab_bins()[0, 0] == -85 and ab_bins(5).shape[0] > 3 * 268


def test_every_srgb_colour_falls_in_a_listed_bin():
    corners = torch.tensor([[r, g, b] for r in (0, 1) for g in (0, 1) for b in (0, 1)], dtype=torch.float32)
    colours = torch.cat([rand(50000, 3, seed=2), corners]).T.reshape(1, 3, -1, 1)
    cells = (torch.floor(rgb_to_lab(colours)[0, 1:, :, 0].T / 10) + 0.5) * 10    # (P, 2)
    listed = {tuple(c) for c in ab_bins().tolist()}
    assert {tuple(c) for c in cells.tolist()} <= listed


def test_nearest_bin_is_the_brute_force_argmin():
    bins, ab = ab_bins(), in_gamut_ab()
    idx = nearest_bin(ab, bins)
    assert idx.shape == (4, 5, 6) and idx.dtype == torch.long
    flat = ab.permute(0, 2, 3, 1).reshape(-1, 2)
    assert torch.equal(idx.flatten(), torch.cdist(flat, bins).argmin(dim=1))
    assert (flat - bins[idx.flatten()]).abs().max() <= 5               # inside its own cell


def test_encode_ab_soft_targets():
    bins, ab = ab_bins(), in_gamut_ab(seed=3)
    target = encode_ab(ab, bins)
    assert target.shape == (4, bins.shape[0], 5, 6)
    assert torch.allclose(target.sum(dim=1), torch.ones(4, 5, 6))
    assert ((target > 0).sum(dim=1) == 5).all()
    assert torch.equal(target.argmax(dim=1), nearest_bin(ab, bins))
    # Gaussian weights: w_q / w_p = exp(-(d_q^2 - d_p^2) / (2 sigma^2))
    point = ab[0, :, 0, 0]
    q = target[0, :, 0, 0].nonzero().squeeze(1)
    d2 = ((bins[q] - point) ** 2).sum(dim=1)
    want = torch.exp(-d2 / 50) / torch.exp(-d2 / 50).sum()
    assert torch.allclose(target[0, q, 0, 0], want, atol=1e-6)
    assert ((encode_ab(ab, bins, neighbours=3) > 0).sum(dim=1) == 3).all()


def test_encode_ab_far_outside_the_gamut_stays_finite():
    target = encode_ab(torch.full((1, 2, 2, 2), 400.0), ab_bins())
    assert torch.isfinite(target).all() and torch.allclose(target.sum(dim=1), torch.ones(1, 2, 2))


def test_decode_one_hot_logit_returns_the_bin_centre():
    bins = ab_bins()
    logits = torch.zeros(2, bins.shape[0], 3, 3)
    logits[0, 17], logits[1, 200] = 1000.0, 1000.0
    ab = decode_ab(logits, bins)
    assert ab.shape == (2, 2, 3, 3)
    assert torch.allclose(ab[0], bins[17].view(2, 1, 1).expand(2, 3, 3))
    assert torch.allclose(ab[1], bins[200].view(2, 1, 1).expand(2, 3, 3))


def test_annealed_mean_temperatures():
    bins = ab_bins()
    # distinct logits, 0.01 apart: no near-tie decides the mode
    logits = torch.argsort(rand(2, bins.shape[0], 4, 4, seed=4), dim=1).float() * 0.01
    mean = torch.einsum("nqhw,qc->nchw", torch.softmax(logits, dim=1), bins)
    assert torch.allclose(decode_ab(logits, bins, temperature=1.0), mean, atol=1e-4)
    mode = bins[logits.argmax(dim=1)].permute(0, 3, 1, 2)
    assert torch.allclose(decode_ab(logits, bins, temperature=1e-4), mode, atol=1e-3)
    default = decode_ab(logits, bins)                                 # T = 0.38: between the two
    assert ((default - mode).abs().mean() < (mean - mode).abs().mean())
    with pytest.raises(ValueError, match="temperature"):
        decode_ab(logits, bins, temperature=0.0)


def test_rebalance_weights():
    bins = ab_bins()
    q = bins.shape[0]
    uniform = torch.full((q,), 1.0 / q)
    assert torch.allclose(rebalance_weights(uniform, bins=bins), torch.ones(q), atol=1e-4)
    # a prior peaked at gray: the paper's normalisation, rare bins weigh more, lam=1 flattens
    prior = torch.exp(-(bins ** 2).sum(dim=1) / 800)
    prior = prior / prior.sum()
    w = rebalance_weights(prior, bins=bins)
    kernel = torch.exp(-torch.cdist(bins, bins) ** 2 / 50)
    smoothed = kernel @ prior / kernel.sum(dim=1)
    smoothed = smoothed / smoothed.sum()
    assert torch.allclose((smoothed * w).sum(), torch.tensor(1.0), atol=1e-5)
    gray, far = nearest_bin(torch.zeros(1, 2, 1, 1), bins).item(), (bins ** 2).sum(dim=1).argmax().item()
    assert w[far] > 1 > w[gray]
    assert (w[torch.argsort(smoothed)].diff() <= 1e-5).all()          # rarer -> heavier, throughout
    assert torch.allclose(rebalance_weights(prior, lam=1.0, bins=bins), torch.ones(q), atol=1e-4)
    with pytest.raises(ValueError, match="prior"):
        rebalance_weights(prior[:-1], bins=bins)


def test_bin_prior_soft_and_hard():
    bins, ab = ab_bins(), in_gamut_ab(seed=5)
    hard = nearest_bin(ab, bins)
    prior = bin_prior(hard, num_bins=bins.shape[0])
    assert prior.shape == (bins.shape[0],) and torch.allclose(prior.sum(), torch.tensor(1.0))
    assert torch.equal(prior, bin_prior(encode_ab(ab, bins)))
    counts = torch.bincount(hard.flatten(), minlength=bins.shape[0])
    assert torch.allclose(prior * hard.numel(), counts.float())
    assert torch.equal(bin_prior(torch.tensor([[[0, 2, 2, 2]]]), num_bins=4), torch.tensor([0.25, 0, 0.75, 0]))
    with pytest.raises(ValueError, match="num_bins"):
        bin_prior(hard)


def test_colorize():
    x = rand(2, 3, 8, 10, seed=6)
    lab = rgb_to_lab(x)
    assert torch.allclose(colorize(lab[:, :1], lab[:, 1:]), x, atol=1e-4)
    # a 1x2 ramp of a (0, 40) at L=50 upsampled bilinearly (half-pixel centres) to 1x4: 0, 10, 30, 40
    ramp = torch.tensor([[0.0, 40.0], [0.0, 0.0]]).view(1, 2, 1, 2)
    rgb = colorize(torch.full((1, 1, 1, 4), 50.0), ramp)
    assert rgb.shape == (1, 3, 1, 4)
    assert torch.allclose(rgb_to_lab(rgb)[0, 1, 0], torch.tensor([0.0, 10.0, 30.0, 40.0]), atol=1e-2)


def test_half_inputs_are_upcast():
    x = rand(2, 3, 5, 7, seed=7)
    lab = rgb_to_lab(x.half())
    assert lab.dtype == torch.float32
    assert torch.equal(lab, rgb_to_lab(x.half().float()))
    assert torch.allclose(lab, rgb_to_lab(x), atol=0.5)
    assert lab_to_rgb(lab.half()).dtype == torch.float32
    bins = ab_bins()
    assert torch.allclose(encode_ab(lab[:, 1:].half(), bins), encode_ab(lab[:, 1:].half().float(), bins))
    assert decode_ab(torch.zeros(1, bins.shape[0], 2, 2, dtype=torch.half), bins).dtype == torch.float32


def test_batch_items_are_independent():
    x = rand(5, 3, 4, 4, seed=8)
    bins = ab_bins()
    whole = encode_ab(rgb_to_lab(x)[:, 1:], bins)
    single = torch.cat([encode_ab(rgb_to_lab(x[i:i + 1])[:, 1:], bins) for i in range(5)])
    # Lab of a batch and of one image differ by float32 rounding (up to 6e-5 of values ~100 on an
    # Intel Xeon's vectorised kernels), which moves the soft codes by up to 3e-6; mixing images
    # would move them by far more
    assert torch.allclose(whole, single, atol=1e-5)
    assert torch.allclose(lab_to_rgb(rgb_to_lab(x))[2:3], lab_to_rgb(rgb_to_lab(x[2:3])), atol=1e-6)
