"""Shared fixtures (a tiny embedded dataset, a fast config for end-to-end runs) and helpers
(`from conftest import ...`)."""
import copy
import json
import math
import os
from pathlib import Path

import torch

# Without CUDA the Triton kernels run in Triton's interpreter. triton.jit reads TRITON_INTERPRET
# when a kernel is decorated, and a half-interpreted module fails ("Cannot call @triton.jit'd
# outside of the scope of a kernel"), so it is set here, before any test module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastssl.config import load_config  # noqa: E402
from fastssl.data import build_loader, ensure_embedded_dataset, resolve_paths  # noqa: E402
from fastssl.methods import view_crops  # noqa: E402

torch.set_num_threads(2)

TINY_DATA = dict(embedded_train_per_class=16, embedded_val_per_class=6, embedded_image_size=16)


@pytest.fixture
def one_cpu_thread():
    """Tiny tensors: extra intra-op threads only add spin-wait contention on a busy 2-core CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """Cache folder holding the tiny embedded dataset (generated once per session)."""
    cache = tmp_path_factory.mktemp("cache")
    ensure_embedded_dataset(str(cache), 16, 6, 16, log=lambda *_: None)
    return cache


@pytest.fixture
def tiny_config(tiny_cache, tmp_path):
    """A config that trains ResNet-18 on 160 16-px images in a few seconds."""
    def make(**overrides):
        values = {
            "data.cache_dir": str(tiny_cache), "data.workers": 0,
            **{f"data.{k}": v for k, v in TINY_DATA.items()},
            "augment.size": 16, "augment.crop_scale": [0.3, 1.0], "augment.blur_p": 0.0,
            "augment.jitter_strength": 0.5,
            "model.backbone": "resnet18", "model.proj_hidden_dim": 64, "model.proj_dim": 32,
            "optim.lr": 2.0, "optim.lr_scaling": "none", "optim.warmup_epochs": 0.5,
            "method.simclr.temperature": 0.2,
            "train.epochs": 2, "train.batch_size": 32, "train.log_every": 1, "train.device": "cpu",
            "eval.knn_k": 20, "run.dir": str(tmp_path / "run"),
        }
        values.update(overrides)
        return load_config(None, values)
    return make


def compile_in_fresh_process(script: str, tmp_path, *args: str, **env: str):
    """Run `script`, which compiles Triton kernels for a GPU target, in a fresh Python process:
    without TRITON_INTERPRET (the interpreter does not type-check like the compiler) and with an
    empty Triton cache in `tmp_path`, plus `env`. Skips where this Triton build has no NVIDIA
    backend; returns the finished process, which must have succeeded."""
    import subprocess
    import sys
    import triton.backends
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend to compile with")
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "TRITON_CACHE_DIR": str(tmp_path), **env}
    run = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def write_image(folder, name, image, **save_args):
    """Save a PIL image as folder/name (folders made as needed); returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / name, **save_args)
    return folder / name


def bad_image_folder(root, per_class: int):
    """An ImageFolder of `per_class` good JPEGs in each of classes a and b, and three unreadable
    files in a; returns {"a/<file>": the start of the reason every loader gives}."""
    from PIL import Image
    for i in range(per_class):
        for cls in ("a", "b"):
            write_image(root / cls, f"{i}.jpg", Image.new("RGB", (20, 20), (60 + 150 * i // per_class, 90, 30)))
    good = (root / "a" / "0.jpg").read_bytes()
    (root / "a" / "3_truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "a" / "4_empty.jpg").write_bytes(b"")
    (root / "a" / "5_text.jpg").write_text("hello, I am not a picture")
    return {"a/3_truncated.jpg": "truncated JPEG", "a/4_empty.jpg": "empty file", "a/5_text.jpg": "not an image"}


def train_records(run_dir):
    """The `train` events of a run's metrics.jsonl."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "train"]


def loader_batch(cfg, augment, batch_size=16):
    """The first training batch's views (uint8 crops, one per view) as the loader cuts them."""
    train_dir, _ = resolve_paths(cfg.data, log=lambda *_: None)
    loader = build_loader(cfg.data, train_dir, size=cfg.augment.size, batch_size=batch_size, seed=0,
                          views=view_crops(augment), train=True)
    loader.set_epoch(0)
    views, _, _ = next(iter(loader))
    return views


def check_exact_resume(config, tmp_path, stops=({"train.stop_after_steps": 3},), steps=10):
    """Train `config(run_name, **overrides)` uninterrupted, then once per entry of `stops`
    interrupted there and resumed (train.resume=true): every train loss and every tensor of the
    final model state must match the uninterrupted run's. Returns that run's final model state.
    The caller stubs out the kNN evaluation (test_train.py covers it)."""
    from fastssl.train import train
    from fastssl.train.checkpoint import load_checkpoint
    train(config("full"))
    full_losses = [r["loss"] for r in train_records(tmp_path / "full")]
    full_model = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    assert len(full_losses) == steps and all(map(math.isfinite, full_losses)), full_losses
    for i, stop in enumerate(stops):
        run = f"part{i}"
        assert train(config(run, **stop)) == {}, stop
        if "train.stop_after_steps" in stop:
            assert len(train_records(tmp_path / run)) == stop["train.stop_after_steps"]
        train(config(run, **{"train.resume": True}))
        assert [r["loss"] for r in train_records(tmp_path / run)] == full_losses, stop
        resumed = load_checkpoint(tmp_path / run / "checkpoints" / "last.pt")["model"]
        assert resumed.keys() == full_model.keys(), stop
        assert [k for k in full_model if not torch.equal(full_model[k], resumed[k])] == [], stop
    return full_model


def augmented(augment, views, gen=None):
    """The float views the model sees, from fixed augmentation parameters (drawn from `gen`, by
    default seed 0; `trainer.augment_generator(0, 0)` gives what train_step draws for step 0)."""
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    return [view.apply(v, view.sample(v.shape[0], gen)) for view, v in zip(augment.views, views)]


# What a forward leaves pending for after_step (MoCo's keys, DINO's centre, OBoW's words).
PENDING = ("pending_keys", "pending_center", "pending")


def fixed_batch_loss(model, x, buffers=None, indices=None):
    """(loss, stats) of `model` on the augmented views `x` at step 0 in train mode, with `buffers`
    (e.g. the initial queue, centre or vocabulary, so that only the trained weights differ) loaded
    over its state and `indices` passed to a method that needs them; the model, the global RNG and
    what forward leaves pending end as they were."""
    state = copy.deepcopy(model.state_dict())
    model.load_state_dict({**state, **(buffers or {})})
    model.before_step(0)                           # the scheduled values of step 0 both times
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model.train()
        loss, stats = model(x, indices) if model.needs_indices else model(x)
    model.load_state_dict(state)
    for attr in PENDING:
        if hasattr(model, attr):
            setattr(model, attr, None)
    return loss.item(), stats
