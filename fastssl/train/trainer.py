"""The trainer: `train` -> `train_epoch` -> `train_step`. It orchestrates loader, augmentation,
method, optimiser, checkpoints and evaluation; the algorithms live in their own modules.

Every random choice derives from `train.seed`: the model initialisation, the data order and
crops (per epoch, in the loader), and the augmentation parameters (per step, below). So a run
resumed from a checkpoint continues exactly as the uninterrupted run would have.
"""
import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict

import torch

from fastssl.augment import SimCLRAugment, normalize
from fastssl.config import Config, save_config, to_dict
from fastssl.data import build_loader, resolve_paths
from fastssl.eval import extract_features, knn_accuracy
from fastssl.losses import BACKENDS
from fastssl.methods import SimCLR
from fastssl.optim import build_optimizer, lr_at, scaled_lr
from fastssl.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from fastssl.train.progress import Progress

log = logging.getLogger("fastssl")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message says at which epoch and step."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but no CUDA device is available; use cpu or auto")
    return device


def resolve_precision(precision: str, device: torch.device):
    """(autocast dtype or None, use a gradient scaler). `auto`: bf16 on CUDA, fp32 on CPU."""
    if precision == "auto":
        # bf16 autocast on CPUs without native bf16 instructions is 10x slower than fp32.
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        log.info("train.precision=auto: using %s on %s", precision, device.type)
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision], precision == "fp16"


def augment_generator(seed: int, step: int) -> torch.Generator:
    """The generator that draws step `step`'s augmentation parameters (independent of the loader's)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) + (1 << 40))


def build_model(cfg: Config) -> SimCLR:
    """The SimCLR model, initialised from `train.seed` (so the random-init baseline is reproducible)."""
    if cfg.loss.backend not in BACKENDS:
        raise ValueError(f"loss.backend: unknown backend {cfg.loss.backend!r}; choose one of {', '.join(BACKENDS)}")
    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    return SimCLR(m.backbone, m.stem, m.proj_hidden_dim, m.proj_dim, m.proj_layers,
                  cfg.loss.temperature, cfg.loss.backend)


def build_augment(cfg: Config) -> SimCLRAugment:
    """The recipe from `augment.*`; the loader already cut the random crops, so crop=False here."""
    return SimCLRAugment(**to_dict(cfg)["augment"], crop=False)


def setup_logging(run_dir: Path) -> None:
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(run_dir / "train.log")):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    logging.getLogger("fastssl.losses").setLevel(logging.INFO)
    log.propagate = False


class Metrics:
    """Appends JSON lines to run_dir/metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, **record) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def train(cfg: Config) -> Dict[str, float]:
    """Pre-train, checkpoint every epoch, evaluate by kNN; returns the final metrics ({} when stopped early)."""
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir)
    save_config(cfg, run_dir / "config.yaml")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    autocast_dtype, use_scaler = resolve_precision(cfg.train.precision, device)

    train_dir, val_dir = resolve_paths(cfg.data, log=log.info)
    loader = build_loader(cfg.data, train_dir, size=cfg.augment.size, batch_size=cfg.train.batch_size,
                          seed=cfg.train.seed, scale=cfg.augment.crop_scale, ratio=cfg.augment.crop_ratio,
                          device=device, train=True)
    augment = build_augment(cfg)
    model = build_model(cfg).to(device).to(memory_format=torch.channels_last)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * cfg.train.epochs
    peak_lr = scaled_lr(cfg.optim.lr, cfg.train.batch_size, cfg.optim.lr_scaling)
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
    optimizer = build_optimizer(model, cfg.optim, peak_lr)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    log.info("%d training images (%s), %d steps/epoch, %d epochs; peak lr %.4g (%s scaling of %g), "
             "%d warm-up steps; device %s", len(loader.samples), train_dir, steps_per_epoch, cfg.train.epochs,
             peak_lr, cfg.optim.lr_scaling, cfg.optim.lr, warmup_steps, device)

    start_epoch, step = 0, 0
    if cfg.train.resume:
        path = resolve_resume(cfg.train.resume, run_dir)
        state = load_checkpoint(path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, step = state["epoch"], state["step"]
        log.info("resumed from %s at epoch %d, step %d", path, start_epoch, step)

    metrics = Metrics(run_dir / "metrics.jsonl")
    context = dict(model=model, optimizer=optimizer, scaler=scaler, augment=augment, device=device,
                   autocast_dtype=autocast_dtype, metrics=metrics, peak_lr=peak_lr,
                   warmup_steps=warmup_steps, total_steps=total_steps)
    end_epoch = min(cfg.train.epochs, cfg.train.stop_after_epochs or cfg.train.epochs)
    for epoch in range(start_epoch, end_epoch):
        loader.set_epoch(epoch)
        step = train_epoch(cfg, loader, epoch, step, **context)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler else None, "epoch": epoch + 1, "step": step,
                 "config": to_dict(cfg)}
        save_checkpoint(state, run_dir, epoch + 1, keep=cfg.run.keep_checkpoints)

    if end_epoch < cfg.train.epochs:
        log.info("stopped after epoch %d of %d (train.stop_after_epochs); continue with train.resume=true",
                 end_epoch, cfg.train.epochs)
        return {}
    results = evaluate(cfg, model, train_dir, val_dir, device)
    metrics.write(event="eval", epoch=cfg.train.epochs, step=step, **results)
    return results


def train_epoch(cfg: Config, loader, epoch: int, step: int, *, model, optimizer, scaler, augment, device,
                autocast_dtype, metrics, peak_lr, warmup_steps, total_steps) -> int:
    """One pass over the loader; returns the global step after it."""
    model.train()
    progress = Progress(len(loader), f"epoch {epoch + 1}/{cfg.train.epochs}")
    window_images, window_start, data_wait = 0, time.perf_counter(), 0.0
    fetch_start = time.perf_counter()
    for i, (views, _, _) in enumerate(loader):
        data_wait += time.perf_counter() - fetch_start
        lr = lr_at(step, peak_lr, warmup_steps, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, stats = train_step(views, step, cfg.train.seed, model=model, optimizer=optimizer, scaler=scaler,
                                 augment=augment, device=device, autocast_dtype=autocast_dtype)
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"non-finite loss ({loss}) at epoch {epoch + 1}, step {step} "
                                     f"(lr {lr:.4g}); lower optim.lr or check the data")
        step += 1
        window_images += views[0].shape[0]
        elapsed = time.perf_counter() - window_start
        progress.update(i + 1, loss=loss, lr=lr, **{"img/s": round(window_images / max(elapsed, 1e-9))})
        if step % cfg.train.log_every == 0 or i + 1 == len(loader):
            metrics.write(event="train", epoch=epoch + 1, step=step, loss=loss, lr=lr,
                          images_per_s=window_images / max(elapsed, 1e-9),
                          data_wait_share=data_wait / max(elapsed, 1e-9), **stats)
            window_images, window_start, data_wait = 0, time.perf_counter(), 0.0
        fetch_start = time.perf_counter()
    log.info("epoch %d/%d done in %.1fs", epoch + 1, cfg.train.epochs, progress.elapsed())
    return step


def train_step(views, step: int, seed: int, *, model, optimizer, scaler, augment, device, autocast_dtype):
    """Augment both views, forward, backward, optimiser step. Returns (loss value, stats)."""
    gen = augment_generator(seed, step)
    n = views[0].shape[0]
    x = [augment.apply(v, augment.sample(n, gen)).contiguous(memory_format=torch.channels_last) for v in views]
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with amp:
        loss, stats = model(x)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.item(), stats


def evaluate(cfg: Config, model: SimCLR, train_dir, val_dir, device) -> Dict[str, float]:
    """kNN top-1 of the trained backbone and of the same architecture at its random initialisation."""
    def loader(root):
        return build_loader(cfg.data, root, size=cfg.augment.size, batch_size=cfg.eval.batch_size,
                            device=device, train=False)

    train_loader, val_loader = loader(train_dir), loader(val_dir)

    def preprocess(images):
        return normalize(images, cfg.augment.mean, cfg.augment.std).contiguous(memory_format=torch.channels_last)

    def knn(backbone):
        train_f, train_y = extract_features(backbone, train_loader, preprocess)
        val_f, val_y = extract_features(backbone, val_loader, preprocess)
        return knn_accuracy(train_f, train_y, val_f, val_y, cfg.eval.knn_k, cfg.eval.knn_temperature)

    log.info("kNN evaluation (k=%d, t=%g) on %s", cfg.eval.knn_k, cfg.eval.knn_temperature, val_dir)
    trained = knn(model.backbone)
    random_init = knn(build_model(cfg).backbone.to(device).to(memory_format=torch.channels_last))
    return {"knn_top1": trained, "knn_top1_random_init": random_init}
