"""End-to-end: a short run learns, resume continues exactly, checkpoints are safe, the CLI prints its line."""
import json
from pathlib import Path
import re
import subprocess
import sys

import pytest
import torch

from fastssl.train import NonFiniteLossError, train
from fastssl.train.checkpoint import load_checkpoint, save_atomic, save_checkpoint


def train_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "train"]


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
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* at epoch 1, step \d"):
        train(tiny_config(**{"optim.lr": 1e30, "optim.name": "sgd", "optim.warmup_epochs": 0}))


def test_cli_prints_the_final_line(tiny_config, tmp_path):
    cfg = tiny_config(**{"train.epochs": 1})
    args = [f"data.cache_dir={cfg.data.cache_dir}", "data.workers=0", "data.embedded_train_per_class=16",
            "data.embedded_val_per_class=6", "data.embedded_image_size=16", "augment.size=16",
            "model.backbone=resnet18", "model.proj_hidden_dim=32", "model.proj_dim=16", "train.epochs=1",
            "train.batch_size=32", "train.device=cpu", "eval.knn_k=10", f"run.dir={tmp_path / 'cli'}"]
    out = subprocess.run([sys.executable, "-m", "fastssl", "train", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"kNN top-1: simclr=\d+\.\d% random-init=\d+\.\d%", out.stdout.strip().splitlines()[-1])
    bad = subprocess.run([sys.executable, "-m", "fastssl", "train", "train.epoch=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "did you mean 'train.epochs'" in bad.stderr


def test_bf16_autocast_step_on_cpu(tiny_config):
    from fastssl.optim import build_optimizer
    from fastssl.train.trainer import build_augment, build_model, resolve_precision, train_step
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
