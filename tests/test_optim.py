import math

import pytest
import torch

from fastssl.optim import LARS, lr_at, param_groups, scaled_lr


def lars_formula(p, g, mu, lr, m, wd, eta, exclude):
    """The LARS update written out for one parameter, in float64."""
    p, g, mu = p.double(), g.double(), mu.double()
    if exclude:
        u, ratio = g, 1.0
    else:
        u = g + wd * p
        pn, un = p.norm().item(), u.norm().item()
        ratio = eta * pn / un if pn > 0 and un > 0 else 1.0
    mu = m * mu + ratio * u
    return p - lr * mu, mu


def test_lars_two_steps_match_the_formula():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    groups = param_groups(model, weight_decay=0.01, exclude_bias_and_norm=True)
    opt = LARS(groups, lr=0.7, momentum=0.9, weight_decay=0.01, trust_coefficient=0.02)
    params = list(model.parameters())
    expected = {id(p): (p.detach().clone(), torch.zeros_like(p, dtype=torch.float64)) for p in params}
    for _ in range(2):
        x = torch.randn(8, 5)
        model(x).pow(2).sum().backward()
        for p in params:
            old, mu = expected[id(p)]
            expected[id(p)] = lars_formula(old, p.grad, mu, 0.7, 0.9, 0.01, 0.02, exclude=p.ndim <= 1)
        opt.step()
        opt.zero_grad()
        for p in params:
            torch.testing.assert_close(p.detach().double(), expected[id(p)][0], atol=1e-6, rtol=1e-6)


def test_exclusion_groups():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    regular, excluded = param_groups(model, 1e-4)
    assert [p.ndim for p in regular["params"]] == [4]
    assert sorted(p.ndim for p in excluded["params"]) == [1, 1, 1]
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"] and not regular["lars_exclude"]
    (only,) = param_groups(model, 1e-4, exclude_bias_and_norm=False)
    assert len(only["params"]) == 4


def test_zero_norms_give_ratio_one():
    p = torch.nn.Parameter(torch.zeros(3, 3))
    opt = LARS([p], lr=1.0, momentum=0.0, weight_decay=0.0, trust_coefficient=0.001)
    p.grad = torch.ones(3, 3)
    opt.step()
    assert torch.equal(p.detach(), -torch.ones(3, 3))       # |p| = 0: ratio 1, plain SGD step


def test_bad_lars_settings():
    p = [torch.nn.Parameter(torch.ones(2))]
    for kwargs, word in [(dict(lr=-1), "lr"), (dict(lr=1, momentum=1.0), "momentum"),
                         (dict(lr=1, weight_decay=-1), "weight_decay"), (dict(lr=1, trust_coefficient=0), "trust")]:
        with pytest.raises(ValueError, match=word):
            LARS(p, **kwargs)


def test_schedule_warmup_then_cosine():
    peak, warm, total = 2.0, 10, 110
    assert lr_at(0, peak, warm, total) == pytest.approx(0.2)
    assert lr_at(9, peak, warm, total) == pytest.approx(peak)
    assert lr_at(10, peak, warm, total) == pytest.approx(peak)
    assert lr_at(60, peak, warm, total) == pytest.approx(peak / 2)
    assert lr_at(110, peak, warm, total) == pytest.approx(0.0, abs=1e-12)
    values = [lr_at(s, peak, warm, total) for s in range(warm, total)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_at(0, peak, 0, total) == pytest.approx(peak)          # no warm-up


def test_lr_scaling_rules():
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(0.075 * 64)
    assert scaled_lr(0.5, 4096, "none") == 0.5
    with pytest.raises(ValueError, match="optim.lr_scaling"):
        scaled_lr(0.3, 256, "cubic")
    assert math.isclose(scaled_lr(0.3, 256, "linear"), 0.3)
