"""The NT-Xent reference against an independent, loop-by-loop hand computation."""
import math

import pytest
import torch

from fastssl.losses import info_nce, nt_xent_reference


def hand_nt_xent(z1, z2, t):
    """SimCLR eq. 1 with Python loops over anchors, in float64."""
    z = [[c / math.sqrt(sum(c * c for c in v)) for c in v] for v in (z1.tolist() + z2.tolist())]
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        pos = i + n if i < n else i - n
        sims = {k: sum(a * b for a, b in zip(z[i], z[k])) / t for k in range(2 * n) if k != i}
        total += -sims[pos] + math.log(sum(math.exp(s) for s in sims.values()))
    return total / (2 * n)


@pytest.mark.parametrize("n,d", [(1, 3), (2, 4), (5, 7)])
@pytest.mark.parametrize("t", [0.03, 0.1, 0.5, 1.0])
def test_reference_matches_hand_computation(n, d, t):
    g = torch.Generator().manual_seed(n * 100 + d)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    assert nt_xent_reference(z1, z2, t).item() == pytest.approx(hand_nt_xent(z1, z2, t), rel=1e-5, abs=1e-6)


def test_n_equals_one_has_a_closed_form():
    # With one image the positive is the only candidate: the loss is exactly 0.
    z1, z2 = torch.randn(1, 8), torch.randn(1, 8)
    assert nt_xent_reference(z1, z2, 0.1).item() == pytest.approx(0.0, abs=1e-6)


def test_identical_views_orthogonal_images():
    # Two orthogonal images, each view equal to its image: sims 1 (pos) and 0 (two negatives).
    z = torch.eye(2, 4)
    t = 0.5
    expected = -2.0 + math.log(math.exp(2.0) + 2.0)
    assert nt_xent_reference(z, z.clone(), t).item() == pytest.approx(expected, rel=1e-6)


def test_scale_invariance_and_gradients_flow():
    z1 = torch.randn(4, 6, requires_grad=True)
    z2 = torch.randn(4, 6, requires_grad=True)
    loss = nt_xent_reference(z1, z2, 0.2)
    assert nt_xent_reference(3 * z1, 0.5 * z2, 0.2).item() == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


def test_low_precision_input_is_upcast():
    z1, z2 = torch.randn(3, 5), torch.randn(3, 5)
    out = nt_xent_reference(z1.bfloat16(), z2.bfloat16(), 0.1)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(nt_xent_reference(z1.bfloat16().float(), z2.bfloat16().float(), 0.1).item())


@pytest.mark.parametrize("z1,z2,t,message", [
    (torch.randn(3, 4), torch.randn(4, 4), 0.1, "same shape"),
    (torch.randn(3, 4), torch.randn(3, 4).double(), 0.1, "same dtype"),
    (torch.randn(3), torch.randn(3), 0.1, "2-D"),
    (torch.randn(0, 4), torch.randn(0, 4), 0.1, "empty batch"),
    (torch.randn(3, 4), torch.randn(3, 4), 0.0, "temperature"),
    (torch.randn(3, 4), torch.randn(3, 4), -1.0, "temperature"),
])
def test_bad_input_is_a_clear_error(z1, z2, t, message):
    with pytest.raises((ValueError, TypeError), match=message):
        info_nce(z1, z2, t, backend="torch")
