"""The pretext tasks on the method interface: each learns under the trainer, reports its held-out
line against chance, resumes exactly, shows its batch; multi-task modes, split-brain's two halves,
colourisation's L-only representation, the adversarial term's separation, and config errors."""
import math
import re

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fastssl.train.trainer as trainer
from fastssl.cli import main as cli_main
from fastssl.config import ConfigError, load_config, save_config
from fastssl.data import build_loader, resolve_paths
from fastssl.eval.commands import export_backbone, pretext_lines
from fastssl.methods import (CLUSTERING_AND_PREDICTIVE_METHODS, EMBEDDING_METHODS, METHODS, PRETEXT_METHODS,
                             build_augment, build_method, view_crops)
from fastssl.methods.inpainting import masks
from fastssl.methods.pretext import step_generator
from fastssl.optim import build_optimizer
from fastssl.pretext.color import lab_to_rgb, rgb_to_lab
from fastssl.show import batch_rows, write_show
from fastssl.train.trainer import train_step
from conftest import augmented, check_exact_resume, fixed_batch_loss

CPU = torch.device("cpu")
PRETEXT = [cls.name for cls in PRETEXT_METHODS]
# Small heads and sizes that suit 16-px images: 10 permutations, tiles cut from a 24-px resize.
SMALL = {"method.jigsaw.permutations": 10, "method.jigsaw.input_size": 24, "method.jigsaw.hidden_dim": 64,
         "method.relative_position.input_size": 24, "method.rotation.hidden_dim": 64,
         "method.relative_position.hidden_dim": 64, "method.colorization.grid": 20, "method.split_brain.grid": 20,
         "method.split_brain.l_bins": 10, "method.super_resolution.scale": 2,
         "method.multitask.tasks": ["rotation", "colorization"]}
FAST = {"data.embedded_train_per_class": 2, "data.embedded_val_per_class": 2, "train.batch_size": 4,
        "eval.knn_k": 5}
LINE = {"rotation": r"val accuracy: \d+\.\d% \(chance 25\.0%\)",
        "jigsaw": r"val accuracy: \d+\.\d% \(chance 10\.0%\)",
        "relative_position": r"val accuracy: \d+\.\d% \(chance 12\.5%\)",
        "colorization": r"val ab error: \d+\.\d\d \(all-gray \d+\.\d\d; lower is better\)",
        "inpainting": r"val masked-pixel MSE: \d\.\d{4} \(context-mean fill \d\.\d{4}; lower is better\)",
        "split_brain": r"val accuracy: L->ab \d+\.\d% \(most frequent bin \d+\.\d%\), ab->L \d+\.\d% "
                       r"\(most frequent bin \d+\.\d%\)",
        "super_resolution": r"val PSNR: \d+\.\d\d dB \(bilinear upsampling \d+\.\d\d dB; higher is better\)"}


@pytest.fixture(autouse=True)
def single_thread(one_cpu_thread):
    """ResNet-18 on 16-px batches: a second intra-op thread only adds contention on a busy CPU."""


def task_config(tiny_config, name, **overrides):
    return tiny_config(**{"method.name": name, **SMALL, **overrides})


def first_batch(cfg, augment, batch_size=8, train_split=True):
    train_dir, val_dir = resolve_paths(cfg.data, log=lambda *_: None)
    loader = build_loader(cfg.data, train_dir if train_split else val_dir, size=cfg.augment.size,
                          batch_size=batch_size, seed=0, views=view_crops(augment), train=train_split)
    if train_split:
        loader.set_epoch(0)
    return loader


def test_the_registry_holds_every_method():
    assert sorted(METHODS) == sorted([cls.name for cls in EMBEDDING_METHODS + CLUSTERING_AND_PREDICTIVE_METHODS]
                                     + PRETEXT)
    assert sorted(PRETEXT) == sorted(["rotation", "jigsaw", "relative_position", "colorization", "inpainting",
                                      "split_brain", "super_resolution", "multitask"])


@pytest.mark.parametrize("name", PRETEXT)
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_config, name):
    # Step 0's augmentation and pretext draws each time (train_step calls before_step(0)): the
    # same inputs and labels, measured before and after 4 updates.
    cfg = task_config(tiny_config, name)
    model, augment = build_method(cfg), build_augment(cfg)
    model.set_schedule(5, 10)
    views, _, _ = next(iter(first_batch(cfg, augment)))
    x = augmented(augment, views, trainer.augment_generator(0, 0))
    before, _ = fixed_batch_loss(model, x)
    optimizer = build_optimizer(model, cfg.optim, 1.0)
    losses = [train_step(views, 0, 0, model=model, optimizer=optimizer, scaler=None, augment=augment, device=CPU,
                         autocast_dtype=None)[0] for _ in range(4)]
    after, _ = fixed_batch_loss(model, x)
    assert all(math.isfinite(v) for v in losses + [after]), losses
    assert losses[0] == pytest.approx(before, rel=1e-3)
    assert after < 0.9 * before, (name, before, after, losses)


@pytest.mark.parametrize("name", PRETEXT)
def test_held_out_lines_name_the_task_and_the_baseline(tiny_config, name):
    cfg = task_config(tiny_config, name)
    model, augment = build_method(cfg), build_augment(cfg)
    lines = pretext_lines(model, first_batch(cfg, augment, batch_size=16, train_split=False))
    tasks = SMALL["method.multitask.tasks"] if name == "multitask" else [name]
    assert len(lines) == len(tasks)
    for task, line in zip(tasks, lines):
        assert re.fullmatch(rf"pretext {task} {LINE[task]}", line), line
    assert lines == pretext_lines(model, first_batch(cfg, augment, batch_size=16, train_split=False))   # fixed draws
    assert model.training                                                      # restored after evaluation


def test_embedding_methods_have_no_pretext_line(tiny_config):
    cfg = tiny_config()
    assert pretext_lines(build_method(cfg), []) == []


@pytest.mark.parametrize("name,mode", [("jigsaw", "sum"), ("colorization", "sum"), ("multitask", "alternate")])
def test_resume_continues_exactly(tiny_config, tmp_path, monkeypatch, name, mode):
    # The permutation set, colourisation's bin counts and the alternation are in the checkpoint or
    # a function of the step: an interrupted run resumed mid-epoch matches the uninterrupted one.
    monkeypatch.setattr(trainer, "evaluate", lambda *args, **kwargs: {"knn_top1": 0.0})

    def config(run, **kw):
        return task_config(tiny_config, name, **FAST, **{"method.multitask.mode": mode, "run.dir": str(tmp_path / run),
                                                         **kw})

    full_model = check_exact_resume(config, tmp_path)
    if name == "jigsaw":
        assert full_model["tasks.jigsaw.permutations"].shape == (10, 9)
    if name == "colorization":
        assert full_model["tasks.colorization.bin_counts"].sum() > 0


def test_train_prints_the_pretext_line_before_the_knn_line(tiny_config, tmp_path, capsys):
    save_config(task_config(tiny_config, "rotation", **FAST, **{"train.epochs": 1}), tmp_path / "c.yaml")
    assert cli_main(["train", "--config", str(tmp_path / "c.yaml")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(rf"pretext rotation {LINE['rotation']}", out[-3]), out
    assert out[-2].startswith("random-init with batch-norm statistics of the training images: "), out
    assert re.fullmatch(r"kNN top-1: rotation=\d+\.\d% random-init=\d+\.\d%", out[-1]), out


def test_multitask_sums_or_alternates(tiny_config):
    cfg = task_config(tiny_config, "multitask", **{"method.multitask.weights": [1.0, 0.5]})
    model, augment = build_method(cfg), build_augment(cfg)
    views, _, _ = next(iter(first_batch(cfg, augment)))
    x = [augment.views[0].apply(views[0], augment.views[0].sample(8, torch.Generator().manual_seed(0)))]
    model.train()
    loss, stats = model(x)
    assert loss.item() == pytest.approx(stats["rotation_loss"] + 0.5 * stats["colorization_loss"], rel=1e-5)

    alt = build_method(task_config(tiny_config, "multitask", **{"method.multitask.mode": "alternate"}))
    alt.train()
    for step, task in [(0, "rotation"), (1, "colorization"), (2, "rotation")]:
        alt.before_step(step)
        alt.zero_grad()
        loss, stats = alt(x)
        assert [k for k in stats if k.endswith("_loss")] == [f"{task}_loss"]
        loss.backward()
        # every parameter takes part (DDP), the idle head with a zero gradient
        idle = "colorization" if task == "rotation" else "rotation"
        assert all(p.grad is not None for p in alt.parameters())
        assert all(p.grad.abs().sum() == 0 for p in alt.tasks[idle].parameters())


def test_config_errors_name_the_key(tiny_config):
    with pytest.raises(ConfigError, match=r"method.multitask.tasks: 'split_brain' cannot share the backbone"):
        build_method(task_config(tiny_config, "multitask", **{"method.multitask.tasks": ["rotation", "split_brain"]}))
    with pytest.raises(ConfigError, match=r"method.multitask.tasks: a task is listed twice"):
        build_method(task_config(tiny_config, "multitask", **{"method.multitask.tasks": ["rotation", "rotation"]}))
    with pytest.raises(ConfigError, match=r"method.multitask.weights: one weight >= 0 per task \(2\)"):
        build_method(task_config(tiny_config, "multitask", **{"method.multitask.weights": [1.0]}))
    with pytest.raises(ConfigError, match=r"method.jigsaw.gap: .*\(0, 0.5\), got 0"):
        load_config(None, {"method.jigsaw.gap": 0.0})
    with pytest.raises(ConfigError, match=r"method.relative_position.chroma: 'blue' is not one of"):
        load_config(None, {"method.relative_position.chroma": "blue"})
    with pytest.raises(ConfigError, match=r"augment.views: pretext task rotation takes exactly 1 view, got 2"):
        build_augment(task_config(tiny_config, "rotation", **{"augment.views": [{}, {}]}))


def test_pretext_views_keep_colour(tiny_config):
    # Colour jitter or grayscale would corrupt colourisation's target: the default view only crops and flips.
    view = build_augment(task_config(tiny_config, "colorization")).views[0]
    assert (view.jitter_p, view.grayscale_p, view.blur_p, view.solarize_p) == (0.0, 0.0, 0.0, 0.0)


def test_colorization_representation_sees_only_lightness(tiny_config):
    cfg = task_config(tiny_config, "colorization")
    model = build_method(cfg).eval()
    lab = rgb_to_lab(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25)
    shifted = lab.clone()
    shifted[:, 1:] = shifted[:, 1:] * 0.5 + 3.0             # other colours, same lightness (all in gamut)
    rgb, rgb2 = lab_to_rgb(lab), lab_to_rgb(shifted)
    assert (rgb - rgb2).abs().max() > 0.02
    norm = model.tasks["colorization"].normalize
    backbone = model.eval_backbone()
    with torch.no_grad():
        assert torch.allclose(backbone(norm(rgb)), backbone(norm(rgb2)), atol=1e-3)
    before = model.tasks["colorization"].bin_counts.clone()
    with torch.no_grad():
        model.tasks["colorization"](model.backbone, rgb, torch.Generator())        # eval mode: no counting
    assert torch.equal(before, model.tasks["colorization"].bin_counts)


def test_split_brain_halves_predict_each_other_independently(tiny_config):
    cfg = task_config(tiny_config, "split_brain")
    model = build_method(cfg)
    net, task = model.backbone, model.tasks["split_brain"]
    assert model.feature_dim == 2 * 512 and model.eval_backbone()(torch.randn(2, 3, 16, 16)).shape == (2, 1024)
    ab_logits, l_logits, ab_target, l_target = task.predict(net, rgb_to_lab(torch.rand(2, 3, 16, 16)))
    l_grads = torch.autograd.grad(F.cross_entropy(l_logits, l_target), list(net.l_net.parameters()), allow_unused=True)
    ab_grads = torch.autograd.grad(F.cross_entropy(ab_logits, ab_target), list(net.ab_net.parameters()),
                                   allow_unused=True)
    # L's loss never reaches the L network, nor ab's loss the ab network
    assert all(g is None for g in l_grads + ab_grads)


def test_super_resolution_adversarial_terms_train_their_own_side(tiny_config):
    cfg = task_config(tiny_config, "super_resolution", **{"method.super_resolution.adversarial_weight": 0.1})
    model = build_method(cfg).train()
    task, images = model.tasks["super_resolution"], torch.rand(2, 3, 16, 16)
    disc = list(task.discriminator.parameters())
    loss, stats = task(model.backbone, images, torch.Generator())
    grads = torch.autograd.grad(loss, disc)
    # The discriminator's gradient is that of its own loss alone (the generator's term does not reach it).
    out = task.restore(model.backbone, task.low_resolution(images)).detach()
    real, fake = task.discriminator(task.normalize(images)), task.discriminator(out)
    d_loss = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
              + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    assert d_loss.item() == pytest.approx(stats["d_loss"], rel=1e-5)
    for g, expected in zip(grads, torch.autograd.grad(d_loss, disc)):
        assert torch.allclose(g, expected, atol=1e-6)
    # ... and the generator's adversarial term does move the generator.
    head = list(task.head.parameters())
    with_adv = torch.autograd.grad(task(model.backbone, images, torch.Generator())[0], head)
    task.settings.adversarial_weight = 0.0
    without = torch.autograd.grad(task(model.backbone, images, torch.Generator())[0], head)
    assert any(not torch.allclose(a, b) for a, b in zip(with_adv, without))


def test_inpainting_masks():
    centre = masks(3, 16, "center", 0.5, 4, torch.Generator())
    assert centre.shape == (3, 1, 16, 16) and torch.equal(centre[:, 0, 4:12, 4:12], torch.ones(3, 8, 8))
    assert centre.sum() == 3 * 64
    blocks = masks(50, 16, "blocks", 0.5, 4, torch.Generator().manual_seed(0))
    per_image = blocks.sum(dim=(1, 2, 3))
    assert per_image.min() >= 16 and per_image.max() <= 4 * 16          # 4 blocks of 4x4, possibly overlapping
    assert len(set(per_image.tolist())) > 1                               # random positions


def test_step_generator_differs_per_step_and_repeats():
    draw = lambda step: torch.rand(3, generator=step_generator(0, step))  # noqa: E731
    assert torch.equal(draw(4), draw(4)) and not torch.equal(draw(4), draw(5))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_show_writes_every_methods_batch(tiny_config, tmp_path, name):
    cfg = task_config(tiny_config, name, **{"method.dino.out_dim": 64, "method.dino.local_size": 8,
                                            "method.dino.local_crops": 2, "method.moco_v2.queue_size": 64})
    rows = batch_rows(cfg, count=4)
    assert rows
    for title, pictures, captions in rows:
        assert pictures.dim() == 4 and pictures.shape[1] == 3 and 0 <= pictures.min() and pictures.max() <= 1
        assert captions is None or len(captions) == len(pictures)
    out = write_show(cfg, tmp_path / "views.png", count=4)
    assert Image.open(out).size[0] >= 4 * 64


def test_export_of_wrapped_representations(tiny_config, tmp_path):
    cfg = task_config(tiny_config, "colorization")
    state = {"model": build_method(cfg).state_dict()}
    out, note = export_backbone(cfg, state, tmp_path / "b.pt")
    assert "L on all three channels" in note and "conv1.weight" in torch.load(out)
    cfg = task_config(tiny_config, "split_brain")
    out, note = export_backbone(cfg, {"model": build_method(cfg).state_dict()}, tmp_path / "s.pt")
    keys = torch.load(out)
    assert "two ResNets" in note
    assert keys["l_net.conv1.weight"].shape[1] == 1 and keys["ab_net.conv1.weight"].shape[1] == 2
