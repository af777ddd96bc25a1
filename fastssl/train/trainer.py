"""The trainer: `train` -> `train_epoch` -> `train_step`. It orchestrates loader, augmentation,
method, optimiser, checkpoints and evaluation; the algorithms live in their own modules.

Every random choice derives from `train.seed`: the model initialisation, the data order and
crops (per epoch, in the loader), and the augmentation parameters (per step, below). So a run
resumed from a checkpoint continues exactly as the uninterrupted run would have, from the end
of an epoch or from a position within one (`train.checkpoint_every_steps`, SIGTERM/SIGUSR1,
`train.stop_after_steps`): the loader starts at the saved batch without reading the ones before.

A non-finite loss skips its step; `train.max_nonfinite_steps` of them in a row raise
NonFiniteLossError. Under torchrun (WORLD_SIZE > 1) `train.batch_size` is the global batch, each
rank trains on its slice of every global batch (fastssl.train.distributed), and rank 0 alone
logs, writes metrics and checkpoints, and evaluates.
"""
import json
import logging
import math
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict

import torch

from fastssl.config import Config, ConfigError, save_config, to_dict
from fastssl.data import build_loader, resolve_paths
from fastssl.data.badimages import SkippedImages
from fastssl.eval.commands import eval_loaders, eval_preprocess, knn_top1, on_device, pretext_lines
from fastssl.eval.knn import extract_features, with_estimated_batch_norm
from fastssl.methods import Method, build_augment, build_method, view_crops
from fastssl.optim import build_optimizer, lr_at, scaled_lr
from fastssl.train.checkpoint import find_and_load, rng_state, save_checkpoint, save_last, set_rng_state
from fastssl.train.distributed import (DistInfo, barrier, cleanup, convert_sync_batchnorm, gather_objects,
                                       gather_rows, init_distributed, local_device)
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


def resolve_augment_backend(name: str, device: torch.device) -> str:
    """`auto`: the fused Triton kernels on CUDA, the Kornia reference elsewhere (logged)."""
    if name != "auto":
        return name
    chosen = "fused" if device.type == "cuda" else "kornia"
    log.info("augment.backend=auto: using %s on %s", chosen, device.type)
    return chosen


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
    """Appends JSON lines to run_dir/metrics.jsonl (and, with `tensorboard`, scalars to run_dir/tensorboard)."""

    def __init__(self, path: Path, tensorboard: bool = False):
        self.path = path
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("run.tensorboard=true needs the `tensorboard` package (pip install "
                                   f"tensorboard), or set run.tensorboard=false ({exc})") from None
            self.writer = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, **record) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None and "step" in record:
            for key, value in record.items():
                if key not in ("event", "epoch", "step") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record['event']}/{key}", value, record["step"])
            self.writer.flush()


class StopSignal:
    """SIGTERM / SIGUSR1 set a flag; the loop checkpoints at the next step boundary and exits cleanly."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def resolve_schedule(cfg: Config, steps_per_epoch: int) -> Dict[str, float]:
    """Peak lr (scaled by the GLOBAL batch), warm-up steps and total steps of the run."""
    peak_lr = scaled_lr(cfg.optim.lr, cfg.train.batch_size, cfg.optim.lr_scaling)
    return {"peak_lr": peak_lr, "warmup_steps": round(cfg.optim.warmup_epochs * steps_per_epoch),
            "total_steps": steps_per_epoch * cfg.train.epochs}


def unwrap(model):
    """The method's module inside torch.compile's and DistributedDataParallel's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def train(cfg: Config) -> Dict[str, float]:
    """Pre-train, checkpoint every epoch, evaluate by kNN; returns the final metrics ({} when stopped early).

    Under torchrun (WORLD_SIZE > 1) every rank calls this; rank 0 alone logs, writes metrics and
    checkpoints, and evaluates.
    """
    device = resolve_device(cfg.train.device)
    dist_info = init_distributed(device)
    try:
        with StopSignal() as stop:
            return _train(cfg, local_device(device, dist_info), dist_info, stop)
    finally:
        cleanup(dist_info)


def _train(cfg: Config, device: torch.device, dist_info: DistInfo, stop: StopSignal) -> Dict[str, float]:
    run_dir = Path(cfg.run.dir)
    main = dist_info.is_main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(run_dir)
        save_config(cfg, run_dir / "config.yaml")
    else:
        log.setLevel(logging.WARNING)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    autocast_dtype, use_scaler = resolve_precision(cfg.train.precision, device)
    world = dist_info.world_size
    if cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is the global batch and must be divisible "
                         f"by the number of processes ({world})")
    local_batch = cfg.train.batch_size // world

    augment = build_augment(cfg)
    model = build_method(cfg)
    if dist_info.enabled and model.needs_global_batch_norm and not cfg.train.sync_bn:
        raise ConfigError(f"train.sync_bn=false: method {cfg.method.name} needs batch statistics over the "
                          "global batch under torchrun (per-process statistics leak the positive key); "
                          "set train.sync_bn=true")
    train_dir, val_dir = resolve_paths(cfg.data, log=log.info)
    skipped = SkippedImages(run_dir / ("skipped_images.tsv" if main else f"skipped_images.rank{dist_info.rank}.tsv"))
    loader = build_loader(cfg.data, train_dir, size=cfg.augment.size, batch_size=local_batch,
                          seed=cfg.train.seed, views=view_crops(augment), device=device, train=True,
                          rank=dist_info.rank, world_size=world, skipped=skipped)
    if dist_info.enabled and cfg.train.sync_bn:
        model = convert_sync_batchnorm(model, device)
    model = model.to(device).to(memory_format=torch.channels_last)
    steps_per_epoch = loader.batches_per_epoch()
    schedule = resolve_schedule(cfg, steps_per_epoch)
    model.set_schedule(steps_per_epoch, schedule["total_steps"])
    optimizer = build_optimizer(model, cfg.optim, schedule["peak_lr"])
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    log.info("method %s, %d view(s) of %s px", cfg.method.name, len(augment),
             "/".join(str(size) for size in sorted({v.size for v in augment.views}, reverse=True)))
    log.info("%d training images (%s), %d steps/epoch (global batch %d = %d process(es) x %d), %d epochs; "
             "peak lr %.4g (%s scaling of %g), %d warm-up steps, %d steps in all; device %s",
             len(loader.samples), train_dir, steps_per_epoch, cfg.train.batch_size, world, local_batch,
             cfg.train.epochs, schedule["peak_lr"], cfg.optim.lr_scaling, cfg.optim.lr, schedule["warmup_steps"],
             schedule["total_steps"], device)
    if world > 1 and len(loader.samples) % cfg.train.batch_size:
        log.info("each epoch drops the last %d images of its permutation (not a whole global batch)",
                 len(loader.samples) % cfg.train.batch_size)

    start_epoch, start_batch, step = 0, 0, 0
    path, state = find_and_load(cfg.train.resume, run_dir, map_location=device)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rng = state.get("rng")
        if isinstance(rng, list):       # one state per rank; a different world size restarts from rank 0's
            rng = rng[dist_info.rank] if len(rng) == world else rng[0]
        set_rng_state(rng)
        start_epoch, start_batch, step = state["epoch"], state.get("batch", 0), state["step"]
        log.info("resumed from %s at epoch %d, batch %d, step %d", path, start_epoch + 1, start_batch, step)
    if dist_info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    if cfg.train.compile:
        log.info("train.compile=true: compiling the model (the first steps take longer)")
        model = torch.compile(model)
    metrics = Metrics(run_dir / "metrics.jsonl", cfg.run.tensorboard) if main else None
    if main:
        metrics.write(event="start", epoch=start_epoch, step=step, world_size=world,
                      batch_size=cfg.train.batch_size, steps_per_epoch=steps_per_epoch, **schedule)

    def checkpoint(epoch_done: int, batch: int, step: int) -> Path:
        """The state at global `step`, after `batch` batches of epoch index `epoch_done` (batch 0: the
        end of epoch `epoch_done`, numbered epoch_NNNN.pt). Every rank calls it, since the RNG
        states of every rank are gathered into the checkpoint; rank 0 alone writes it."""
        rng = gather_objects(rng_state(), dist_info)
        if not main:
            return None
        state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler else None, "epoch": epoch_done, "batch": batch,
                 "step": step, "rng": rng, "config": to_dict(cfg)}
        if batch == 0:
            return save_checkpoint(state, run_dir, epoch_done, keep=cfg.run.keep_checkpoints)
        return save_last(state, run_dir)

    context = dict(model=model, optimizer=optimizer, scaler=scaler, augment=augment,
                   augment_backend=resolve_augment_backend(cfg.augment.backend, device), device=device,
                   autocast_dtype=autocast_dtype, metrics=metrics, dist_info=dist_info, stop=stop,
                   checkpoint=checkpoint, counters={"nonfinite_run": 0}, **schedule)
    end_epoch = min(cfg.train.epochs, cfg.train.stop_after_epochs or cfg.train.epochs)
    stopped = None
    method = unwrap(model)
    features_of_training_set = training_features(cfg, train_dir, device, dist_info, skipped)
    for epoch in range(start_epoch, end_epoch):
        if start_batch == 0:
            for param in method.before_epoch(epoch, features_of_training_set):
                optimizer.state.pop(param, None)        # re-initialised: its momentum is stale
        loader.set_epoch(epoch, start_batch, method.epoch_order(epoch))
        step, batch, stopped = train_epoch(cfg, loader, epoch, step, start_batch, **context)
        start_batch = 0
        if stopped and batch < steps_per_epoch:
            saved = checkpoint(epoch, batch, step)
            barrier(dist_info)
            log.info("%s: wrote %s at epoch %d, batch %d/%d, step %d; continue with the same command plus "
                     "train.resume=true (run.dir=%s)", stopped, saved, epoch + 1, batch, steps_per_epoch, step,
                     run_dir)
            return {}
        checkpoint(epoch + 1, 0, step)
        if main:
            every = cfg.eval.knn_every_epochs
            if every and (epoch + 1) % every == 0 and epoch + 1 < cfg.train.epochs:
                monitor = evaluate(cfg, unwrap(model), val_dir, device, random_init=False, skipped=skipped)
                metrics.write(event="knn", epoch=epoch + 1, step=step, **monitor)
                log.info("epoch %d: kNN top-1 %.1f%%", epoch + 1, monitor["knn_top1"])
        if stopped:
            barrier(dist_info)
            log.info("%s: wrote the checkpoint of epoch %d (step %d); continue with the same command plus "
                     "train.resume=true (run.dir=%s)", stopped, epoch + 1, step, run_dir)
            return {}

    if end_epoch < cfg.train.epochs:
        log.info("stopped after epoch %d of %d (train.stop_after_epochs); continue with train.resume=true",
                 end_epoch, cfg.train.epochs)
        return {}
    results = {}
    if main:
        results = evaluate(cfg, unwrap(model), val_dir, device, skipped=skipped)
        metrics.write(event="eval", epoch=cfg.train.epochs, step=step, skipped_images=len(skipped), **results)
    if skipped:
        log.warning("skipped %d unreadable image(s), listed in %s", len(skipped), skipped.path)
    barrier(dist_info)
    return results


def training_features(cfg: Config, train_dir, device: torch.device, dist_info: DistInfo,
                      skipped: SkippedImages = None):
    """`features(net)`: net's fp32 features of every training image, rows in dataset order, on
    every rank: one centre view per image (as evaluated), normalised like the views, eval mode.
    Under torchrun each rank computes its share and the shares are gathered (a collective).
    The loader is built at the first call (most methods never make one)."""
    loader = None

    def features(net: torch.nn.Module) -> torch.Tensor:
        nonlocal loader
        if loader is None:
            loader = build_loader(cfg.data, train_dir, size=cfg.augment.size, batch_size=cfg.eval.batch_size,
                                  device=device, train=False, rank=dist_info.rank, world_size=dist_info.world_size,
                                  skipped=skipped)
        rows, _ = extract_features(net, loader, eval_preprocess(cfg), normalize=False)
        n = len(loader.samples)
        # the evaluation loader's share of this rank: images rank, rank + W, ...
        return gather_rows(rows, torch.arange(dist_info.rank, n, dist_info.world_size), n, dist_info)

    return features


def train_epoch(cfg: Config, loader, epoch: int, step: int, start_batch: int = 0, *, model, optimizer, scaler,
                augment, augment_backend, device, autocast_dtype, metrics, peak_lr, warmup_steps, total_steps,
                dist_info: DistInfo = DistInfo(), stop: StopSignal = None, checkpoint=None, counters=None):
    """The batches of one epoch from `start_batch` on; returns (global step, batches of the epoch
    done, the name of the reason to stop early or None). `counters['nonfinite_run']` carries the
    count of consecutive non-finite steps from one epoch to the next."""
    counters = counters if counters is not None else {}
    model.train()
    main = dist_info.is_main
    steps_per_epoch = loader.batches_per_epoch()
    progress = Progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.train.epochs}") if main else None
    window_images, window_start, data_wait = 0, time.perf_counter(), 0.0
    fetch_start = time.perf_counter()
    batch, nonfinite_run = start_batch, counters.get("nonfinite_run", 0)
    collapse_warned = False
    for views, _, indices in loader:
        data_wait += time.perf_counter() - fetch_start
        lr = lr_at(step, peak_lr, warmup_steps, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, stats = train_step(views, step, cfg.train.seed, model=model, optimizer=optimizer, scaler=scaler,
                                 augment=augment, augment_backend=augment_backend, device=device,
                                 autocast_dtype=autocast_dtype, shard=(dist_info.rank, dist_info.world_size),
                                 grad_clip=cfg.train.grad_clip, indices=indices)
        if device.type == "cuda":
            stats["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if not math.isfinite(loss):
            nonfinite_run += 1
            log.warning("non-finite loss (%s) at epoch %d, step %d (lr %.4g): step skipped (%d in a row, "
                        "the limit train.max_nonfinite_steps is %d)", loss, epoch + 1, step, lr, nonfinite_run,
                        cfg.train.max_nonfinite_steps)
            if main:
                metrics.write(event="nonfinite", epoch=epoch + 1, step=step, loss=str(loss), lr=lr,
                              in_a_row=nonfinite_run)
            if nonfinite_run >= cfg.train.max_nonfinite_steps:
                raise NonFiniteLossError(f"non-finite loss ({loss}) at epoch {epoch + 1}, step {step} "
                                         f"(lr {lr:.4g}): {nonfinite_run} consecutive steps "
                                         f"(train.max_nonfinite_steps); lower optim.lr or check the data")
        else:
            nonfinite_run = 0
        counters["nonfinite_run"] = nonfinite_run
        step += 1
        batch += 1
        window_images += views[0].shape[0] * dist_info.world_size
        elapsed = time.perf_counter() - window_start
        if main:
            progress.update(batch, loss=loss, lr=lr, **{"img/s": round(window_images / max(elapsed, 1e-9))})
        if main and (step % cfg.train.log_every == 0 or batch == steps_per_epoch):
            collapse = unwrap(model).collapse_warning(stats)
            if collapse and not collapse_warned:       # once per epoch; the metrics keep every value
                log.warning("epoch %d, step %d: %s", epoch + 1, step, collapse)
                collapse_warned = True
            metrics.write(event="train", epoch=epoch + 1, step=step, loss=loss, lr=lr,
                          images_per_s=window_images / max(elapsed, 1e-9),
                          data_wait_share=data_wait / max(elapsed, 1e-9), **stats)
            window_images, window_start, data_wait = 0, time.perf_counter(), 0.0
        reason = stop_reason(cfg, step, stop, dist_info)
        if reason:
            return step, batch, reason
        if (checkpoint is not None and cfg.train.checkpoint_every_steps and batch < steps_per_epoch
                and step % cfg.train.checkpoint_every_steps == 0):
            checkpoint(epoch, batch, step)
        fetch_start = time.perf_counter()
    if main:
        log.info("epoch %d/%d done in %.1fs", epoch + 1, cfg.train.epochs, progress.elapsed())
    return step, batch, None


def stop_reason(cfg: Config, step: int, stop: StopSignal, dist_info: DistInfo):
    """'SIGTERM' / 'SIGUSR1' when a signal arrived (on any rank), 'train.stop_after_steps' at that step."""
    received = stop.received if stop is not None else None
    if dist_info.enabled:        # every rank must stop at the same step
        flag = torch.tensor([1.0 if received else 0.0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and not received:
            received = "a signal on another rank"
    if received:
        return received
    if cfg.train.stop_after_steps and step >= cfg.train.stop_after_steps:
        return "train.stop_after_steps"
    return None


def train_step(views, step: int, seed: int, *, model, optimizer, scaler, augment, device, autocast_dtype,
               augment_backend: str = "kornia", shard=(0, 1), grad_clip: float = 0.0, indices=None):
    """Augment the views, forward, backward, optimiser step, the method's own updates (after_step).
    Returns (loss value, stats).

    A non-finite loss skips the update and the method's after_step (with fp16 the gradient scaler
    skips the update) and is returned as it is, for the caller to count. With `shard=(rank, world)` the views are this rank's rows
    of the global batch: their augmentation parameters are rows [rank*n, (rank+1)*n) of those
    drawn for the whole global batch, and the returned loss is the mean over ranks. `grad_clip` > 0
    clips the global gradient norm (reported as stats['grad_norm'], before clipping). `indices`: the
    views' dataset indices, for a method that `needs_indices`.
    """
    rank, world = shard
    method = unwrap(model)
    method.before_step(step)
    gen = augment_generator(seed, step)
    n = views[0].shape[0]
    x = []
    for view_augment, v in zip(augment.views, views):
        params = view_augment.sample(n * world, gen)
        if world > 1:
            params = {k: t[rank * n:(rank + 1) * n] for k, t in params.items()}
        x.append(view_augment.apply(v, params, backend=augment_backend, channels_last=True))
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with amp:
        loss, stats = model(x, indices) if method.needs_indices else model(x)
    optimizer.zero_grad(set_to_none=True)
    value = loss.detach().float()
    if world > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= world
    value = value.item()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if scaler is not None:
        scaler.scale(loss).backward()
        method.before_optimizer_step()
        if grad_clip:
            scaler.unscale_(optimizer)
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, grad_clip).item()
        scaler.step(optimizer)
        scaler.update()
        if math.isfinite(value):
            method.after_step()
    elif math.isfinite(value):
        loss.backward()
        method.before_optimizer_step()
        if grad_clip:
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, grad_clip).item()
        optimizer.step()
        method.after_step()
    elif world > 1:
        # Skipped on every rank (the loss is averaged over ranks first), but DDP expects the backward
        # that its forward prepared: run it, and drop the (non-finite) gradients without a step.
        loss.backward()
        optimizer.zero_grad(set_to_none=True)
    return value, stats


def evaluate(cfg: Config, model: Method, val_dir, device, random_init: bool = True,
             skipped: SkippedImages = None) -> Dict[str, float]:
    """kNN top-1 of the trained method's evaluated backbone and (unless `random_init=False`) of
    the same architecture at its random initialisation, as built and (eval.random_init_bn) with
    its batch-norm statistics re-estimated on the training images, and the pretext tasks'
    held-out lines."""
    loaders = eval_loaders(cfg, device, skipped)
    log.info("kNN evaluation (k=%d, t=%g) on %s", cfg.eval.knn_k, cfg.eval.knn_temperature, val_dir)
    trained = knn_top1(cfg, model.eval_backbone(), loaders)
    if not random_init:
        return {"knn_top1": trained}
    pretext = pretext_lines(model, loaders[1])
    for line in pretext:
        log.info(line)
    with torch.random.fork_rng(devices=[]):      # build_method seeds the global RNG
        untrained = on_device(build_method(cfg).eval_backbone(), device)
    results = {"knn_top1": trained, "knn_top1_random_init": knn_top1(cfg, untrained, loaders)}
    if cfg.eval.random_init_bn:
        fitted = with_estimated_batch_norm(untrained, loaders[0], eval_preprocess(cfg))
        results["knn_top1_random_init_bn"] = knn_top1(cfg, fitted, loaders)
        log.info("kNN top-1 of random-init with batch-norm statistics of the training images: %.1f%%",
                 results["knn_top1_random_init_bn"])
    return {**results, **({"pretext": pretext} if pretext else {})}
