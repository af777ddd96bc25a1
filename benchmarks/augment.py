"""Benchmark of two-view augmentation: fused Triton kernels, Kornia reference, torchvision loop.

A batch of uint8 images (default 512 x 3 x 375 x 500, ImageNet-like) already on the device goes
through a two-view recipe (``--recipe simclr`` or ``byol``, every view resized to ``--size``)
into ``--out-dtype`` views. Implementations, timed in the same run:
- ``fused``: ``SimCLRAugment.apply(backend="fused", channels_last=True)`` (parameters drawn
  outside the timed region; building and copying the per-sample table is inside);
- ``kornia``: the reference backend, same parameters;
- ``torchvision``: a per-sample ``torchvision.transforms.v2`` Compose loop on the device with
  the same settings (its own draws);
- peers when importable, on the op subset they support: ``triton_augment`` (TritonFusedAugment:
  random crop without resize, flip, brightness/contrast/saturation, grayscale, normalise; float
  input converted outside the timed region). cvcuda is not wired: listed as skipped.

Times: CUDA-event medians (p20/p80) on the GPU, perf_counter on the CPU. images/s counts input
images (each yields all views). GB/s counts the compulsory traffic, the same for every
implementation: the drawn crop boxes' input pixels read once plus the views written, against
``--bandwidth-gbs`` (default 3350, H100 SXM HBM3, on CUDA).

On the CPU the defaults are small (batch 16, 64 px views, 187 x 250 input) and ``fused`` runs
only under TRITON_INTERPRET=1 (Triton's interpreter: a correctness path, not a speed).
Results: JSON under benchmarks/results/augment_[<recipe>_]<device-slug>.json (recipe only when
not simclr) with the command line, rewritten after each implementation (``loss.record_writer``):
a run stopped midway keeps what it measured. ``run(args, add)`` hands each record to ``add``;
``main(argv)`` is the CLI (also usable from throughput.py) and returns the records.
"""
import argparse
import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
sys.path[:0] = [p for p in (ROOT, os.path.dirname(os.path.abspath(__file__))) if p not in sys.path]

from loss import _summary, device_slug, record_writer  # noqa: E402  (benchmarks/loss.py)

IMPLS = ("fused", "kornia", "torchvision", "triton_augment", "cvcuda")


def torchvision_views(aug, images, out_dtype):
    """One view with torchvision.transforms.v2, image by image (its own random draws)."""
    import torch
    import torchvision.transforms.v2 as T
    s = aug.jitter_strength
    pipe = T.Compose([
        T.ToDtype(torch.float32, scale=True),
        T.RandomResizedCrop(aug.size, scale=tuple(aug.crop_scale), ratio=tuple(aug.crop_ratio), antialias=False),
        T.RandomHorizontalFlip(aug.flip_p),
        T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, min(0.2 * s, 0.5))], p=aug.jitter_p),
        T.RandomGrayscale(aug.grayscale_p),
        T.RandomApply([T.GaussianBlur(aug.blur_kernel_size, tuple(aug.blur_sigma))], p=aug.blur_p),
        T.RandomSolarize(0.5, p=aug.solarize_p),
        T.Normalize(list(aug.mean), list(aug.std)),
    ])
    return torch.stack([pipe(img) for img in images]).to(out_dtype)


def make_impl(name, mv, images, out_dtype, generator):
    """A zero-argument callable producing all views, or raise RuntimeError(reason) to skip."""
    if name in ("fused", "kornia"):
        if name == "fused" and images.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("skipped: on the CPU the fused kernels need TRITON_INTERPRET=1")
        params = mv.sample(images.shape[0], generator)
        return lambda: mv.apply(images, params, backend=name, out_dtype=out_dtype, channels_last=True)
    if name == "torchvision":
        return lambda: [torchvision_views(v, images, out_dtype) for v in mv.views]
    if name == "triton_augment":
        if importlib.util.find_spec("triton_augment") is None:
            raise RuntimeError("skipped: triton_augment not installed")
        if images.device.type != "cuda":
            raise RuntimeError("skipped: triton_augment needs CUDA")
        import triton_augment as ta
        floats = images.float() / 255
        peers = [ta.TritonFusedAugment(crop_size=v.size, horizontal_flip_p=v.flip_p,
                                       brightness=0.8 * v.jitter_strength, contrast=0.8 * v.jitter_strength,
                                       saturation=0.8 * v.jitter_strength, grayscale_p=v.grayscale_p,
                                       mean=tuple(v.mean), std=tuple(v.std)) for v in mv.views]
        return lambda: [p(floats).to(out_dtype) for p in peers]
    if importlib.util.find_spec("cvcuda") is None:
        raise RuntimeError("skipped: cvcuda not installed")
    raise RuntimeError("skipped: cvcuda is installed but not wired into this benchmark")


def time_fn(fn, device, reps, warmup):
    import torch
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return _summary(times)


def compulsory_bytes(mv, params, height, width, in_bytes, out_bytes):
    """Crop boxes' input pixels read once + views written (the same for every implementation)."""
    from fastssl.data.crops import crop_boxes
    total = 0.0
    for view, p in zip(mv.views, params):
        n = p["flip"].numel()
        if view.crop:
            boxes = crop_boxes(p["crop"], height, width)
            area = float((boxes[:, 2] * boxes[:, 3]).sum())
        else:
            area = n * height * width
        total += 3 * area * in_bytes + n * 3 * view.size ** 2 * out_bytes
    return total


def run(args, add):
    """Time every implementation of ``args.impls``, handing each record to ``add``."""
    import torch
    from fastssl.augment import RECIPES, MultiViewAugment
    out_dtype = getattr(torch, args.out_dtype)
    mv = MultiViewAugment([{**view, "size": args.size} for view in RECIPES[args.recipe]])
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.height, args.width), dtype=torch.uint8,
                           generator=g).to(args.device)
    nbytes = compulsory_bytes(mv, mv.sample(args.batch, torch.Generator().manual_seed(0)), args.height,
                              args.width, 1, out_dtype.itemsize)
    for name in args.impls:
        rec = {"impl": name, "batch": args.batch, "views": len(mv), "size": args.size,
               "input": [args.height, args.width], "out_dtype": args.out_dtype, "recipe": args.recipe}
        try:
            fn = make_impl(name, mv, images, out_dtype, torch.Generator().manual_seed(0))
        except RuntimeError as e:
            rec["note"] = str(e)
            add(rec)
            _print_record(rec)
            continue
        t = time_fn(fn, args.device, args.reps, args.warmup)
        rec.update(time_s=t, images_per_s=args.batch / t["median"], gbytes=nbytes / 1e9,
                   gb_per_s=nbytes / t["median"] / 1e9)
        if name == "fused" and args.device == "cpu":
            rec["note"] = "Triton interpreter (TRITON_INTERPRET=1): correctness path, not a speed"
        if args.bandwidth_gbs:
            rec["pct_of_bandwidth"] = 100 * rec["gb_per_s"] / args.bandwidth_gbs
        add(rec)
        _print_record(rec)


def _print_record(rec):
    if "time_s" not in rec:
        print(f"{rec['impl']:>15} | {rec['note']}")
        return
    pct = f"{rec['pct_of_bandwidth']:6.2f}%" if "pct_of_bandwidth" in rec else "    n/a"
    print(f"{rec['impl']:>15} | {rec['time_s']['median'] * 1e3:10.2f} ms | {rec['images_per_s']:10.1f} img/s | "
          f"{rec['gb_per_s']:8.4g} GB/s | {pct} of bandwidth" + (f" | {rec['note']}" if "note" in rec else ""))


def parse_args(argv=None):
    import torch
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--batch", type=int, default=None, help="default 512 on CUDA, 16 on the CPU")
    p.add_argument("--size", type=int, default=None, help="view side; default 224 on CUDA, 64 on the CPU")
    p.add_argument("--height", type=int, default=None, help="input height; default 375 on CUDA, 187 on the CPU")
    p.add_argument("--width", type=int, default=None, help="input width; default 500 on CUDA, 250 on the CPU")
    p.add_argument("--recipe", default="simclr", choices=["simclr", "byol"])
    p.add_argument("--out-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--reps", type=int, default=None, help="timed repetitions; default 20 on CUDA, 3 on the CPU")
    p.add_argument("--warmup", type=int, default=None, help="default 3 on CUDA, 1 on the CPU")
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="device memory bandwidth for the %% column; default 3350 (H100 SXM) on CUDA")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/augment_[<recipe>_]<device>.json)")
    a = p.parse_args(argv)
    gpu = a.device == "cuda"
    for name, on_gpu, on_cpu in (("batch", 512, 16), ("size", 224, 64), ("height", 375, 187), ("width", 500, 250),
                                 ("reps", 20, 3), ("warmup", 3, 1), ("bandwidth_gbs", 3350.0, None)):
        if getattr(a, name) is None:
            setattr(a, name, on_gpu if gpu else on_cpu)
    return a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    import torch
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    recipe = "" if args.recipe == "simclr" else f"{args.recipe}_"
    out = args.out or os.path.join(RESULTS, f"augment_{recipe}{device_slug(args.device)}.json")
    meta = {"command": " ".join(["python", "benchmarks/augment.py"] + argv),
            "env": {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")},
            "device": args.device, "device_slug": device_slug(args.device), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "bandwidth_gbs": args.bandwidth_gbs,
            "bytes_convention": "crop boxes' input pixels read once (uint8) + views written (out dtype)"}
    records, add = record_writer(out, meta)
    run(args, add)
    print(f"wrote {out}")
    return records


if __name__ == "__main__":
    main()
