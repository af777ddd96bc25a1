"""Throughput of each stage of the configured pipeline, and of training end to end.

    python benchmarks/throughput.py [--config configs/demo.yaml] [--stage all] [key=value ...]
    python benchmarks/throughput.py --stage data --loader pil,torch,dali,ffcv [data.py options]

Stages (images/s, one image = all its views; `method.name=X` times another method):
  data      the loader alone: decode + the method's random crops, batches on the device
  augment   the GPU-style augmentation of every view of one pre-loaded batch
  model     SimCLR only: backbone + projector forward and backward on pre-augmented views
  loss      SimCLR only: the NT-Xent forward and backward on random projections
  optim     one optimiser step over the model's parameters
  train     the real training step fed by the loader (end to end)
`--stage optim-compare` times one LARS step over ResNet-50's parameters (backbone + the
configured projector: ~28M parameters in 161 tensors) with the multi-tensor implementation
(`optim.impl=foreach`) against the per-parameter loop (`reference`), and `apex` when installed.
`--stage loss-backends -- [loss.py arguments]` runs the sweep of benchmarks/loss.py instead.
`--stage data --loader NAMES` compares the loaders on real JPEGs instead (benchmarks/data.py:
images/s and busy cores of each, next to the PIL DataLoader baseline, in the same run).
Each stage is warmed up, then timed per step: images/s over the timed steps together (a stall
counts in full), and the per-step median, p20 and p80. data, train and train-premade run as the
trainer runs, without synchronising the device between steps (the host's intervals between steps;
`timed`), the others with a synchronisation after each step. train also reports the share of its
time the host spent in the loader (`data_wait_share`, as the trainer's metrics do), and train
against train-premade gives the pipeline's efficiency. The stages fed by the loader (data, train)
warm up past the batches it holds in flight and time at least 8 bursts of its workers' batches
(benchmarks/data.py: `in_flight_batches`, `burst_batches`): a shorter run times batches made
while the other stages ran. A table is printed and a JSON
record (device, versions, git sha, config, command, numbers) is appended to
benchmarks/results/throughput_<device>.json, and rewritten after each stage: a run stopped midway
keeps the stages it timed.
"""
import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import augment as augment_benchmark   # benchmarks/augment.py, data.py and loss.py, beside this file
import data as data_benchmark
import loss as loss_benchmark
from fastssl.config import load_config, to_dict
from fastssl.data import build_loader, resolve_paths
from fastssl.losses import info_nce
from fastssl.methods import build_augment, build_method, view_crops
from fastssl.optim import build_optimizer, scaled_lr
from fastssl.train.distributed import DistInfo
from fastssl.train.trainer import (augment_generator, resolve_augment_backend, training_features,
                                   resolve_device, resolve_precision, train_step)

STAGES = ("data", "augment", "model", "loss", "optim", "train", "train-premade")
# Timed as the trainer runs them, without synchronising the device between steps (`timed`): the
# loader's work on the main thread overlaps the device's work, as it does in training.
PIPELINED = ("data", "train", "train-premade")
SIMCLR_STAGES = ("model", "loss")
# `--stage loss-backends -- ARGS` runs the loss backends' sweep, benchmarks/loss.py ARGS.
SWEEPS = ("loss-backends", "augment-backends")
COMPARISONS = ("optim-compare",)
RESULTS = Path(__file__).parent / "results"
# Dense bf16 tensor-core peaks (datasheets), for model FLOPs utilisation.
PEAK_BF16_TFLOPS = {"nvidia-h100-80gb-hbm3": 989.0, "nvidia-h200": 989.0, "nvidia-a100-sxm4-80gb": 312.0,
                    "nvidia-a100-sxm4-40gb": 312.0}


def timed(fn, steps: int, warmup: int, device: torch.device, pipelined: bool = False):
    """Seconds per call of fn() for `steps` calls after `warmup` calls. The device is synchronised
    after each call, or, `pipelined`, only after the last: the calls then run as the trainer makes
    them, the host preparing the next step (the loader's work on the main thread included) while
    the device still runs the last one, and the times are the host's intervals between calls (the
    last one up to the end of the device's work), which sum to the whole span."""
    def synchronise():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    synchronise()
    times, last = [], time.perf_counter()
    for i in range(steps):
        fn()
        if not pipelined or i == steps - 1:
            synchronise()
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times


def summarise(times, images_per_call: int):
    """images/s over the whole timed span (a step that waits for data counts in full: a median
    would hide a loader that stalls every few steps), and the per-step median, p20 and p80."""
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    mean = statistics.fmean(times)
    return {"mean_s": mean, "median_s": statistics.median(times), "p20_s": q[0], "p80_s": q[3],
            "images_per_s": images_per_call / mean}


def run(cfg, stages, steps: int, warmup: int, on_stage=None):
    """(device, results) of timing `stages`; `on_stage(results)` after each stage."""
    device = resolve_device(cfg.train.device)
    autocast_dtype, _ = resolve_precision(cfg.train.precision, device)
    train_dir, _ = resolve_paths(cfg.data)
    n = cfg.train.batch_size
    augment = build_augment(cfg)
    loader = build_loader(cfg.data, train_dir, size=cfg.augment.size, batch_size=n, seed=cfg.train.seed,
                          views=view_crops(augment), device=device)
    augment_backend = resolve_augment_backend(cfg.augment.backend, device)
    model = build_method(cfg).to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim, scaled_lr(cfg.optim.lr, n, cfg.optim.lr_scaling))
    amp = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else None
    # The method's work before an epoch (DeepCluster clusters the training set), as the trainer does.
    model.before_epoch(0, training_features(cfg, train_dir, device, DistInfo()))
    loader.set_epoch(0, order=model.epoch_order(0))

    def batches():
        while True:
            for batch in loader:
                yield batch

    stream = batches()
    views, _, indices = next(stream)
    augmented = [aug.apply(v, aug.sample(n, augment_generator(0, i)), channels_last=True)
                 for i, (aug, v) in enumerate(zip(augment.views, views))]
    projections = [torch.randn(n, cfg.model.proj_dim, device=device, requires_grad=True) for _ in range(2)]
    step = iter(range(10**9))
    loader_seconds = []    # the host's time in the loader, per loader-fed training step

    def stage_data():
        next(stream)

    def stage_augment():
        for i, (aug, v) in enumerate(zip(augment.views, views)):
            aug.apply(v, aug.sample(n, augment_generator(0, i)), backend=augment_backend, channels_last=True)

    def stage_model():
        with (amp() if amp else torch.autocast(device.type, enabled=False)):
            z = model.projector(model.backbone(torch.cat(augmented)))
        z.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    def stage_loss():
        info_nce(projections[0], projections[1], cfg.method.simclr.temperature, backend=cfg.loss.backend).backward()

    def stage_optim():
        optimizer.step()

    def stage_train(batch=None):
        """One real training step; fed by the loader, or (train-premade) by the same resident batch."""
        if batch is None:
            start = time.perf_counter()
            batch = next(stream)
            loader_seconds.append(time.perf_counter() - start)
        batch_views, _, batch_indices = batch
        train_step(batch_views, next(step), cfg.train.seed, model=model, optimizer=optimizer, scaler=None,
                   augment=augment, augment_backend=augment_backend, device=device, autocast_dtype=autocast_dtype,
                   indices=batch_indices)

    fns = {"data": stage_data, "augment": stage_augment, "model": stage_model, "loss": stage_loss,
           "optim": stage_optim, "train": stage_train, "train-premade": lambda: stage_train((views, None, indices))}
    results = {}
    for name in stages:
        if name.startswith("train"):
            model.zero_grad(set_to_none=True)
        if name == "optim":      # the step needs gradients (the model stage leaves none)
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 1e-3
        stage_steps, stage_warmup = steps, warmup
        if name in ("data", "train"):      # fed by the loader: past what it holds in flight, over many bursts
            workers = cfg.data.workers
            stage_steps = max(steps, data_benchmark.burst_batches(cfg.data.loader, workers))
            stage_warmup = max(warmup, data_benchmark.in_flight_batches(cfg.data.loader, workers))
            if (stage_steps, stage_warmup) != (steps, warmup):
                print(f"  {name}: {stage_warmup} warm-up and {stage_steps} timed steps ({workers} loader workers; "
                      "benchmarks/data.py in_flight_batches, burst_batches)", file=sys.stderr)
        times = timed(fns[name], stage_steps, stage_warmup, device, pipelined=name in PIPELINED)
        results[name] = summarise(times, n)
        wait = ""
        if name == "train":    # as the trainer's metrics report it (data_wait_share)
            results[name]["data_wait_share"] = sum(loader_seconds[-stage_steps:]) / sum(times)
            wait = f", {100 * results[name]['data_wait_share']:.1f}% of it in the loader"
        print(f"  {name:8s} {results[name]['images_per_s']:10.1f} images/s  "
              f"(mean {1e3 * results[name]['mean_s']:.1f} ms/batch of {n}{wait})", file=sys.stderr)
        if on_stage:
            on_stage(results)
    if "train" in results and "train-premade" in results:
        # The input pipeline's efficiency: the full step against the same step on a resident batch.
        results["pipeline_efficiency"] = results["train"]["images_per_s"] / results["train-premade"]["images_per_s"]
    if "train-premade" in results:
        results["model_flops_per_image"] = model_flops_per_image(model, augmented, indices, amp)
    return device, results


def model_flops_per_image(model, augmented, indices, amp) -> float:
    """FLOPs of the method's forward + backward per image (every view; backbone, heads, teacher,
    loss), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        with (amp() if amp else torch.autocast(augmented[0].device.type, enabled=False)):
            loss, _ = model(augmented, indices) if model.needs_indices else model(augmented)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / augmented[0].shape[0]


def optim_compare(cfg, steps: int, warmup: int):
    """Seconds per LARS step on ResNet-50's parameters, per implementation (random gradients)."""
    from fastssl.optim import IMPLS
    device = resolve_device(cfg.train.device)
    cfg.model.backbone = "resnet50"
    model = build_method(cfg).to(device)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(0)
    grads = [(torch.randn(p.shape, generator=gen) * 1e-3).to(device) for p in params]
    results = {}
    for impl in IMPLS:
        cfg.optim.name, cfg.optim.impl = "lars", impl
        try:
            optimizer = build_optimizer(model, cfg.optim, 0.1)
        except RuntimeError as exc:          # apex not installed
            print(f"  lars-{impl}: skipped ({exc})", file=sys.stderr)
            continue
        for p, g in zip(params, grads):
            p.grad = g
        times = timed(optimizer.step, steps, warmup, device)
        results[f"lars-{impl}"] = {**summarise(times, 1), "n_params": sum(p.numel() for p in params),
                                   "n_tensors": len(params)}
        results[f"lars-{impl}"]["steps_per_s"] = results[f"lars-{impl}"].pop("images_per_s")
        print(f"  lars-{impl:9s} {1e3 * results[f'lars-{impl}']['median_s']:8.2f} ms/step", file=sys.stderr)
    if "lars-foreach" in results and "lars-reference" in results:
        results["speedup_foreach_vs_reference"] = (results["lars-reference"]["median_s"]
                                                   / results["lars-foreach"]["median_s"])
    return device, results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).parent.parent / "configs" / "demo.yaml"))
    parser.add_argument("--stage", default="all", choices=("all",) + STAGES + SWEEPS + COMPARISONS)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per stage")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per stage")
    parser.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/throughput_<device>.json)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak, for MFU (known GPUs have a default)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--loader" in argv or any(a.startswith("--loader=") for a in argv):
        if "--stage" not in argv or argv[argv.index("--stage") + 1] != "data":
            parser.error("--loader goes with --stage data (the loaders' comparison, benchmarks/data.py)")
        i = argv.index("--stage")
        return data_benchmark.main(argv[:i] + argv[i + 2:])
    sweep_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.stage in SWEEPS:
        {"loss-backends": loss_benchmark, "augment-backends": augment_benchmark}[args.stage].main(sweep_args)
        return 0
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    cfg = load_config(args.config, args.overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    stages = STAGES if args.stage == "all" else (args.stage,)
    if cfg.method.name != "simclr":
        # model and loss time SimCLR's pieces (backbone + projector, NT-Xent); train covers any method.
        if args.stage in SIMCLR_STAGES:
            parser.error(f"--stage {args.stage} times SimCLR's pieces; method {cfg.method.name} is timed by "
                         "--stage train and train-premade")
        stages = tuple(s for s in stages if s not in SIMCLR_STAGES)
    save = record_saver(args, argv, cfg, resolve_device(cfg.train.device))
    if args.stage == "optim-compare":
        device, results = optim_compare(cfg, args.steps, args.warmup)
        print(f"\nLARS step, resnet50 + projector parameters, on {loss_benchmark.device_slug(str(device))}")
        for name, r in results.items():
            if isinstance(r, dict):
                print(f"{name:16s}{1e3 * r['median_s']:10.2f} ms/step (p20 {1e3 * r['p20_s']:.2f}, "
                      f"p80 {1e3 * r['p80_s']:.2f})")
        if "speedup_foreach_vs_reference" in results:
            print(f"foreach speed-up over the per-parameter loop: {results['speedup_foreach_vs_reference']:.2f}x")
        save(results)
        return 0
    device, results = run(cfg, stages, args.steps, args.warmup, on_stage=save)

    print(f"\nthroughput on {loss_benchmark.device_slug(str(device))} (batch {cfg.train.batch_size}, {cfg.augment.size}px, "
          f"{cfg.model.backbone}, {cfg.train.precision})")
    print(f"{'stage':10s}{'images/s':>12s}{'mean ms':>10s}{'median ms':>11s}{'p20 ms':>10s}{'p80 ms':>10s}")
    for name in stages:
        r = results[name]
        print(f"{name:14s}{r['images_per_s']:12.1f}{1e3 * r['mean_s']:10.1f}{1e3 * r['median_s']:11.1f}"
              f"{1e3 * r['p20_s']:10.1f}{1e3 * r['p80_s']:10.1f}")
    if "pipeline_efficiency" in results:
        print(f"pipeline efficiency (train / train-premade): {100 * results['pipeline_efficiency']:.1f}%; "
              f"the host spent {100 * results['train']['data_wait_share']:.1f}% of train in the loader")
    if "model_flops_per_image" in results:
        peak = args.peak_tflops or PEAK_BF16_TFLOPS.get(loss_benchmark.device_slug(str(device)))
        for name in ("train", "train-premade"):
            if name in results:
                tflops = results["model_flops_per_image"] * results[name]["images_per_s"] / 1e12
                results[name]["model_tflops"] = tflops
                mfu = f", MFU {100 * tflops / peak:.1f}% of {peak:g}" if peak else " (no --peak-tflops: no MFU)"
                if peak:
                    results[name]["mfu"] = tflops / peak
                print(f"{name}: {tflops:.3f} model TFLOP/s{mfu}")
    save(results)
    return 0


def record_saver(args, argv, cfg, device):
    """save(results): this run's record (device, versions, git sha, command, config, the stages'
    results) appended to benchmarks/results/throughput_<device>.json (or --out) and rewritten in
    place at each call (loss.history_appender): a run stopped between stages keeps those it timed."""
    record = {
        "benchmark": "throughput" if args.stage != "optim-compare" else "optim-compare",
        "device": loss_benchmark.device_slug(str(device)), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join(["python", "benchmarks/throughput.py"] + argv),
        "git_sha": loss_benchmark.git_sha(), "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "config": to_dict(cfg), "stages": {},
    }
    out = Path(args.out) if args.out else RESULTS / f"throughput_{record['device']}.json"
    append = loss_benchmark.history_appender(out)

    def save(results):
        record["stages"] = results
        append(record)
        print(f"wrote {out}", file=sys.stderr)

    return save


if __name__ == "__main__":
    sys.exit(main())
