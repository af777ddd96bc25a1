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


def follow_formula(model, opt, make_input, steps):
    """Step `opt` on a squared-output loss and check every parameter against lars_formula (lr 0.7,
    momentum 0.9, weight decay 0.01, trust coefficient 0.02, 1-d parameters excluded)."""
    params = list(model.parameters())
    expected = {id(p): (p.detach().clone(), torch.zeros_like(p, dtype=torch.float64)) for p in params}
    for _ in range(steps):
        model(make_input()).pow(2).sum().backward()
        for p in params:
            old, mu = expected[id(p)]
            expected[id(p)] = lars_formula(old, p.grad, mu, 0.7, 0.9, 0.01, 0.02, exclude=p.ndim <= 1)
        opt.step()
        opt.zero_grad()
        for p in params:
            torch.testing.assert_close(p.detach().double(), expected[id(p)][0], atol=1e-6, rtol=1e-6)


def test_lars_two_steps_match_the_formula():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    groups = param_groups(model, weight_decay=0.01, exclude_bias_and_norm=True)
    opt = LARS(groups, lr=0.7, momentum=0.9, weight_decay=0.01, trust_coefficient=0.02)
    follow_formula(model, opt, lambda: torch.randn(8, 5), steps=2)


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


# --- multi-tensor LARS, optimiser choices -------------------------------------------------------

def _lars_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 4 * 4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3))


def _run_lars(foreach, exclude, steps=4, wd=0.01):
    model = _lars_model()
    opt = LARS(param_groups(model, wd, exclude), lr=0.5, momentum=0.9, weight_decay=wd,
               trust_coefficient=0.02, foreach=foreach)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(8, 3, 6, 6, generator=gen)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("exclude", [True, False])
def test_foreach_lars_matches_the_reference_loop(exclude):
    ref, ref_opt = _run_lars(False, exclude)
    fast, fast_opt = _run_lars(True, exclude)
    for a, b in zip(ref.parameters(), fast.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for a, b in zip(ref.parameters(), fast.parameters()):
        torch.testing.assert_close(ref_opt.state[a]["momentum_buffer"], fast_opt.state[b]["momentum_buffer"],
                                   atol=1e-6, rtol=1e-5)


def test_foreach_lars_matches_the_formula_and_honours_exclusions():
    torch.manual_seed(0)
    model = _lars_model()
    opt = LARS(param_groups(model, 0.01, True), lr=0.7, momentum=0.9, weight_decay=0.01,
               trust_coefficient=0.02, foreach=True)
    follow_formula(model, opt, lambda: torch.randn(8, 3, 6, 6), steps=3)
    # An excluded (1-d) parameter took plain SGD-with-momentum steps: its buffer is the sum of raw gradients'
    # momentum, not scaled by a trust ratio; with exclusion off the same parameter moves differently.
    excluded_off, _ = _run_lars(True, exclude=False, steps=3)
    excluded_on, _ = _run_lars(True, exclude=True, steps=3)
    bias_off, bias_on = list(excluded_off.parameters())[1], list(excluded_on.parameters())[1]
    assert bias_on.ndim == 1 and not torch.allclose(bias_off, bias_on)


def test_foreach_zero_norms_give_ratio_one():
    p = torch.nn.Parameter(torch.zeros(3, 3))
    q = torch.nn.Parameter(torch.ones(2, 2))
    opt = LARS([p, q], lr=1.0, momentum=0.0, weight_decay=0.0, trust_coefficient=0.001, foreach=True)
    p.grad, q.grad = torch.ones(3, 3), torch.zeros(2, 2)
    opt.step()
    assert torch.equal(p.detach(), -torch.ones(3, 3))       # |p| = 0: ratio 1
    assert torch.equal(q.detach(), torch.ones(2, 2))        # |u| = 0: ratio 1, zero update


def test_lars_state_dict_round_trip_between_implementations():
    ref, ref_opt = _run_lars(False, True, steps=2)
    import copy
    state = copy.deepcopy(ref_opt.state_dict())      # as through torch.save: no tensors shared with ref_opt
    fast = _lars_model()
    fast.load_state_dict(ref.state_dict())
    fast_opt = LARS(param_groups(fast, 0.01, True), lr=0.5, momentum=0.9, weight_decay=0.01,
                    trust_coefficient=0.02, foreach=True)
    fast_opt.load_state_dict(state)
    for a, b in zip(ref.parameters(), fast.parameters()):
        assert torch.equal(ref_opt.state[a]["momentum_buffer"], fast_opt.state[b]["momentum_buffer"])
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 3, 6, 6, generator=gen)
    for model, opt in ((ref, ref_opt), (fast, fast_opt)):
        model(x).pow(2).sum().backward()
        opt.step()
    for a, b in zip(ref.parameters(), fast.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert fast_opt.state_dict()["param_groups"][1]["lars_exclude"] is True


def _optim_cfg(**overrides):
    from fastssl.config import load_config
    return load_config(None, {f"optim.{k}": v for k, v in overrides.items()}).optim


def test_build_optimizer_names_and_impls():
    from fastssl.optim import build_optimizer
    model = _lars_model()
    lars = build_optimizer(model, _optim_cfg(), 0.1)
    assert isinstance(lars, LARS) and lars.foreach
    assert not build_optimizer(model, _optim_cfg(impl="reference"), 0.1).foreach
    adamw = build_optimizer(model, _optim_cfg(name="adamw", weight_decay=0.05), 1e-3)
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]
    assert isinstance(build_optimizer(model, _optim_cfg(name="sgd"), 0.1), torch.optim.SGD)


def test_apex_is_never_required():
    from fastssl.optim import build_optimizer
    try:
        import apex.optimizers  # noqa: F401
        import apex.parallel  # noqa: F401
        pytest.skip("apex is installed here")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="optim.impl=apex: NVIDIA apex is not installed"):
        build_optimizer(_lars_model(), _optim_cfg(impl="apex"), 0.1)


def test_bad_optimiser_settings_name_the_key():
    from fastssl.config import ConfigError, load_config
    from fastssl.optim import build_optimizer
    for override, message in [("optim.lr=-0.1", "optim.lr: must be > 0"),
                              ("optim.momentum=1.0", r"optim.momentum: must lie in \[0, 1\)"),
                              ("optim.momentum=-0.5", "optim.momentum"),
                              ("optim.name=adam", "optim.name: 'adam' is not one of lars, sgd, adamw"),
                              ("optim.impl=fused", "optim.impl: 'fused' is not one of foreach, reference, apex"),
                              ("optim.trust_coefficient=0", "optim.trust_coefficient: must be > 0")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    cfg = _optim_cfg()
    for key, value, message in [("name", "adam", "optim.name: unknown optimiser 'adam'"),
                                ("impl", "fused", "optim.impl: unknown implementation 'fused'"),
                                ("momentum", 1.5, r"optim.momentum: must lie in \[0, 1\)")]:
        bad = _optim_cfg()
        setattr(bad, key, value)
        with pytest.raises(ValueError, match=message):
            build_optimizer(_lars_model(), bad, 0.1)
    with pytest.raises(ValueError, match="optim.lr: the learning rate must be >= 0"):
        build_optimizer(_lars_model(), cfg, -1.0)
