"""End-to-end: a short run learns, resume continues exactly, checkpoints are safe, the CLI prints its line."""
import json
from pathlib import Path
import re
import subprocess
import sys

import pytest
import torch

from fastssl.config import flatten, to_dict
from fastssl.train import NonFiniteLossError, train
from fastssl.train.checkpoint import load_checkpoint, save_atomic, save_checkpoint
from conftest import train_records


def test_short_run_loss_decreases_and_writes_everything(tiny_config):
    cfg = tiny_config(**{"train.epochs": 4})
    results = train(cfg)
    run = Path(cfg.run.dir)
    losses = [r["loss"] for r in train_records(run)]
    assert len(losses) == 4 * 5 and all(map(torch.isfinite, torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.1, (first, last)
    assert 0 <= results["knn_top1"] <= 100 and 0 <= results["knn_top1_random_init"] <= 100
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.pt").is_file()
    assert sorted(p.name for p in (run / "checkpoints").glob("epoch_*.pt")) == ["epoch_0003.pt", "epoch_0004.pt"]
    record = train_records(run)[0]
    assert {"loss", "lr", "images_per_s", "data_wait_share", "z_std"} <= set(record)


def test_resume_continues_exactly(tiny_config, tmp_path):
    full = tiny_config(**{"run.dir": str(tmp_path / "full")})
    train(full)
    half = tiny_config(**{"run.dir": str(tmp_path / "half"), "train.stop_after_epochs": 1})
    assert train(half) == {}
    assert len(train_records(tmp_path / "half")) == 5
    resumed = tiny_config(**{"run.dir": str(tmp_path / "half"), "train.resume": True})
    results = train(resumed)
    full_losses = [r["loss"] for r in train_records(tmp_path / "full")]
    half_losses = [r["loss"] for r in train_records(tmp_path / "half")]
    assert half_losses == full_losses                     # the next step's loss, and every one after it
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "half" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    full_eval = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1])
    assert results["knn_top1"] == full_eval["knn_top1"]


def test_resume_errors_are_clear(tiny_config, tmp_path):
    with pytest.raises(FileNotFoundError, match="train.resume: no checkpoint at"):
        train(tiny_config(**{"train.resume": True}))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(RuntimeError, match="corrupt or truncated"):
        train(tiny_config(**{"train.resume": str(bad)}))


def test_atomic_save_keeps_the_previous_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_atomic({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_atomic({"a": Unpicklable()}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]          # no temporary file left


def test_keep_last_k(tmp_path):
    for epoch in range(1, 5):
        save_checkpoint({"epoch": epoch}, tmp_path, epoch, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_0003.pt", "epoch_0004.pt", "last.pt"]


def test_non_finite_loss_stops_with_a_message(tiny_config):
    # Non-finite steps are skipped; train.max_nonfinite_steps of them in a row stop the run.
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* at epoch 1, step \d.*: 3 consecutive steps"):
        train(tiny_config(**{"optim.lr": 1e30, "optim.name": "sgd", "optim.warmup_epochs": 0,
                             "train.max_nonfinite_steps": 3}))


def test_cli_prints_the_final_line(tiny_config, tmp_path):
    cfg = tiny_config(**{"train.epochs": 1})
    args = [f"data.cache_dir={cfg.data.cache_dir}", "data.workers=0", "data.embedded_train_per_class=16",
            "data.embedded_val_per_class=6", "data.embedded_image_size=16", "augment.size=16",
            "model.backbone=resnet18", "model.proj_hidden_dim=32", "model.proj_dim=16", "train.epochs=1",
            "train.batch_size=32", "train.device=cpu", "eval.knn_k=10", f"run.dir={tmp_path / 'cli'}"]
    out = subprocess.run([sys.executable, "-m", "fastssl", "train", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    *_, bn_line, last = out.stdout.strip().splitlines()
    assert re.fullmatch(r"random-init with batch-norm statistics of the training images: \d+\.\d%", bn_line)
    assert re.fullmatch(r"kNN top-1: simclr=\d+\.\d% random-init=\d+\.\d%", last)
    bad = subprocess.run([sys.executable, "-m", "fastssl", "train", "train.epoch=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "did you mean 'train.epochs'" in bad.stderr


def test_the_random_init_baselines_of_an_untrained_model(tiny_config):
    from fastssl.methods import build_method as build_model
    from fastssl.train.trainer import evaluate
    cfg = tiny_config()
    results = evaluate(cfg, build_model(cfg), "val", torch.device("cpu"))
    # the same seed builds the same initial network, so the untrained model scores as its baseline
    assert results["knn_top1"] == results["knn_top1_random_init"]
    assert 0 <= results["knn_top1_random_init_bn"] <= 100
    assert "knn_top1_random_init_bn" not in evaluate(tiny_config(**{"eval.random_init_bn": False}),
                                                     build_model(cfg), "val", torch.device("cpu"))


def test_bf16_autocast_step_on_cpu(tiny_config):
    from fastssl.optim import build_optimizer
    from fastssl.methods import build_augment, build_method as build_model
    from fastssl.train.trainer import resolve_precision, train_step
    cfg = tiny_config(**{"train.precision": "bf16"})
    dtype, use_scaler = resolve_precision(cfg.train.precision, torch.device("cpu"))
    assert dtype is torch.bfloat16 and not use_scaler
    model = build_model(cfg)
    before = [p.detach().clone() for p in model.parameters()]
    views = [torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8) for _ in range(2)]
    loss, stats = train_step(views, 0, 0, model=model, optimizer=build_optimizer(model, cfg.optim, 0.5),
                             scaler=None, augment=build_augment(cfg), device=torch.device("cpu"),
                             autocast_dtype=dtype)
    assert torch.isfinite(torch.tensor(loss)) and stats["z_std"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_precision_choices():
    from fastssl.train.trainer import resolve_precision
    assert resolve_precision("auto", torch.device("cpu")) == (None, False)
    assert resolve_precision("fp32", torch.device("cpu")) == (None, False)
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))


# --- the learning rate the trainer resolves ------------------------------------------------------

def test_trainer_resolves_sqrt_scaled_lr(tiny_config):
    from fastssl.optim import lr_at
    cfg = tiny_config(**{"optim.lr": 0.075, "optim.lr_scaling": "sqrt", "train.stop_after_steps": 1})
    assert train(cfg) == {}
    lines = [json.loads(line) for line in (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()]
    start = lines[0]
    assert start["event"] == "start"
    assert start["peak_lr"] == pytest.approx(0.075 * 32 ** 0.5)
    assert (start["warmup_steps"], start["total_steps"], start["steps_per_epoch"]) == (2, 10, 5)
    first = train_records(Path(cfg.run.dir))[0]
    assert first["lr"] == pytest.approx(lr_at(0, 0.075 * 32 ** 0.5, 2, 10))
    log_text = (Path(cfg.run.dir) / "train.log").read_text()
    assert "peak lr 0.4243 (sqrt scaling of 0.075), 2 warm-up steps, 10 steps in all" in log_text


# --- never lose a run ----------------------------------------------------------------------------

def final_model(run_dir):
    return load_checkpoint(Path(run_dir) / "checkpoints" / "last.pt")["model"]


def assert_same_model(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def test_mid_epoch_resume_continues_exactly(tiny_config, tmp_path):
    full = tiny_config(**{"run.dir": str(tmp_path / "full")})
    train(full)
    part = tiny_config(**{"run.dir": str(tmp_path / "part"), "train.stop_after_steps": 3,
                          "train.checkpoint_every_steps": 2})
    assert train(part) == {}
    state = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (0, 3, 3)
    assert len(state["rng"]) == 1 and "scaler" in state                       # one RNG state per rank
    assert {"torch", "python", "numpy", "cuda"} <= set(state["rng"][0])
    assert not list((tmp_path / "part" / "checkpoints").glob("epoch_*.pt"))      # mid-epoch: last.pt only
    results = train(tiny_config(**{"run.dir": str(tmp_path / "part"), "train.resume": True}))
    full_losses = [r["loss"] for r in train_records(tmp_path / "full")]
    part_losses = [r["loss"] for r in train_records(tmp_path / "part")]
    assert part_losses == full_losses
    assert_same_model(final_model(tmp_path / "full"), final_model(tmp_path / "part"))
    full_eval = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1])
    assert results["knn_top1"] == full_eval["knn_top1"]


def test_checkpoint_every_steps_writes_the_position(tiny_config, tmp_path, monkeypatch):
    import fastssl.train.trainer as trainer
    written = []
    real = trainer.save_last
    monkeypatch.setattr(trainer, "save_last", lambda state, run_dir: written.append(
        (state["epoch"], state["batch"], state["step"])) or real(state, run_dir))
    train(tiny_config(**{"train.checkpoint_every_steps": 2, "train.stop_after_epochs": 1}))
    assert written == [(0, 2, 2), (0, 4, 4)]            # step 5 ends the epoch: epoch_0001.pt + last.pt


def test_sampler_starts_mid_epoch_without_decoding_skipped_images(tiny_config, monkeypatch):
    import fastssl.data.imagefolder as imagefolder
    from fastssl.data import build_loader, resolve_paths
    cfg = tiny_config()
    train_dir, _ = resolve_paths(cfg.data, log=lambda *_: None)
    loader = build_loader(cfg.data, train_dir, size=16, batch_size=32, seed=3, train=True)
    loader.set_epoch(1)
    every = [(idx.clone(), views[0].clone()) for views, _, idx in loader]
    decoded = []
    real = imagefolder.load_rgb
    monkeypatch.setattr(imagefolder, "load_rgb", lambda path: decoded.append(path) or real(path))
    loader.set_epoch(1, start_batch=3)
    rest = [(idx, views[0]) for views, _, idx in loader]
    assert len(loader) == 2 and len(decoded) == 2 * 32
    for (i1, v1), (i2, v2) in zip(every[3:], rest):
        assert torch.equal(i1, i2) and torch.equal(v1, v2)


def test_sampler_shards_are_slices_of_the_global_batches():
    from fastssl.data.imagefolder import EpochSampler
    single = EpochSampler(100, seed=7, batch_size=24)
    single.set_epoch(2)
    whole = list(single)
    assert len(whole) == len(single) == 96                      # 4 global batches, remainder dropped
    shards = []
    for rank in range(3):
        s = EpochSampler(100, seed=7, batch_size=8, rank=rank, world_size=3)
        s.set_epoch(2)
        shards.append(list(s))
        assert len(shards[-1]) == len(s) == 32
    for k in range(4):
        assert sum((sh[8 * k:8 * (k + 1)] for sh in shards), []) == whole[24 * k:24 * (k + 1)]
    s = EpochSampler(100, seed=7, batch_size=8, rank=1, world_size=3)
    s.set_epoch(2, start_batch=2)
    assert list(s) == shards[1][16:] and len(s) == 16


def test_corrupt_last_falls_back_to_the_newest_readable_epoch_checkpoint(tmp_path):
    import logging
    from fastssl.train.checkpoint import find_and_load
    for epoch in (1, 2):
        save_checkpoint({"model": {}, "optimizer": {}, "epoch": epoch, "step": 5 * epoch}, tmp_path, epoch, keep=3)
    folder = tmp_path / "checkpoints"
    (folder / "last.pt").write_bytes((folder / "last.pt").read_bytes()[:100])         # truncated
    (folder / "epoch_0002.pt").write_bytes(b"garbage")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("fastssl").addHandler(handler)
    try:
        path, state = find_and_load(True, tmp_path)
    finally:
        logging.getLogger("fastssl").removeHandler(handler)
    assert path == folder / "epoch_0001.pt" and state["step"] == 5
    messages = [r.getMessage() for r in records]
    assert any(f"checkpoint {folder / 'last.pt'} is corrupt or truncated" in m for m in messages)
    assert any("falling back to" in m and "epoch_0001.pt" in m and r.levelname == "WARNING"
               for m, r in zip(messages, records))
    (folder / "epoch_0001.pt").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="no readable checkpoint in"):
        find_and_load(True, tmp_path)
    with pytest.raises(RuntimeError, match="corrupt or truncated"):           # an explicit path stays strict
        find_and_load(str(folder / "last.pt"), tmp_path)


def test_resume_auto_starts_fresh_only_without_checkpoints(tmp_path):
    from fastssl.config import load_config
    from fastssl.train.checkpoint import find_and_load
    assert load_config(None, ["train.resume=auto"]).train.resume == "auto"
    assert find_and_load("auto", tmp_path) == (None, None)
    with pytest.raises(FileNotFoundError, match="train.resume: no checkpoint at"):
        find_and_load(True, tmp_path)
    save_checkpoint({"model": {}, "optimizer": {}, "epoch": 1, "step": 5}, tmp_path, 1)
    path, state = find_and_load("auto", tmp_path)
    assert path.name == "last.pt" and state["epoch"] == 1


def test_rng_states_round_trip(tmp_path):
    import random
    import numpy as np
    from fastssl.train.checkpoint import rng_state, set_rng_state
    save_atomic({"rng": rng_state()}, tmp_path / "r.pt")
    expected = (torch.rand(3), random.random(), np.random.rand(2))
    set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    again = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1] and (expected[2] == again[2]).all()


def test_sigterm_checkpoints_and_exits_cleanly_then_resume_matches(tiny_config, tmp_path):
    import os
    import signal
    import time
    overrides = {"train.threads": 1, "train.epochs": 2}
    threads = torch.get_num_threads()
    try:
        full = tiny_config(**overrides, **{"run.dir": str(tmp_path / "full")})
        train(full)
        cfg = tiny_config(**overrides, **{"run.dir": str(tmp_path / "sig")})
        args = [f"{k}={json.dumps(v) if isinstance(v, list) else v}"
                for k, v in flatten(to_dict(cfg)).items() if k != "train.resume"]
        proc = subprocess.Popen([sys.executable, "-m", "fastssl", "train", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        metrics = tmp_path / "sig" / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and '"event": "train"' in metrics.read_text():
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert re.search(r"SIGTERM: wrote .*last\.pt at epoch 1, batch \d/5, step \d; continue with the same "
                         r"command plus train.resume=true", err), err[-2000:]
        assert "kNN top-1" not in out
        state = load_checkpoint(tmp_path / "sig" / "checkpoints" / "last.pt")
        assert 0 < state["step"] < 10
        train(tiny_config(**overrides, **{"run.dir": str(tmp_path / "sig"), "train.resume": True}))
    finally:
        torch.set_num_threads(threads)
    assert_same_model(final_model(tmp_path / "full"), final_model(tmp_path / "sig"))
    assert [r["loss"] for r in train_records(tmp_path / "sig")] == [r["loss"] for r in train_records(tmp_path / "full")]


# --- non-finite losses ---------------------------------------------------------------------------

def test_a_single_non_finite_step_is_skipped_and_training_continues(tiny_config, monkeypatch):
    from fastssl.methods import simclr
    calls = []
    real_forward = simclr.SimCLR.forward

    def forward(self, views):
        loss, stats = real_forward(self, views)
        calls.append(1)
        return (loss * float("nan"), stats) if len(calls) == 3 else (loss, stats)

    monkeypatch.setattr(simclr.SimCLR, "forward", forward)
    cfg = tiny_config(**{"train.epochs": 1})
    results = train(cfg)
    assert 0 <= results["knn_top1"] <= 100
    lines = [json.loads(line) for line in (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in lines if r["event"] == "nonfinite"]
    assert len(skipped) == 1 and skipped[0]["step"] == 2 and skipped[0]["in_a_row"] == 1
    assert len(train_records(Path(cfg.run.dir))) == 5
    assert "step skipped" in (Path(cfg.run.dir) / "train.log").read_text()


def test_non_finite_step_makes_no_update(tiny_config):
    from fastssl.optim import build_optimizer
    from fastssl.methods import build_augment, build_method as build_model
    from fastssl.train.trainer import train_step
    cfg = tiny_config()
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg.optim, 0.5)
    views = [torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8) for _ in range(2)]
    kwargs = dict(model=model, optimizer=optimizer, scaler=None, augment=build_augment(cfg),
                  device=torch.device("cpu"), autocast_dtype=None)
    train_step(views, 0, 0, **kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    real_forward = model.forward
    model.forward = lambda x: (lambda out: (out[0] * float("inf"), out[1]))(real_forward(x))
    loss, _ = train_step(views, 1, 0, **kwargs)
    assert loss == float("inf") or loss != loss
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(m, optimizer.state[p]["momentum_buffer"]) for m, p in zip(momentum, model.parameters()))


# --- options: gradient clipping, compile, TensorBoard, fp16 ------------------------------------

def test_grad_clip_bounds_the_update(tiny_config):
    from fastssl.optim import build_optimizer
    from fastssl.methods import build_augment, build_method as build_model
    from fastssl.train.trainer import train_step
    cfg = tiny_config(**{"optim.name": "sgd", "optim.momentum": 0.0, "optim.weight_decay": 0.0,
                         "train.grad_clip": 0.01})
    model = build_model(cfg)
    before = [p.detach().clone() for p in model.parameters()]
    views = [torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8) for _ in range(2)]
    _, stats = train_step(views, 0, 0, model=model, optimizer=build_optimizer(model, cfg.optim, 1.0), scaler=None,
                          augment=build_augment(cfg), device=torch.device("cpu"), autocast_dtype=None,
                          grad_clip=cfg.train.grad_clip)
    assert stats["grad_norm"] > 0.01
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert moved.item() == pytest.approx(0.01, rel=1e-3)             # lr 1 x the clipped norm


def test_compile_option_wraps_the_model(tiny_config, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    assert train(tiny_config(**{"train.compile": True, "train.stop_after_steps": 1})) == {}
    assert len(compiled) == 1


def test_tensorboard_missing_is_a_clear_error(tiny_config):
    try:
        import torch.utils.tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="run.tensorboard=true needs the `tensorboard` package"):
        train(tiny_config(**{"run.tensorboard": True}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a gradient scaler needs CUDA")
def test_fp16_scaler_run_on_gpu(tiny_config):
    cfg = tiny_config(**{"train.device": "cuda", "train.precision": "fp16", "train.stop_after_steps": 3,
                         "train.grad_clip": 1.0})
    assert train(cfg) == {}
    records = train_records(Path(cfg.run.dir))
    assert len(records) == 3 and all("gpu_mem_peak_gib" in r and "grad_norm" in r for r in records)
    assert load_checkpoint(Path(cfg.run.dir) / "checkpoints" / "last.pt")["scaler"]


def test_sigusr1_stops_at_the_next_step_boundary(tiny_config, monkeypatch):
    import os
    import signal
    from fastssl.methods import simclr
    calls = []
    real_forward = simclr.SimCLR.forward

    def forward(self, views):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)      # arrives mid-step; the step completes first
        return real_forward(self, views)

    monkeypatch.setattr(simclr.SimCLR, "forward", forward)
    before = signal.getsignal(signal.SIGUSR1)
    cfg = tiny_config()
    assert train(cfg) == {}
    assert signal.getsignal(signal.SIGUSR1) == before                 # the handler is restored
    state = load_checkpoint(Path(cfg.run.dir) / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (0, 2, 2)
    assert "SIGUSR1: wrote" in (Path(cfg.run.dir) / "train.log").read_text()


def test_fused_augmentation_gives_the_reference_loss_curve(tiny_config):
    """Golden parity: the same two steps with augment.backend=fused (Triton: compiled where CUDA is,
    interpreted on the CPU otherwise) and kornia give the same losses within fp32 rounding of the
    views (both draw the same parameters)."""
    from fastssl.optim import build_optimizer
    from fastssl.methods import build_augment, build_method as build_model
    from fastssl.train.trainer import train_step
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = tiny_config()
    views = [torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(i)).to(device) for i in range(2)]
    curves = {}
    for backend in ("kornia", "fused"):
        model = build_model(cfg).to(device)
        optimizer = build_optimizer(model, cfg.optim, 0.5)
        # TF32 convolutions on a GPU (~5e-4 relative) would swamp the views' fp32 differences.
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            curves[backend] = [train_step(views, step, 0, model=model, optimizer=optimizer, scaler=None,
                                          augment=build_augment(cfg), augment_backend=backend,
                                          device=device, autocast_dtype=None)[0] for step in range(2)]
    assert curves["fused"] == pytest.approx(curves["kornia"], rel=1e-4)
    assert curves["kornia"][0] != curves["kornia"][1]


def test_augment_backend_auto_is_kornia_on_cpu():
    from fastssl.train.trainer import resolve_augment_backend
    assert resolve_augment_backend("auto", torch.device("cpu")) == "kornia"
    assert resolve_augment_backend("fused", torch.device("cpu")) == "fused"


def test_per_view_recipe_from_yaml(tiny_config, tmp_path):
    """BYOL's asymmetric views in YAML: each view gets its own blur/solarise; training runs on them."""
    from fastssl.config import ConfigError, load_config
    from fastssl.methods import build_augment
    path = tmp_path / "byol_views.yaml"
    path.write_text("augment:\n  views:\n    - {blur_p: 1.0, solarize_p: 0.0}\n    - {blur_p: 0.1, solarize_p: 0.2}\n")
    views = build_augment(load_config(path)).views
    assert [(v.blur_p, v.solarize_p) for v in views] == [(1.0, 0.0), (0.1, 0.2)]
    assert all(v.jitter_strength == 1.0 and not v.crop for v in views)     # the rest from the section
    cfg = tiny_config(**{"augment.views": [{"blur_p": 1.0}, {"blur_p": 0.1, "solarize_p": 0.2}],
                         "train.epochs": 1})
    assert train(cfg)["knn_top1"] >= 0
    for views, message in [([{"blurp": 1.0}, {}], r"augment.views\[0\].blurp: unknown setting"),
                           ([{"blur_p": 2.0}, {}], r"augment.views\[0\].blur_p: a probability"),
                           ([{"size": 8}, {}], "2 views of the same size, got 8 and 16 px"),
                           ([{}, {}, {}], "method simclr takes exactly 2 views, got 3")]:
        with pytest.raises(ConfigError, match=message):
            build_augment(tiny_config(**{"augment.views": views}))
    with pytest.raises(ConfigError, match=r"augment.views\[0\]: expected a mapping"):
        tiny_config(**{"augment.views": [1.0]})
