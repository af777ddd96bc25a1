"""CPC: the patch grid covers the crop, the context is row-causal, each prediction's positive is the
patch k rows below, the loss is InfoNCE computed by hand, a few steps learn, resume is exact, config
errors name the key, and the evaluated / exported backbone pools the grid."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import fastssl.train.trainer as trainer
from fastssl.config import ConfigError
from fastssl.eval.commands import export_backbone
from fastssl.methods import build_augment, build_method
from fastssl.methods.cpc import ContextNetwork, cpc_loss, fitted_size, patch_grid, top1_accuracy
from fastssl.optim import build_optimizer
from fastssl.train.trainer import train_step
from conftest import augmented, check_exact_resume, fixed_batch_loss, loader_batch

CPU = torch.device("cpu")
# 16-px images: a 3 x 3 grid of 8-px patches at stride 4, predictions 1 and 2 rows below.
SMALL = {"method.name": "cpc", "method.cpc.grid": 3, "method.cpc.prediction_steps": 2}
FAST = {"data.embedded_train_per_class": 2, "data.embedded_val_per_class": 2, "train.batch_size": 4,
        "eval.knn_k": 5}


@pytest.fixture(autouse=True)
def single_thread(one_cpu_thread):
    """ResNet-18 on 8-px patches: a second intra-op thread only adds contention on a busy CPU."""


def cpc_config(tiny_config, **overrides):
    return tiny_config(**{**SMALL, **overrides})


# --- 1. the patch grid -----------------------------------------------------------------------------

@pytest.mark.parametrize("size,grid,patch", [(16, 3, 8), (32, 7, 8), (256, 7, 64), (30, 4, 12)])
def test_patches_are_the_image_slices_and_cover_it(size, grid, patch):
    x = torch.randn(2, 3, size, size)
    patches = patch_grid(x, grid)
    assert patches.shape == (2, grid, grid, 3, patch, patch)
    stride = patch // 2
    for i in range(grid):
        for j in range(grid):
            assert torch.equal(patches[:, i, j], x[:, :, i * stride:i * stride + patch, j * stride:j * stride + patch])
    # every pixel lies in some patch: the patches of an image of pixel indices hold every index
    index = torch.arange(size * size, dtype=torch.float64).view(1, 1, size, size)
    assert torch.equal(patch_grid(index, grid).unique(), index.unique())


@pytest.mark.parametrize("size,grid,resized", [(17, 3, 16), (18, 3, 20), (19, 3, 20), (33, 7, 32), (3, 7, 8)])
def test_other_sizes_are_resized_to_the_nearest_multiple_of_grid_plus_one(size, grid, resized):
    assert fitted_size(size, grid) == resized
    x = torch.randn(2, 3, size, size)
    y = F.interpolate(x, size=(resized, resized), mode="bilinear", align_corners=False)
    stride = resized // (grid + 1)
    patches = patch_grid(x, grid)
    assert patches.shape == (2, grid, grid, 3, 2 * stride, 2 * stride)
    assert torch.equal(patches[:, -1, -1], y[:, :, -2 * stride:, -2 * stride:])     # the corner: all covered
    assert torch.equal(patches[:, 1, 0], y[:, :, stride:3 * stride, :2 * stride])


# --- 2. the context sees only rows above and its own row ---------------------------------------------

def test_the_context_is_row_causal():
    torch.manual_seed(0)
    g, layers = 6, 2
    net = ContextNetwork(8, layers, width=16)
    z = torch.randn(2, 8, g, g, requires_grad=True)
    context = net(z)
    assert context.shape == z.shape
    for i in range(g):
        (grad,) = torch.autograd.grad(context[:, :, i, :].sum(), z, retain_graph=True)
        row_grad = grad.abs().sum(dim=(0, 1, 3))                                  # (G,): per input row
        assert row_grad[i + 1:].sum() == 0, (i, row_grad)                         # nothing from below
        assert row_grad[i] > 0 and (i == 0 or row_grad[i - 1] > 0), (i, row_grad)  # its row and the one above
        assert row_grad[:max(0, i - layers)].sum() == 0, (i, row_grad)            # receptive field: `layers` rows up


# --- 3. the positives are the patches k rows below ------------------------------------------------------

def test_each_prediction_targets_the_patch_k_rows_below_in_its_column():
    # One-hot embeddings name their patch: z[n, :, r, c] = e_(n, r, c). The context is z itself and
    # W_k = k I, so query q = k e_(n, i, j) names its source patch and its step.
    n, g, steps = 2, 4, 3
    dim = n * g * g
    z = torch.eye(dim).view(n, g, g, dim).permute(0, 3, 1, 2)
    predictors = nn.ModuleList(nn.Conv2d(dim, dim, 1) for _ in range(steps))
    with torch.no_grad():
        for k, w in enumerate(predictors, start=1):
            w.weight.copy_(k * torch.eye(dim).view(dim, dim, 1, 1))
            w.bias.zero_()
        _, queries, keys, positive = cpc_loss(z, z, predictors, 0.1, backend="torch")
    assert queries.shape[0] == positive.shape[0] == sum(n * (g - k) * g for k in range(1, steps + 1))
    seen = set()
    for q, p in zip(queries, positive.tolist()):
        source, k = q.argmax().item(), round(q.max().item())
        b, i, j = source // (g * g), source // g % g, source % g
        seen.add((k, b, i, j))
        assert i + k < g
        assert keys[p].argmax().item() == b * g * g + (i + k) * g + j, (k, b, i, j, p)
    assert len(seen) == queries.shape[0]                     # every (step, image, row, column) once


# --- 4. the loss is InfoNCE computed by hand -------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "chunked"])
def test_the_loss_is_infonce_over_all_patches_of_the_batch(backend):
    torch.manual_seed(0)
    n, dim, g, steps = 2, 8, 3, 2
    z = torch.randn(n, dim, g, g, requires_grad=True)
    net = ContextNetwork(dim, 1, width=8)
    predictors = nn.ModuleList(nn.Conv2d(dim, dim, 1) for _ in range(steps))
    context = net(z.detach())                         # the only path from the loss to z is the keys
    patches = [(m, r, c) for m in range(n) for r in range(g) for c in range(g)]
    for t in (0.1, 0.7):
        loss, *_ = cpc_loss(z, context, predictors, t, backend=backend)
        terms = []
        with torch.no_grad():
            for k, w in enumerate(predictors, start=1):
                for b in range(n):
                    for i in range(g - k):
                        for j in range(g):
                            q = F.normalize(w.weight[:, :, 0, 0] @ context[b, :, i, j] + w.bias, dim=0)
                            logits = torch.stack([q @ F.normalize(z[m, :, r, c], dim=0) / t for m, r, c in patches])
                            terms.append(torch.logsumexp(logits, 0) - logits[patches.index((b, i + k, j))])
        assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    (grad_z, grad_w) = torch.autograd.grad(loss, [z, predictors[0].weight])
    assert grad_z.abs().sum() > 0 and grad_w.abs().sum() > 0  # both the targets and the predictions learn


def test_top1_accuracy_counts_queries_whose_nearest_key_is_the_target():
    keys = torch.eye(4)
    queries = torch.tensor([[1.0, 0.1, 0, 0], [0, 0, 2.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 3.0]])
    positive = torch.tensor([0, 1, 1, 3])                                    # rows 0, 2, 3 right
    assert top1_accuracy(queries, keys, positive) == 0.75
    assert top1_accuracy(queries, keys, positive, limit=2) == 1.0           # rows 0 and 2 only


# --- 5. a few steps learn --------------------------------------------------------------------------------

def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_config):
    cfg = cpc_config(tiny_config)
    model, augment = build_method(cfg), build_augment(cfg)
    assert len(augment.views) == 1
    model.set_schedule(5, 10)
    views = loader_batch(cfg, augment, batch_size=8)
    x = augmented(augment, views, trainer.augment_generator(0, 0))             # what train_step draws for step 0
    before, stats = fixed_batch_loss(model, x)
    assert stats["z_dim"] == 512 and stats["z_std"] > 0 and 0 <= stats["patch_top1"] <= 1
    optimizer = build_optimizer(model, cfg.optim, cfg.optim.lr)
    losses = [train_step(views, 0, 0, model=model, optimizer=optimizer, scaler=None, augment=augment, device=CPU,
                         autocast_dtype=None)[0] for _ in range(4)]
    after, _ = fixed_batch_loss(model, x)
    assert all(math.isfinite(v) for v in losses + [after]), losses
    assert losses[0] == pytest.approx(before, rel=1e-4)
    assert after < 0.9 * before, (before, after, losses)


# --- 6. resume is exact ----------------------------------------------------------------------------------

def test_resume_continues_exactly(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "evaluate", lambda *args, **kwargs: {"knn_top1": 0.0})

    def config(run, **kw):
        return cpc_config(tiny_config, **FAST, **{"run.dir": str(tmp_path / run), **kw})

    full_model = check_exact_resume(config, tmp_path)
    assert {"context.blocks.0.mix.weight", "predictors.1.weight"} <= set(full_model)


# --- 7. config errors --------------------------------------------------------------------------------------

def test_config_errors_name_the_key(tiny_config):
    with pytest.raises(ConfigError, match=r"method.cpc.grid: must be >= 2.*got 1"):
        build_method(cpc_config(tiny_config, **{"method.cpc.grid": 1, "method.cpc.prediction_steps": 1}))
    with pytest.raises(ConfigError, match=r"method.cpc.prediction_steps: .*\[1, 2\].*got 3"):
        build_method(cpc_config(tiny_config, **{"method.cpc.prediction_steps": 3}))
    with pytest.raises(ConfigError, match=r"augment.views: method cpc takes exactly 1 view, got 2"):
        build_augment(cpc_config(tiny_config, **{"augment.views": [{}, {}]}))
    build_method(cpc_config(tiny_config, **{"method.cpc.grid": 2, "method.cpc.prediction_steps": 1}))   # the least


# --- 8. evaluation and export pool the grid ---------------------------------------------------------------

def test_the_evaluated_backbone_averages_the_patch_features_and_exports(tiny_config, tmp_path):
    cfg = cpc_config(tiny_config)
    model = build_method(cfg)
    evaluated = model.eval_backbone().eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        features = evaluated(x)
        patches = patch_grid(x, 3).reshape(27, 3, 8, 8)
        expected = model.backbone(patches).view(3, 9, -1).mean(dim=1)
        assert features.shape == (3, model.feature_dim) == (3, 512)
        assert torch.allclose(features, expected, atol=1e-5)
        assert evaluated(torch.randn(2, 3, 17, 17)).shape == (2, 512)            # resized to 16 px
    assert all(k.startswith("net.") for k in evaluated.state_dict())

    path, note = export_backbone(cfg, {"model": model.state_dict()}, tmp_path / "out" / "backbone.pt")
    assert path.is_file() and "3 x 3 patches" in note
    weights = torch.load(path)
    resnet = torchvision.models.resnet18(weights=None)
    resnet.fc = nn.Identity()
    resnet.load_state_dict(weights, strict=True)
    assert torch.equal(weights["conv1.weight"], model.backbone.conv1.weight)
