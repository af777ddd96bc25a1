"""OBoW: the bag of words matches a hand computation, the vocabulary is a FIFO queue of sampled
teacher features, mean_min_d and the teacher follow their EMA formulas, the student learns,
resume is exact, and the config errors name the key."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import fastssl.train.trainer as trainer
from fastssl.config import ConfigError
from fastssl.methods import build_augment, build_method
from fastssl.methods.base import cosine_momentum, split_views
from fastssl.methods.obow import (batch_mean_cross_entropy, drop_border, ema_rate, perplexity, sample_words, soft_bow,
                                  stage_maps, word_distances)
from fastssl.optim import build_optimizer
from fastssl.train.trainer import train_step
from conftest import augmented, check_exact_resume, fixed_batch_loss, loader_batch

CPU = torch.device("cpu")
TINY = {"method.name": "obow", "model.backbone": "resnet18", "method.obow.vocabulary_size": 32,
        "method.obow.generator_hidden_dim": 32, "method.obow.student_size": 12, "method.obow.local_size": 8,
        "method.obow.local_crops": 2}
FAST = {"data.embedded_train_per_class": 2, "data.embedded_val_per_class": 2, "train.batch_size": 4,
        "eval.knn_k": 5}
BUFFERS = ("words", "ptr", "mean_min_distance", "batches")


@pytest.fixture(autouse=True)
def single_thread(one_cpu_thread):
    """ResNet-18 on 16-px batches: a second intra-op thread only adds contention on a busy CPU."""


def obow_config(tiny_config, **overrides):
    return tiny_config(**{**TINY, **overrides})


def random_views(augment, n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, v.size, v.size, generator=gen) for v in augment.views]


def vocabulary_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("vocabularies.")}


# --- the bag of words ----------------------------------------------------------------------------------

def test_soft_bow_by_hand():
    # 1 image, 2 locations, 2 words: squared distances [[0, 4], [2, 1]].
    d = torch.tensor([[[0.0, 4.0], [2.0, 1.0]]])
    loc0 = torch.tensor([1.0, math.exp(-4)]) / (1 + math.exp(-4))            # softmax(-d), inverse_delta 1
    loc1 = torch.tensor([math.exp(-2), math.exp(-1)]) / (math.exp(-2) + math.exp(-1))
    pooled = torch.maximum(loc0, loc1)                                        # max over the locations
    expected = pooled / pooled.sum()                                          # L1
    torch.testing.assert_close(soft_bow(d, 1.0, 1.0)[0], expected)
    # inverse_delta / mean_min_d is what counts; the max pooling is not a sum (sum gives 0.5, 0.5).
    torch.testing.assert_close(soft_bow(d, 2.0, torch.tensor(2.0)), expected[None])
    assert not torch.allclose(expected, torch.tensor([0.5, 0.5]), atol=1e-3)
    # The distances are the squared Euclidean ones; random bags are distributions.
    gen = torch.Generator().manual_seed(0)
    fmap, words = torch.randn(3, 5, 4, 3, generator=gen), torch.randn(7, 5, generator=gen)
    dist = word_distances(fmap, words)
    torch.testing.assert_close(dist, torch.cdist(fmap.flatten(2).transpose(1, 2), words[None].expand(3, -1, -1)) ** 2,
                               atol=1e-4, rtol=1e-4)
    bow = soft_bow(dist, 15.0, dist.min(-1).values.mean())
    assert bow.shape == (3, 7) and (bow >= 0).all()
    torch.testing.assert_close(bow.sum(1), torch.ones(3))


def test_batch_mean_cross_entropy_by_hand():
    t = torch.tensor([[1.0, 0.0], [0.5, 0.5]])                               # batch mean [0.75, 0.25]
    expected = (-math.log(0.75) - 0.5 * (math.log(0.75) + math.log(0.25))) / 2
    assert batch_mean_cross_entropy(t).item() == pytest.approx(expected)
    # A batch of one bag repeated: the mean is the bag itself, so it is the bag's entropy (a word
    # no image uses stays finite).
    same = torch.tensor([[0.2, 0.8, 0.0]]).repeat(3, 1)
    assert batch_mean_cross_entropy(same).item() == pytest.approx(math.log(perplexity(same[0]).item()))


def test_loss_and_logged_cross_entropies_by_hand(tiny_config):
    # The loss: per level, the cross-entropy to the teacher's bag averaged over the crops of each kind
    # and summed over the kinds; averaged over the levels. ce_<level> is over all the crops.
    cfg = obow_config(tiny_config, **{"augment.size": 32})
    model, augment = build_method(cfg), build_augment(cfg)
    model.train()
    x = random_views(augment, n=4)
    loss, stats = model(x)
    targets, _ = model.teacher_targets(x[0])          # the same step: the same targets, words and draws
    f = torch.cat(split_views(x[1:], model.backbone))
    kinds = (2, 2)                                    # TINY: 2 student views, 2 small crops
    expected_loss = 0.0
    for level in model.levels:
        t = targets[level]
        weights = model.generators[level](model.vocabularies[level].words)
        log_p = F.log_softmax(cfg.method.obow.prediction_scale * f @ weights.t(), dim=1)
        ce_per_crop = (-(t.repeat(sum(kinds), 1) * log_p).sum(1)).view(sum(kinds), -1).mean(1)
        expected_loss += sum(part.mean() for part in ce_per_crop.split(kinds)) / len(model.levels)
        assert stats[f"ce_{level}"] == pytest.approx(ce_per_crop.mean().item(), rel=1e-4)
        assert stats[f"ce_batch_mean_{level}"] == pytest.approx(batch_mean_cross_entropy(t).item(), rel=1e-5)
        assert stats[f"ce_batch_mean_{level}"] >= math.log(stats[f"perplexity_{level}"]) - 1e-4   # Gibbs
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-4)


def test_words_are_locally_pooled_teacher_features_drawn_per_step():
    gen = torch.Generator().manual_seed(0)
    fmap = torch.randn(3, 2, 5, 5, generator=gen)
    assert drop_border(fmap).shape[-2:] == (3, 3) and drop_border(fmap[..., :4, :4]).shape[-2:] == (4, 4)
    words = sample_words(fmap, 3, torch.Generator().manual_seed(1))
    windows = fmap.unfold(2, 3, 1).unfold(3, 3, 1).mean((-1, -2)).flatten(2)   # (3, 2, 9): every 3x3 mean
    for i in range(3):
        assert torch.isclose(windows[i], words[i][:, None], atol=1e-6).all(0).any()
    torch.testing.assert_close(sample_words(fmap, 3, torch.Generator().manual_seed(1)), words)
    assert sample_words(fmap[..., :2, :2], 3, gen).shape == (3, 2)            # the kernel shrinks to the map


def test_word_choice_depends_on_the_step_not_the_global_rng(tiny_config):
    # At 64 px the teacher's maps are 4x4 (layer3) and 2x2 (layer4): several locations to pick from.
    cfg = obow_config(tiny_config, **{"augment.size": 64})
    model, augment = build_method(cfg), build_augment(cfg)
    model.train()
    x = [v[:, :, :8, :8] if i else v for i, v in enumerate(random_views(augment, n=8))]
    drawn = {}
    for step, rng_seed in ((3, 0), (3, 1), (4, 0)):
        torch.manual_seed(rng_seed)
        model.before_step(step)
        with torch.no_grad():
            model(x)
        drawn[step, rng_seed] = model.pending["layer3"][0]
    torch.testing.assert_close(drawn[3, 0], drawn[3, 1])
    assert not torch.equal(drawn[3, 0], drawn[4, 0])


# --- the vocabulary queue and mean_min_d ----------------------------------------------------------------

def test_vocabulary_is_fifo_with_wrap_around(tiny_config):
    cfg = obow_config(tiny_config, **{"method.obow.vocabulary_size": 12})
    model, augment = build_method(cfg), build_augment(cfg)
    model.train()
    initial = vocabulary_state(model)
    added = []
    for step in range(2):
        model.before_step(step)
        model(random_views(augment, seed=step))
        added.append({level: words.clone() for level, (words, _) in model.pending.items()})
        model.after_step()
        assert model.pending is None
    for level in model.levels:
        v = model.vocabularies[level]
        assert v.ptr.item() == 4                                               # (8 + 8) % 12
        torch.testing.assert_close(v.words[8:12], added[1][level][:4])
        torch.testing.assert_close(v.words[0:4], added[1][level][4:])          # the newest, wrapped
        torch.testing.assert_close(v.words[4:8], added[0][level][4:])          # step 0's survivors
        assert not torch.equal(v.words, initial[f"vocabularies.{level}.words"])
    model.after_step()                                                         # nothing pending: no change
    assert model.vocabularies[model.levels[0]].ptr.item() == 4


def test_ema_rate_weighs_only_the_values_seen():
    values = [3.0, -1.0, 7.0, 2.0]
    for m in (0.0, 0.5, 0.9, 1.0):
        ema = 123.0                                                            # a start that must not count
        for t, v in enumerate(values, 1):
            ema += ema_rate(m, t) * (v - ema)
            weights = [m ** (t - 1 - i) for i in range(t)]                     # the newest weighs 1
            assert ema == pytest.approx(sum(w * x for w, x in zip(weights, values)) / sum(weights))
    assert ema_rate(0.99, 1) == 1.0 and ema_rate(0.99, 10 ** 6) == pytest.approx(0.01)


def test_min_distance_is_a_bias_corrected_ema_used_for_the_targets(tiny_config):
    # The first batch's own mean minimum distance, then the EMA of the batches seen with the
    # weight of its starting value removed, as Adam's moments: (m (1-m) b1 + (1-m) b2) / (1 - m^2).
    m = 0.9
    cfg = obow_config(tiny_config, **{"method.obow.min_distance_momentum": m, "augment.size": 64})
    model, augment = build_method(cfg), build_augment(cfg)
    model.train()
    batch_min = {level: [] for level in model.levels}
    for step in range(2):
        x = random_views(augment, n=4, seed=step)
        with torch.no_grad():
            maps = stage_maps(copy.deepcopy(model.teacher_backbone), x[0], model.levels)  # layer3 4x4, layer4 2x2
        for level, fmap in zip(model.levels, maps):
            d = word_distances(drop_border(fmap), model.vocabularies[level].words)
            batch_min[level].append(d.min(-1).values.mean())
        before = {level: model.vocabularies[level].mean_min_distance.clone() for level in model.levels}
        _, stats = model(x)
        for level in model.levels:
            b = batch_min[level]
            expected = b[0] if step == 0 else (m * (1 - m) * b[0] + (1 - m) * b[1]) / (1 - m ** 2)
            assert stats[f"mean_min_distance_{level}"] == pytest.approx(expected.item(), rel=1e-5)
            torch.testing.assert_close(model.vocabularies[level].mean_min_distance, before[level])  # not yet
        model.after_step()
        for level in model.levels:
            v = model.vocabularies[level]
            assert v.batches.item() == step + 1
            assert v.mean_min_distance.item() == pytest.approx(stats[f"mean_min_distance_{level}"], rel=1e-6)
    assert batch_min[model.levels[0]][0] != batch_min[model.levels[0]][1]        # two different batches


# --- the teacher -----------------------------------------------------------------------------------------

def test_teacher_gets_no_gradient_and_moves_only_by_the_scheduled_ema(tiny_config):
    cfg = obow_config(tiny_config, **{"method.obow.momentum": 0.5, "optim.name": "sgd"})
    model, augment = build_method(cfg), build_augment(cfg)
    model.set_schedule(5, 10)
    model.before_step(4)
    momentum = cosine_momentum(0.5, 4, 10)
    assert model.momentum == pytest.approx(momentum) and 0.5 < momentum < 1
    optimizer = build_optimizer(model, cfg.optim, 0.1)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    teacher, student = model.teacher_backbone, model.backbone
    assert all(not p.requires_grad and id(p) not in in_optimizer for p in teacher.parameters())
    assert all(id(p) in in_optimizer for p in model.generators.parameters())
    model.train()
    loss, stats = model(random_views(augment))
    assert stats["momentum"] == pytest.approx(momentum)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is not None for p in model.generators.parameters())
    before = [p.detach().clone() for p in teacher.parameters()]
    optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), before))
    model.after_step()
    for p, p0, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(p, momentum * p0 + (1 - momentum) * s.detach())
    assert model.eval_backbone() is model.backbone                           # the paper evaluates the student


def test_an_evaluated_teacher_runs_all_its_stages_with_the_same_targets(tiny_config):
    levels = {"method.obow.levels": ["layer2", "layer3"]}
    student_cfg = obow_config(tiny_config, **levels)
    teacher_cfg = obow_config(tiny_config, **levels, **{"method.obow.eval_backbone": "teacher"})
    as_paper, evaluated = build_method(student_cfg), build_method(teacher_cfg)
    evaluated.load_state_dict(as_paper.state_dict())
    assert as_paper.eval_backbone() is as_paper.backbone
    assert evaluated.eval_backbone() is evaluated.teacher_backbone
    x = random_views(build_augment(student_cfg))[0]
    as_paper.train(), evaluated.train()
    targets, _ = as_paper.teacher_targets(x)
    targets_evaluated, _ = evaluated.teacher_targets(x)
    for level in ("layer2", "layer3"):
        torch.testing.assert_close(targets_evaluated[level], targets[level])
    # layer4 is no level: its batch-norm statistics move only where the teacher is evaluated.
    untouched = as_paper.teacher_backbone.layer4[-1].bn2
    fitted = evaluated.teacher_backbone.layer4[-1].bn2
    assert untouched.num_batches_tracked.item() == 0 and torch.count_nonzero(untouched.running_mean) == 0
    assert fitted.num_batches_tracked.item() == 1 and torch.count_nonzero(fitted.running_mean) > 0
    assert len(stage_maps(evaluated.teacher_backbone, x, ["layer2"], through="layer4")) == 1
    with pytest.raises(ConfigError, match=r"method.obow.eval_backbone.*'ema'"):
        obow_config(tiny_config, **{"method.obow.eval_backbone": "ema"})


# --- learning ----------------------------------------------------------------------------------------------

def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_config):
    cfg = obow_config(tiny_config, **{"optim.name": "lars", "optim.lr": 2.0})
    model, augment = build_method(cfg), build_augment(cfg)
    model.set_schedule(5, 10)
    views = loader_batch(cfg, augment, batch_size=8)
    model.before_step(0)
    x = augmented(augment, views, trainer.augment_generator(0, 0))
    buffers = vocabulary_state(model)
    before, _ = fixed_batch_loss(model, x, buffers)
    optimizer = build_optimizer(model, cfg.optim, cfg.optim.lr)
    losses = [train_step(views, 0, 0, model=model, optimizer=optimizer, scaler=None, augment=augment, device=CPU,
                         autocast_dtype=None)[0] for _ in range(4)]
    after, _ = fixed_batch_loss(model, x, buffers)
    assert losses[0] == pytest.approx(before, rel=1e-4)
    assert all(math.isfinite(v) for v in losses + [after]), losses
    assert after < before - 0.05, (before, after, losses)


# --- resume -------------------------------------------------------------------------------------------------

def test_resume_continues_exactly(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "evaluate", lambda *args, **kwargs: {"knn_top1": 0.0})
    config = lambda run, **kw: obow_config(tiny_config, **FAST, **{"run.dir": str(tmp_path / run), **kw})
    full_model = check_exact_resume(config, tmp_path)      # mid-epoch, at step 3
    for level in ("layer3", "layer4"):
        assert {f"vocabularies.{level}.{b}" for b in BUFFERS} <= set(full_model)
    assert "teacher_backbone.conv1.weight" in full_model
    assert full_model["vocabularies.layer4.ptr"].item() == 10 * 4 % 32


# --- views and config errors ------------------------------------------------------------------------------

def test_default_views_and_config_errors(tiny_config):
    augment = build_augment(obow_config(tiny_config))
    assert [v.size for v in augment.views] == [16, 12, 12, 8, 8]
    teacher, student, local = augment.views[0], augment.views[1], augment.views[3]
    assert tuple(teacher.crop_scale) == (1.0, 1.0) and teacher.jitter_p == 0 and teacher.blur_p == 0
    assert tuple(student.crop_scale) == (0.08, 0.6) and tuple(local.crop_scale) == (0.08, 0.14)
    with pytest.raises(ConfigError, match=r"method.obow.levels.*'layer5'"):
        build_method(obow_config(tiny_config, **{"method.obow.levels": ["layer3", "layer5"]}))
    with pytest.raises(ConfigError, match=r"method.obow.levels"):
        build_method(obow_config(tiny_config, **{"method.obow.levels": []}))
    with pytest.raises(ConfigError, match=r"augment.views: obow needs the teacher's view.*got 1"):
        build_augment(obow_config(tiny_config, **{"augment.views": [{}]}))
    with pytest.raises(ConfigError, match=r"augment.views: obow's student views.*\[12, 12, 8, 6\]"):
        build_augment(obow_config(tiny_config, **{"augment.views": [{}, {"size": 12, "copies": 2}, {"size": 8},
                                                                    {"size": 6}]}))
    with pytest.raises(ConfigError, match=r"method.obow.student_crop_scale"):
        build_augment(obow_config(tiny_config, **{"method.obow.student_crop_scale": [0.6, 0.08]}))
