"""DeepCluster: the cluster-uniform sampler, Sobel input, the per-epoch clustering and relabelling,
training through the trainer (indices reach the method, the classifier's optimiser state is
dropped), exact resume and export. The k-means itself is tested in test_cluster.py; the features
gathered over 2 gloo ranks in test_methods_distributed.py."""
import math

import pytest
import torch

from fastssl.config import ConfigError
from fastssl.data import build_loader, resolve_paths
from fastssl.eval.commands import export_backbone
from fastssl.methods import build_augment, build_method, view_crops
from fastssl.methods.deepcluster import SobelInput, cluster_uniform_order, sobel
from fastssl.optim import build_optimizer
from fastssl.train import train, trainer
from fastssl.train.checkpoint import load_checkpoint
from fastssl.train.distributed import DistInfo
from conftest import augmented, check_exact_resume, fixed_batch_loss, train_records

CPU = torch.device("cpu")
SMALL = {"method.name": "deepcluster", "method.deepcluster.clusters": 12, "method.deepcluster.pca_dim": 16,
         "method.deepcluster.kmeans_restarts": 2, "optim.name": "sgd", "optim.lr": 0.1}
FAST = {"data.embedded_train_per_class": 2, "data.embedded_val_per_class": 2, "train.batch_size": 4,
        "eval.knn_k": 5, "method.deepcluster.clusters": 5}


@pytest.fixture(autouse=True)
def single_thread(one_cpu_thread):
    """ResNet-18 on 16-px batches: a second intra-op thread only adds contention on a busy CPU."""


def config(tiny_config, **overrides):
    return tiny_config(**{**SMALL, **overrides})


def features_of(cfg):
    train_dir, _ = resolve_paths(cfg.data, log=lambda *_: None)
    return trainer.training_features(cfg, train_dir, CPU, DistInfo())


# --- the sampler ------------------------------------------------------------------------------------

def test_cluster_uniform_order_draws_every_cluster_equally_often():
    gen = torch.Generator().manual_seed(0)
    # 7 clusters of very different sizes (one of 1 image, one of 60), one cluster id unused
    sizes = [60, 20, 9, 5, 3, 2, 1]
    assignments = torch.cat([torch.full((s,), c if c < 3 else c + 1) for c, s in enumerate(sizes)])
    assignments = assignments[torch.randperm(len(assignments), generator=gen)]
    order = cluster_uniform_order(assignments, torch.Generator().manual_seed(1))
    n = len(assignments)
    assert order.shape == (n,) and order.dtype == torch.long
    per_cluster = torch.bincount(assignments[order], minlength=8)
    assert per_cluster[3] == 0                                        # the empty cluster is not drawn
    drawn = per_cluster[per_cluster > 0]
    assert len(drawn) == 7 and drawn.sum() == n and drawn.max() - drawn.min() <= 1, per_cluster
    # a small cluster cycles through all its images; a large one takes distinct images
    uses = torch.bincount(order, minlength=n)
    for c in assignments.unique():
        members = uses[assignments == c]
        if len(members) <= n // 7:
            assert members.min() >= 1 and members.max() - members.min() <= 1
        else:
            assert members.max() == 1
    # a function of the generator's seed
    assert torch.equal(order, cluster_uniform_order(assignments, torch.Generator().manual_seed(1)))
    assert not torch.equal(order, cluster_uniform_order(assignments, torch.Generator().manual_seed(2)))


def test_an_epoch_order_reaches_the_loader_batches(tiny_config):
    cfg = config(tiny_config)
    augment = build_augment(cfg)
    train_dir, _ = resolve_paths(cfg.data, log=lambda *_: None)
    loader = build_loader(cfg.data, train_dir, size=16, batch_size=8, views=view_crops(augment), train=True)
    n = len(loader.samples)
    order = torch.arange(n).flip(0) // 2 * 2                           # repeats allowed
    loader.set_epoch(0, start_batch=1, order=order)
    _, _, indices = next(iter(loader))
    assert torch.equal(indices, order[8:16])
    with pytest.raises(ValueError, match=rf"{n} indices"):
        loader.set_epoch(0, order=order[:-1])
    with pytest.raises(ValueError, match=rf"{n} indices"):
        loader.set_epoch(0, order=order + n)


# --- Sobel ------------------------------------------------------------------------------------------

def test_sobel_sees_edges_not_colour():
    x = torch.zeros(1, 3, 6, 6)
    x[..., 3:] = 1.0                                                    # a vertical edge
    g = sobel(x)
    assert g.shape == (1, 2, 6, 6)
    assert g[0, 0, 2:4, 2:4].abs().min() == 4.0                         # |x gradient| at the edge, inside
    assert g[0, 1, 1:5].abs().max() == 0                                # no y gradient away from the border
    colour = x.clone()
    colour[:, 0] += 0.3                                                 # a colour shift of one channel
    colour[:, 1] -= 0.3
    torch.testing.assert_close(sobel(colour), g)


# --- clustering before an epoch -----------------------------------------------------------------------

def test_before_epoch_clusters_relabels_and_resets_the_classifier(tiny_config):
    cfg = config(tiny_config, **{"method.deepcluster.reassign_every_epochs": 2})
    model = build_method(cfg)
    assert isinstance(model.eval_backbone(), SobelInput) and model.backbone.conv1.in_channels == 2
    with pytest.raises(RuntimeError, match="no cluster assignment"):
        model.epoch_order(0)
    features = features_of(cfg)
    with torch.no_grad():
        model.head.weight.fill_(1.0)
    reset = model.before_epoch(0, features)
    assert {id(p) for p in reset} == {id(model.head.weight), id(model.head.bias)}
    assert 0.005 < model.head.weight.std().item() < 0.015 and model.head.bias.abs().max() == 0
    n = 160
    assert model.assignments.shape == (n,) and int(model.assignments.max()) < 12
    assert len(model.assignments.unique()) == 12                        # k-means leaves no cluster empty
    assert int(model.clustered_epoch) == 0
    first = model.assignments.clone()
    assert model.before_epoch(1, features) == []                        # every 2 epochs: kept
    assert torch.equal(model.assignments, first)
    # a function of (weights, seed, epoch): the same model clusters the same way again
    again = build_method(cfg)
    again.before_epoch(0, features)
    assert torch.equal(again.assignments, first)
    order = model.epoch_order(1)
    assert torch.equal(order, again.epoch_order(1)) and not torch.equal(order, model.epoch_order(2))
    too_many = build_method(config(tiny_config, **{"method.deepcluster.clusters": 161}))
    with pytest.raises(ConfigError, match="method.deepcluster.clusters: 161 clusters for 160"):
        too_many.before_epoch(0, features)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_config):
    cfg = config(tiny_config)
    model, augment = build_method(cfg), build_augment(cfg)
    model.set_schedule(5, 10)
    model.before_epoch(0, features_of(cfg))
    train_dir, _ = resolve_paths(cfg.data, log=lambda *_: None)
    loader = build_loader(cfg.data, train_dir, size=16, batch_size=16, views=view_crops(augment), train=True)
    loader.set_epoch(0, order=model.epoch_order(0))
    views, _, indices = next(iter(loader))
    x = augmented(augment, views, trainer.augment_generator(0, 0))
    before, _ = fixed_batch_loss(model, x, indices=indices)
    optimizer = build_optimizer(model, cfg.optim, cfg.optim.lr)
    losses = [trainer.train_step(views, 0, 0, model=model, optimizer=optimizer, scaler=None, augment=augment,
                                 device=CPU, autocast_dtype=None, indices=indices)[0] for _ in range(4)]
    after, _ = fixed_batch_loss(model, x, indices=indices)
    assert losses[0] == pytest.approx(before, rel=1e-4)
    assert all(math.isfinite(v) for v in losses + [after]) and after < 0.9 * before, (before, after, losses)


def test_forward_needs_the_assignment_and_the_indices(tiny_config):
    model = build_method(config(tiny_config))
    with pytest.raises(RuntimeError, match="no cluster assignment"):
        model([torch.randn(2, 3, 16, 16)], torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="augment.views: method deepcluster takes exactly 1 view, got 2"):
        build_augment(config(tiny_config, **{"augment.views": [{}, {}]}))


# --- through the trainer ---------------------------------------------------------------------------------

def test_training_reclusters_each_epoch_and_drops_the_classifiers_momentum(tiny_config, tmp_path, monkeypatch):
    # The trainer calls before_epoch, drops the optimiser state of what it re-initialised, then asks
    # for the epoch order: record what the optimiser holds at that point.
    from fastssl.methods.deepcluster import DeepCluster
    monkeypatch.setattr(trainer, "evaluate", lambda *args, **kwargs: {"knn_top1": 0.0})
    optimizers, seen = [], []
    real_build, real_order = trainer.build_optimizer, DeepCluster.epoch_order
    monkeypatch.setattr(trainer, "build_optimizer", lambda *a, **k: optimizers.append(real_build(*a, **k))
                        or optimizers[-1])

    def epoch_order(self, epoch):
        state = optimizers[0].state
        seen.append((epoch, self.assignments.clone(), self.head.weight in state, self.backbone.conv1.weight in state))
        return real_order(self, epoch)

    monkeypatch.setattr(DeepCluster, "epoch_order", epoch_order)
    train(config(tiny_config, **FAST, **{"run.dir": str(tmp_path / "run"), "optim.momentum": 0.9}))
    # epoch 1: the classifier's momentum is gone, the backbone's kept
    assert [(e, head, conv) for e, _, head, conv in seen] == [(0, False, False), (1, False, True)]
    assert all(a.shape == (20,) for _, a, _, _ in seen) and not torch.equal(seen[0][1], seen[1][1])
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert torch.equal(state["model"]["assignments"], seen[-1][1]) and int(state["model"]["clustered_epoch"]) == 1
    losses = [r["loss"] for r in train_records(tmp_path / "run")]
    assert len(losses) == 10 and all(map(math.isfinite, losses))


def test_resume_continues_exactly(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "evaluate", lambda *args, **kwargs: {"knn_top1": 0.0})
    run = lambda name, **kw: config(tiny_config, **FAST, **{"run.dir": str(tmp_path / name), **kw})  # noqa: E731
    full_model = check_exact_resume(run, tmp_path, [{"train.stop_after_steps": 3}, {"train.stop_after_epochs": 1}])
    assert full_model["assignments"].shape == (20,)


def test_export_notes_the_sobel_input(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "evaluate", lambda *args, **kwargs: {"knn_top1": 0.0})
    cfg = config(tiny_config, **FAST, **{"train.epochs": 1, "run.dir": str(tmp_path / "run")})
    train(cfg)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    path, note = export_backbone(cfg, state, tmp_path / "backbone.pt")
    weights = torch.load(path)
    assert weights["conv1.weight"].shape[1] == 2 and "Sobel" in note
    assert not any(k.startswith(("head.", "net.")) for k in weights)
