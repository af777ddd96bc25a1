"""The methods: each learns, EMA teachers and stop-gradients carry no gradient, the losses match hand
computations, MoCo's queue and DINO's centre and schedules behave, resume is exact, and the config
errors, multi-crop views and collapse warnings reach the user."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastssl.train.trainer as trainer
from fastssl.config import ConfigError, load_config
from fastssl.methods import EMBEDDING_METHODS, METHODS, build_augment, build_method, view_crops
from fastssl.methods.base import Method, cosine_momentum, ema_update, output_std
from fastssl.methods.byol import byol_loss
from fastssl.methods.dino import dino_loss
from fastssl.methods.moco import enqueue
from fastssl.optim import build_optimizer
from fastssl.train import train
from fastssl.train.trainer import train_step
from conftest import augmented, check_exact_resume, fixed_batch_loss, loader_batch, train_records

CPU = torch.device("cpu")
# Small heads for every method (the defaults are the papers' 4096-wide predictors, 65536 prototypes).
SMALL = {"method.moco_v2.queue_size": 64, "method.moco_v3.pred_hidden_dim": 64, "method.byol.pred_hidden_dim": 64,
         "method.simsiam.pred_hidden_dim": 32, "method.dino.out_dim": 256, "method.dino.local_size": 8,
         "method.dino.local_crops": 2}
# End-to-end runs on 20 images, batch 4: 5 steps per epoch as with tiny_config, at an eighth of the cost.
FAST = {"data.embedded_train_per_class": 2, "data.embedded_val_per_class": 2, "train.batch_size": 4,
        "eval.knn_k": 5}
# Method -> [(teacher, student)] module-attribute pairs of its EMA networks.
TEACHERS = {"moco_v2": [("key_backbone", "backbone"), ("key_projector", "projector")],
            "moco_v3": [("key_backbone", "backbone"), ("key_projector", "projector")],
            "byol": [("target_backbone", "backbone"), ("target_projector", "projector")],
            "dino": [("teacher_backbone", "backbone"), ("teacher_head", "head")]}


@pytest.fixture(autouse=True)
def single_thread(one_cpu_thread):
    """ResNet-18 on 16-px batches of 8: a second intra-op thread only adds contention on a busy CPU."""


def method_config(tiny_config, name, **overrides):
    return tiny_config(**{"method.name": name, **SMALL, **overrides})


def random_views(augment, n=8, seed=0):
    """uint8 images of each view's size (the loader's output)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n, 3, v.size, v.size), dtype=torch.uint8, generator=gen) for v in augment.views]


# --- 1. every method learns ------------------------------------------------------------------------

@pytest.mark.parametrize("name", [cls.name for cls in EMBEDDING_METHODS])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_config, name):
    # A raw per-step curve is noisy (MoCo's queue fills with real keys, DINO's centre moves): train 4
    # steps through train_step on one loader batch, all with step 0's augmentation parameters, and
    # measure that same augmented batch before and after with the initial queue / centre.
    cfg = method_config(tiny_config, name, **{"optim.name": "lars", "optim.lr": 2.0})
    assert sorted(cls.name for cls in EMBEDDING_METHODS) == sorted(["simclr", "moco_v2", "moco_v3", "byol", "simsiam",
                                                                    "dino"])
    model, augment = build_method(cfg), build_augment(cfg)
    model.set_schedule(5, 10)
    views = loader_batch(cfg, augment, batch_size=8)
    x = augmented(augment, views, trainer.augment_generator(0, 0))     # what train_step draws for step 0
    buffers = {k: v.clone() for k, v in model.state_dict().items() if k in ("queue", "queue_ptr", "center")}
    before, _ = fixed_batch_loss(model, x, buffers)
    optimizer = build_optimizer(model, cfg.optim, cfg.optim.lr)
    losses = [train_step(views, 0, 0, model=model, optimizer=optimizer, scaler=None, augment=augment, device=CPU,
                         autocast_dtype=None)[0] for _ in range(4)]
    after, _ = fixed_batch_loss(model, x, buffers)
    # the measured batch is the trained one; the losses are means of cosines and cross-entropies of
    # size ~1, summed in another order here, so their rounding is absolute (SimSiam's is near 0)
    assert losses[0] == pytest.approx(before, rel=1e-4, abs=1e-5)
    assert all(math.isfinite(v) for v in losses + [after]), losses
    assert after < before - 0.05, (name, before, after, losses)


# --- 2. EMA and its schedule ---------------------------------------------------------------------

def test_ema_update_is_the_formula():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    teacher = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    for p in teacher.parameters():
        p.data.normal_()
    for m in (0.0, 0.3, 0.996, 1.0):
        before = [p.detach().clone() for p in teacher.parameters()]
        ema_update(teacher, student, m)
        for t, t0, s in zip(teacher.parameters(), before, student.parameters()):
            torch.testing.assert_close(t, m * t0 + (1 - m) * s.detach())
    assert torch.equal(teacher[0].weight, student[0].weight)      # m=0 copied, m=1 kept


def test_cosine_momentum_schedule():
    base, total = 0.99, 10
    assert cosine_momentum(base, 0, total) == pytest.approx(base)
    assert cosine_momentum(base, total, total) == pytest.approx(1.0)
    for k in range(total + 1):
        expected = 1 - (1 - base) * (math.cos(math.pi * k / total) + 1) / 2
        assert cosine_momentum(base, k, total) == pytest.approx(expected)
    assert cosine_momentum(base, 5, 10) == pytest.approx(0.995)
    values = [cosine_momentum(base, k, total) for k in range(total + 1)]
    assert values == sorted(values) and cosine_momentum(base, 20, total) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["moco_v2", "moco_v3", "byol", "dino"])
def test_before_step_sets_the_momentum_schedule(tiny_config, name):
    cfg = method_config(tiny_config, name, **{f"method.{name}.momentum": 0.9})
    model = build_method(cfg)
    model.set_schedule(5, 20)
    for step in range(21):
        model.before_step(step)
        expected = 0.9 if name == "moco_v2" else cosine_momentum(0.9, step, 20)   # v2: constant
        assert model.momentum == pytest.approx(expected), step
    model.before_step(0)
    assert model.momentum == pytest.approx(0.9)


# --- 3. teachers receive no gradient and move only by EMA ---------------------------------------------

@pytest.mark.parametrize("name", ["moco_v2", "moco_v3", "byol", "dino"])
def test_teacher_gets_no_gradient_and_moves_only_by_ema(tiny_config, name):
    cfg = method_config(tiny_config, name, **{f"method.{name}.momentum": 0.5, "optim.name": "sgd"})
    model, augment = build_method(cfg), build_augment(cfg)
    model.set_schedule(5, 10)
    model.before_step(0)
    assert model.momentum == pytest.approx(0.5)
    optimizer = build_optimizer(model, cfg.optim, 0.1)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    pairs = [(getattr(model, t), getattr(model, s)) for t, s in TEACHERS[name]]
    for teacher, _ in pairs:
        assert all(not p.requires_grad for p in teacher.parameters())
        assert not any(id(p) in in_optimizer for p in teacher.parameters())
    model.train()
    loss, _ = model(augmented(augment, random_views(augment)))
    loss.backward()
    for teacher, student in pairs:
        assert all(p.grad is None for p in teacher.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    before = [[p.detach().clone() for p in teacher.parameters()] for teacher, _ in pairs]
    optimizer.step()
    for (teacher, student), t0 in zip(pairs, before):             # the optimiser leaves the teacher alone
        assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), t0))
        assert any(not torch.equal(p, q) for p, q in zip(student.parameters(), t0))
    model.after_step()
    for (teacher, student), t0 in zip(pairs, before):
        for p, p0, s in zip(teacher.parameters(), t0, student.parameters()):
            torch.testing.assert_close(p, 0.5 * p0 + 0.5 * s.detach())


# --- 4. SimSiam's stop-gradient -----------------------------------------------------------------------

def test_simsiam_target_branch_gets_no_gradient(tiny_config):
    cfg = method_config(tiny_config, "simsiam")
    model, augment = build_method(cfg), build_augment(cfg)
    captured = {}

    def keep(module, inputs, out):
        out.retain_grad()
        captured["z"] = out
    model.projector.register_forward_hook(keep)
    model.train()
    x = augmented(augment, random_views(augment))
    loss, _ = model(x)
    loss.backward()
    z = captured["z"]

    def manual_grad(detach_target):
        leaf = z.detach().clone().requires_grad_(True)
        p1, p2 = model.predictor(leaf).float().chunk(2)
        t1, t2 = (leaf.detach() if detach_target else leaf).float().chunk(2)
        manual = -(F.cosine_similarity(p1, t2, dim=1).mean() + F.cosine_similarity(p2, t1, dim=1).mean()) / 2
        torch.testing.assert_close(manual, loss.detach())
        return torch.autograd.grad(manual, leaf)[0]

    torch.testing.assert_close(z.grad, manual_grad(True))          # only the predictor path
    assert not torch.allclose(z.grad, manual_grad(False), atol=1e-6)  # the check would see a missing detach


# --- 5. BYOL's loss ---------------------------------------------------------------------------------

def test_byol_loss_by_hand():
    e1, e2 = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    assert byol_loss(e1, e1).item() == pytest.approx(0.0, abs=1e-6)         # identical
    assert byol_loss(e1, e2).item() == pytest.approx(2.0)                   # orthogonal
    assert byol_loss(e1, -e1).item() == pytest.approx(4.0)                  # opposite
    p = torch.tensor([[1.0, 1.0, 0.0]])                                     # cos 45 degrees
    assert byol_loss(p, e1).item() == pytest.approx(2 - math.sqrt(2))
    assert byol_loss(7 * p, 0.1 * e1).item() == pytest.approx(2 - math.sqrt(2))   # scale-invariant
    both = byol_loss(torch.cat([e1, e1]), torch.cat([e1, -e1]))             # the batch mean
    assert both.item() == pytest.approx(2.0)
    target = e2.clone().requires_grad_(True)
    pred = p.clone().requires_grad_(True)
    byol_loss(pred, target).backward()
    assert target.grad is None and pred.grad is not None


# --- 6. DINO ----------------------------------------------------------------------------------------

def softmax_list(row, temperature):
    e = [math.exp(v / temperature) for v in row]
    return [v / sum(e) for v in e]


def test_dino_loss_by_hand():
    # N=2 images, K=3 prototypes, 2 global + 1 local views: student (3*2, 3), teacher (2*2, 3).
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1], [0.0, 2.0, 0.0], [-1.0, 0.3, 0.4],
                            [0.2, -0.2, 1.5], [1.0, 1.0, 0.0]])
    teacher = torch.tensor([[0.3, 0.1, -0.2], [0.0, 0.5, 0.2], [-0.3, 0.2, 0.6], [0.4, -0.1, 0.0]])
    center = torch.tensor([[0.1, -0.1, 0.05]])
    ts, tt = 0.1, 0.05
    out = dino_loss(student, teacher, 3, 2, center, ts, tt)
    s_rows, t_rows, c = student.tolist(), teacher.tolist(), center[0].tolist()
    ce, kl, pairs = 0.0, 0.0, 0
    all_pairs_ce = 0.0
    entropy = 0.0
    for i in range(2):                        # teacher view i
        for v in range(3):                    # student view v
            pair_ce = pair_kl = 0.0
            for n in range(2):
                p = softmax_list([a - b for a, b in zip(t_rows[i * 2 + n], c)], tt)
                q = softmax_list(s_rows[v * 2 + n], ts)
                pair_ce += -sum(pi * math.log(qi) for pi, qi in zip(p, q)) / 2
                pair_kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) / 2
                if v == 0:
                    entropy += -sum(pi * math.log(pi) for pi in p) / 4
            all_pairs_ce += pair_ce / 6
            if v != i:                        # never the teacher's own view
                ce, kl, pairs = ce + pair_ce, kl + pair_kl, pairs + 1
    assert pairs == 4
    assert out["loss"].item() == pytest.approx(ce / pairs, rel=1e-5)
    assert out["loss"].item() != pytest.approx(all_pairs_ce, rel=1e-3)    # the pairing rule matters here
    assert out["kl"].item() == pytest.approx(kl / pairs, rel=1e-4, abs=1e-6)
    assert out["teacher_entropy"].item() == pytest.approx(entropy, rel=1e-5)


def dino_model(tiny_config, **overrides):
    cfg = method_config(tiny_config, "dino", **overrides)
    return cfg, build_method(cfg), build_augment(cfg)


def test_dino_centre_kl_stats_and_eval_backbone(tiny_config):
    cfg, model, augment = dino_model(tiny_config)
    model.set_schedule(5, 10)
    model.before_step(0)
    model.center.copy_(torch.randn(1, 256, generator=torch.Generator().manual_seed(1)) * 0.1)
    c0 = model.center.clone()
    student, teacher = [], []
    model.head.register_forward_hook(lambda m, i, out: student.append(out.detach()))
    model.teacher_head.register_forward_hook(lambda m, i, out: teacher.append(out.detach()))
    model.train()
    views = augmented(augment, random_views(augment))
    assert [tuple(v.shape[-2:]) for v in views] == [(16, 16), (16, 16), (8, 8), (8, 8)]
    loss, stats = model(views)
    loss.backward()
    # The stats' KL: mean over (teacher view, other student view) pairs of KL(teacher || student), by hand.
    s = torch.cat(student).double()
    t = teacher[0].double()
    log_q = F.log_softmax(s / cfg.method.dino.student_temperature, dim=1).chunk(4)
    p = F.softmax((t - c0.double()) / cfg.method.dino.teacher_temperature_start, dim=1).chunk(2)
    kls = [(pi * (pi.clamp_min(1e-30).log() - log_q[v])).sum(dim=1).mean() for i, pi in enumerate(p)
           for v in range(4) if v != i]
    assert len(kls) == 6
    assert stats["kl"] == pytest.approx(torch.stack(kls).mean().item(), rel=1e-3, abs=1e-5)
    # The centre after after_step: m * c + (1 - m) * the mean teacher output of this batch.
    m = cfg.method.dino.center_momentum
    model.after_step()
    torch.testing.assert_close(model.center, m * c0 + (1 - m) * t.float().mean(dim=0, keepdim=True))
    assert model.eval_backbone() is model.teacher_backbone
    assert build_method(method_config(tiny_config, "byol")).eval_backbone().__class__ is model.backbone.__class__


def test_dino_teacher_temperature_warms_up_linearly(tiny_config):
    _, model, _ = dino_model(tiny_config, **{"method.dino.teacher_temperature_warmup_epochs": 2,
                                            "method.dino.teacher_temperature_start": 0.04,
                                            "method.dino.teacher_temperature": 0.07})
    model.set_schedule(5, 100)                                     # warm-up: 2 epochs x 5 steps
    for step in range(11):
        assert model.teacher_temperature_at(step) == pytest.approx(0.04 + 0.03 * step / 10), step
    for step in (10, 11, 50, 99):
        assert model.teacher_temperature_at(step) == pytest.approx(0.07)
    model.before_step(5)
    assert model.teacher_temperature.item() == pytest.approx(0.055)
    model.before_step(30)
    assert model.teacher_temperature.item() == pytest.approx(0.07)


def test_dino_last_layer_takes_no_update_while_frozen(tiny_config):
    """freeze_last_layer_epochs=1 with 2 steps an epoch: train_step leaves the prototypes alone at
    steps 0 and 1 (while the rest of the student moves), and updates them from step 2 on."""
    cfg, model, augment = dino_model(tiny_config, **{"method.dino.freeze_last_layer_epochs": 1.0})
    model.set_schedule(2, 10)
    optimizer = build_optimizer(model, cfg.optim, 0.5)
    views = random_views(augment)
    kwargs = dict(model=model, optimizer=optimizer, scaler=None, augment=augment, device=torch.device("cpu"),
                  autocast_dtype=None)
    prototypes, mlp = model.head.last_layer.weight, next(model.head.mlp.parameters())
    for step, frozen in [(0, True), (1, True), (2, False)]:
        before, mlp_before = prototypes.detach().clone(), mlp.detach().clone()
        train_step(views, step, 0, **kwargs)
        assert torch.equal(prototypes, before) == frozen, step
        assert not torch.equal(mlp, mlp_before), step


# --- 7. MoCo v2's queue ---------------------------------------------------------------------------

def test_enqueue_is_fifo_with_wrap_around():
    queue, ptr = torch.zeros(5, 1), torch.zeros((), dtype=torch.long)
    enqueue(queue, ptr, torch.tensor([[1.0], [2.0], [3.0]]))
    assert queue.flatten().tolist() == [1, 2, 3, 0, 0] and ptr.item() == 3
    enqueue(queue, ptr, torch.tensor([[4.0], [5.0], [6.0]]))
    assert queue.flatten().tolist() == [6, 2, 3, 4, 5] and ptr.item() == 1      # 6 wrapped over the oldest
    enqueue(queue, ptr, torch.arange(10.0, 17.0).unsqueeze(1))                   # 7 keys into 5 rows
    assert sorted(queue.flatten().tolist()) == [12, 13, 14, 15, 16]              # the newest 5
    oldest = queue.flatten().tolist().index(12)
    enqueue(queue, ptr, torch.tensor([[99.0]]))
    assert queue[oldest].item() == 99 and sorted(queue.flatten().tolist()) == [13, 14, 15, 16, 99]


def test_moco_v2_enqueues_both_views_keys_and_uses_the_queue(tiny_config):
    cfg = method_config(tiny_config, "moco_v2")
    model, augment = build_method(cfg), build_augment(cfg)
    keys, queries = [], []
    model.key_projector.register_forward_hook(lambda m, i, out: keys.append(out.detach()))
    model.projector.register_forward_hook(lambda m, i, out: queries.append(out.detach()))
    model.train()
    x = augmented(augment, random_views(augment, n=8))
    initial = model.queue.clone()
    loss, _ = model(x)
    # The loss by hand: each view's query against (the other view's key, then the queue), t = 0.2.
    q1, q2 = F.normalize(queries[0], dim=1).chunk(2)
    k1, k2 = F.normalize(keys[0], dim=1).chunk(2)
    target = torch.arange(8)
    by_hand = (F.cross_entropy(q1 @ torch.cat([k2, initial]).T / 0.2, target)
               + F.cross_entropy(q2 @ torch.cat([k1, initial]).T / 0.2, target)) / 2
    torch.testing.assert_close(loss.detach(), by_hand, rtol=1e-4, atol=1e-5)
    with torch.random.fork_rng(devices=[]), torch.no_grad():       # other negatives, another loss
        model.queue.copy_(F.normalize(torch.randn_like(initial), dim=1))
        other, _ = model(x)
        model.queue.copy_(initial)
    assert abs(other.item() - loss.item()) > 1e-3
    model(x)[0].backward()
    model.after_step()
    torch.testing.assert_close(model.queue[:16], torch.cat([k1, k2]))      # both views' keys, in order
    assert torch.equal(model.queue[16:], initial[16:]) and model.queue_ptr.item() == 16
    assert model.pending_keys is None


# --- 8. resume is exact -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["moco_v2", "moco_v3", "byol", "simsiam", "dino"])
def test_resume_continues_exactly(tiny_config, tmp_path, monkeypatch, name):
    # Every train loss and every tensor of the final model state (teacher, queue, centre) match the
    # uninterrupted run; the kNN evaluation is not under test here (test_train.py covers it).
    monkeypatch.setattr(trainer, "evaluate", lambda *args, **kwargs: {"knn_top1": 0.0})
    config = lambda run, **kw: method_config(tiny_config, name, **FAST, **{"run.dir": str(tmp_path / run), **kw})
    stops = [{"train.stop_after_epochs": 1}]
    if name in ("moco_v2", "dino"):
        stops.append({"train.stop_after_steps": 3})                 # mid-epoch: last.pt with the position
    full_model = check_exact_resume(config, tmp_path, stops)
    expected_keys = {"moco_v2": ["queue", "queue_ptr", "key_backbone.conv1.weight"],
                     "moco_v3": ["key_projector.0.weight"], "byol": ["target_backbone.conv1.weight"],
                     "simsiam": ["predictor.0.weight"], "dino": ["center", "teacher_head.last_layer.weight"]}
    assert set(expected_keys[name]) <= set(full_model)


# --- 9. config errors name the key -----------------------------------------------------------------

def test_method_config_errors_name_the_key(tiny_config):
    with pytest.raises(ConfigError, match=r"method.name.*'swav'.*simclr, moco_v2, moco_v3, byol, simsiam, dino"):
        load_config(None, {"method.name": "swav"})
    multi = [{"copies": 2}, {"size": 8, "copies": 2}]
    with pytest.raises(ConfigError, match=r"augment.views: method simclr takes exactly 2 views, got 4"):
        build_augment(tiny_config(**{"augment.views": multi}))
    build_augment(tiny_config(**{"augment.views": multi, "method.name": "dino", **SMALL}))   # dino takes them
    with pytest.raises(ConfigError, match=r"augment.views\[1\].crop"):
        build_augment(tiny_config(**{"augment.views": [{}, {"crop": True}]}))
    with pytest.raises(ConfigError, match=r"dino needs 2 global views.*got 1"):
        build_augment(tiny_config(**{"augment.views": [{}], "method.name": "dino", **SMALL}))
    with pytest.raises(ConfigError, match=r"'loss.temperature' moved to method.<name>.temperature"):
        load_config(None, {"loss.temperature": 0.2})


# --- 10. multi-crop views reach the model --------------------------------------------------------------

def test_dino_multi_crop_views_reach_the_model(tiny_config, monkeypatch):
    cfg = method_config(tiny_config, "dino", **FAST, **{"method.dino.global_crop_scale": [0.5, 1.0],
                                                        "method.dino.local_crop_scale": [0.1, 0.3],
                                                        "train.stop_after_steps": 2})
    augment = build_augment(cfg)
    crops = view_crops(augment)
    assert [c.size for c in crops] == [16, 16, 8, 8]
    assert [tuple(c.scale) for c in crops] == [(0.5, 1.0)] * 2 + [(0.1, 0.3)] * 2
    views = loader_batch(cfg, augment, batch_size=4)
    assert [tuple(v.shape) for v in views] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2
    seen = []
    real = METHODS["dino"].forward
    monkeypatch.setattr(METHODS["dino"], "forward",
                        lambda self, x: seen.append([tuple(v.shape) for v in x]) or real(self, x))
    assert train(cfg) == {}
    assert seen == [[(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2] * 2
    records = train_records(cfg.run.dir)
    assert len(records) == 2 and all(math.isfinite(r["loss"]) and r["kl"] >= 0 for r in records)


# --- 11. collapse monitoring ---------------------------------------------------------------------------

def test_collapse_warning_thresholds(tiny_config):
    simclr = build_method(method_config(tiny_config, "simclr"))
    healthy = {"z_std": 1 / math.sqrt(32), "z_dim": 32.0}
    assert simclr.collapse_warning(healthy) is None
    collapsed = output_std(torch.ones(8, 32))                       # every output the same
    assert collapsed["z_std"] == pytest.approx(0.0, abs=1e-7)
    assert "collapsed" in Method.collapse_warning(simclr, collapsed)
    assert simclr.collapse_warning({"z_std": 0.05 / math.sqrt(32), "z_dim": 32.0}) is not None
    _, dino, _ = dino_model(tiny_config)
    assert dino.collapse_warning({**healthy, "kl": 0.5, "teacher_entropy": 3.0}) is None
    message = dino.collapse_warning({**healthy, "kl": 1e-4, "teacher_entropy": 5.5})
    assert message is not None and "dino" in message and "KL" in message


def test_trainer_logs_a_collapse_once_per_epoch(tiny_config, monkeypatch):
    # A method whose outputs are constant: z_std = 0 every step; the log warns once per epoch.
    monkeypatch.setattr(trainer, "evaluate", lambda *args, **kwargs: {"knn_top1": 0.0})
    real = METHODS["simclr"].forward

    def constant_outputs(self, views):
        loss, _ = real(self, views)
        return loss, output_std(torch.ones(views[0].shape[0], 32))
    monkeypatch.setattr(METHODS["simclr"], "forward", constant_outputs)
    cfg = method_config(tiny_config, "simclr", **FAST)
    train(cfg)
    warnings = [line for line in (Path(cfg.run.dir) / "train.log").read_text().splitlines()
                if "WARNING" in line and "collapsed" in line]
    assert len(warnings) == 2, warnings
    assert "epoch 1, step 1: simclr: the outputs have collapsed" in warnings[0]
    assert "epoch 2, step 6:" in warnings[1]
    assert all(r["z_std"] == 0 for r in train_records(cfg.run.dir))
