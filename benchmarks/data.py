"""Images/s of every loader on the same real JPEGs, next to the PIL DataLoader baseline.

    python benchmarks/throughput.py --stage data --loader pil,torch,dali,dali-per_view,ffcv [key=value ...]
    python benchmarks/data.py [--loader ...] [--data DIR] [--batch 32] [--size 224] [--batches 40]

Every loader yields two RandomResizedCrop views (scale 0.08-1) of `--size` px per image, on the
training device (`train.device`, auto: the GPU when there is one), from `--data` (default
../shared/data/imagenet-sample, 200 ImageNet JPEGs, linked as often as one epoch needs to hold
every timed batch: `image_folder`). Each loader uses
every CPU core (`--workers`, default all: worker processes for pil and torch, threads for DALI
and FFCV), and its CPU use is measured over the timed batches (CPU seconds of the process and
its worker processes / wall seconds = the cores it kept busy). `dali-per_view` is DALI with
`data.dali_decode=per_view` (ROI decoding per view). `ffcv` reads a .beton converted from the
same folder first (`--max-side`, default 512, `--write-mode`, default jpg, `--compress-probability`
for `proportion`; JPEG quality 90; the conversion is timed apart), and its per-image costs are
broken down on one thread (`ffcv_costs`): the JPEG decode against the two crops' resizes.
A JSON record is appended to benchmarks/results/data_<device>.json.
"""
import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import loss as loss_benchmark          # benchmarks/loss.py, beside this file: device_slug, git_sha
from fastssl.config import load_config
from fastssl.data import build_loader
from fastssl.train.trainer import resolve_device

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT.parent / "shared" / "data" / "imagenet-sample"
RESULTS = Path(__file__).parent / "results"
LOADERS = ("pil", "torch", "dali", "dali-per_view", "ffcv")
NEEDS = {"dali": "nvidia.dali", "dali-per_view": "nvidia.dali", "ffcv": "ffcv"}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module.split(".")[0]) is not None and importlib.util.find_spec(module) is not None


def cpu_seconds(pid: int = None) -> float:
    """User + system CPU seconds of a process and all its descendants (Linux /proc)."""
    pid = pid or os.getpid()
    tick = os.sysconf("SC_CLK_TCK")
    parents, total = {}, 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:                      # the process ended meanwhile
            continue
        parents[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree = {pid}
    grew = True
    while grew:
        children = {p for p, (ppid, _) in parents.items() if ppid in tree} - tree
        tree |= children
        grew = bool(children)
    for p in tree:
        total += parents.get(p, (0, 0.0))[1]
    return total


def image_folder(src: Path, work: Path, min_images: int) -> (Path, int):
    """(an ImageFolder of `src`'s images whose epoch holds at least `min_images`, the number of
    distinct images). A folder of class folders that is large enough is used as it is; otherwise
    its images (or a flat folder's, as one class) are linked as many times as needed, so that the
    timed batches never cross an epoch boundary, where a loader pauses (a rare event in training,
    which an epoch of a few batches would make frequent: on the GPU machine, batch 128 from the
    200-image sample gave one batch per epoch, and the PIL baseline kept one worker busy)."""
    classes = [p for p in sorted(src.iterdir()) if p.is_dir()] or [src]
    files = {c: [f for f in sorted(c.iterdir()) if f.is_file()] for c in classes}
    distinct = sum(len(f) for f in files.values())
    if distinct == 0:
        raise SystemExit(f"--data {src}: no image files")
    copies = -(-min_images // distinct)
    if copies == 1 and classes != [src]:
        return src, distinct
    for c, class_files in files.items():
        folder = work / "folder" / (c.name if c != src else "images")
        folder.mkdir(parents=True)
        for copy in range(copies):
            for f in class_files:
                (folder / f"{copy}_{f.name}").symlink_to(f.resolve())
    return work / "folder", distinct


def to_beton(folder: Path, work: Path, args) -> (Path, float):
    from fastssl.cli import main as cli
    out = work / "sample.beton"
    start = time.perf_counter()
    command = ["convert", str(folder), str(out), "--max-side", str(args.max_side), "--write-mode", args.write_mode,
               "--compress-probability", str(args.compress_probability)]
    if cli(command) not in (0, None):
        raise RuntimeError(f"fastssl convert {folder} {out} failed")
    return out, time.perf_counter() - start


def ffcv_costs(beton: Path, size: int, distinct: int, repeats: int = 3) -> dict:
    """Milliseconds per image, on one thread, of the two steps of the ffcv loader's decoder over the
    .beton's first `distinct` JPEGs (the linked copies left out): libjpeg-turbo's decode, and the
    two views' random resized crops as the loader resizes them (`resize_view`: resize_antialiased
    where a crop shrinks, FFCV's resize_crop then to_planar where it is only enlarged); next
    to the same crops all with resize_crop (OpenCV INTER_AREA, antialiased too) and all with
    OpenCV's INTER_LINEAR (not antialiased), left as OpenCV writes them (HWC)."""
    import cv2
    import numpy as np
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.reader import Reader

    from fastssl.data.ffcv_loader import crop_box, epoch_key, resize_view

    reader, data = Reader(str(beton)), np.fromfile(beton, np.uint8)
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    images = [(int(m["height"]), int(m["width"]), int(m["data_ptr"])) for m in reader.metadata["f0"][:distinct]
              if m["mode"] == IMAGE_MODES["jpg"]]
    if not images:                  # raw pixels only: nothing is decoded
        return {}
    out, planar = np.empty((size, size, 3), np.uint8), np.empty((3, size, size), np.uint8)
    seconds = {"decode": 0.0, "ours": 0.0, "area": 0.0, "linear": 0.0}
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    resize_view(np.zeros((2, 2, 3), np.uint8), 0, 2, 0, 2, out, planar)     # compiled here, not timed
    try:
        for epoch in range(repeats):
            key = epoch_key(0, epoch)
            for index, (h, w, ptr) in enumerate(images):
                image = np.empty((h, w, 3), np.uint8)
                t = time.perf_counter()
                imdecode(data[ptr:ptr + sizes[ptr]], image, h, w, h, w, 0, 0, 1, 1, False, False)
                seconds["decode"] += time.perf_counter() - t
                for view in range(2):
                    top, bottom, left, right = crop_box(key, index, view, h, w, 0.08, 1.0,
                                                        np.log(3 / 4), np.log(4 / 3))
                    t = time.perf_counter()
                    resize_view(image, top, bottom, left, right, out, planar)
                    seconds["ours"] += time.perf_counter() - t
                    t = time.perf_counter()
                    resize_crop(image, top, bottom, left, right, out)
                    seconds["area"] += time.perf_counter() - t
                    t = time.perf_counter()
                    cv2.resize(image[top:bottom, left:right], (size, size), dst=out, interpolation=cv2.INTER_LINEAR)
                    seconds["linear"] += time.perf_counter() - t
    finally:
        cv2.setNumThreads(threads)
    n = repeats * len(images)
    return {"decode_ms": 1e3 * seconds["decode"] / n, "two_crops_ms": 1e3 * seconds["ours"] / n,
            "two_crops_area_ms": 1e3 * seconds["area"] / n, "two_crops_linear_ms": 1e3 * seconds["linear"] / n,
            "images": len(images)}


def time_loader(loader, batches: int, warmup: int, device: torch.device) -> dict:
    """Images/s and busy cores over `batches` batches after `warmup`, cycling epochs."""
    def stream():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    it = stream()
    for _ in range(warmup):
        next(it)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    cpu0, t0, images = cpu_seconds(), time.perf_counter(), 0
    for _ in range(batches):
        views, _, _ = next(it)
        images += views[0].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return {"images_per_s": images / wall, "seconds": wall, "images": images, "cores_busy": cpu / wall}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--loader", default=",".join(LOADERS), help="comma-separated, from " + ", ".join(LOADERS))
    parser.add_argument("--data", default=str(SAMPLE), help="a folder of JPEGs (flat, or an ImageFolder)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--batches", type=int, default=40, help="timed batches per loader")
    parser.add_argument("--warmup", type=int, default=8, help="untimed batches per loader")
    parser.add_argument("--max-side", type=int, default=512, help="ffcv: the .beton's maximum side (default 512)")
    parser.add_argument("--write-mode", default="jpg", choices=("jpg", "raw", "smart", "proportion"),
                        help="ffcv: how the .beton stores images (default jpg)")
    parser.add_argument("--compress-probability", type=float, default=0.5,
                        help="ffcv, --write-mode proportion: the share stored as JPEG (default 0.5)")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.loader.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOADERS]
    if unknown:
        parser.error(f"--loader: unknown {', '.join(unknown)}; choose from {', '.join(LOADERS)}")
    missing = [n for n in names if n in NEEDS and not installed(NEEDS[n])]
    if missing:
        parser.error(f"--loader {', '.join(missing)}: not installed (pip install -e '.[dali,ffcv]')")
    if "pil" not in names:
        names.insert(0, "pil")           # the baseline, in the same run
    src = Path(args.data)
    if not src.is_dir():
        parser.error(f"--data {src}: not a folder")
    cfg = load_config(args.config, args.overrides)
    device = resolve_device(cfg.train.device)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder, distinct = image_folder(src, work, args.batch * (args.warmup + args.batches))
        for name in names:
            kind, _, decode = name.partition("-")
            data_cfg = SimpleNamespace(loader=kind, workers=args.workers, on_bad_image="error",
                                       dali_decode=decode or "once", ffcv_order="random", ffcv_os_cache=True,
                                       cache_dir=str(work))
            root, extra = folder, {}
            if kind == "ffcv":
                root, seconds = to_beton(folder, work, args)
                extra = {"convert_seconds": seconds, "beton_mb": root.stat().st_size / 2**20,
                         "max_side": args.max_side, "write_mode": args.write_mode,
                         "one_thread_costs": ffcv_costs(root, args.size, distinct)}
                c = extra["one_thread_costs"]
                if c:
                    print(f"ffcv, per image on one thread: decode {c['decode_ms']:.2f} ms, two crops "
                          f"{c['two_crops_ms']:.2f} ms (OpenCV INTER_AREA {c['two_crops_area_ms']:.2f} ms, "
                          f"INTER_LINEAR {c['two_crops_linear_ms']:.2f} ms)")
            loader = build_loader(data_cfg, str(root), size=args.size, batch_size=args.batch, device=device)
            results[name] = {**time_loader(loader, args.batches, args.warmup, device), **extra}
            del loader
            r = results[name]
            print(f"{name:14s}{r['images_per_s']:9.1f} images/s  {r['cores_busy']:5.2f} cores busy", flush=True)
    base = results["pil"]["images_per_s"]
    for name, r in results.items():
        r["vs_pil"] = r["images_per_s"] / base
    print("\nimages/s, two views of %d px, batch %d, %d workers, %s:" % (args.size, args.batch, args.workers, device))
    for name, r in results.items():
        print(f"  {name:14s}{r['images_per_s']:9.1f}  {r['vs_pil']:5.2f}x pil  {r['cores_busy']:5.2f} cores")

    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for module in ("nvidia.dali", "ffcv", "torchvision", "PIL"):
        if installed(module):
            versions[module] = getattr(importlib.import_module(module), "__version__", "?")
    record = {"benchmark": "data", "device": loss_benchmark.device_slug(str(device)),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(["python"] + sys.argv),
              "git_sha": loss_benchmark.git_sha(), "versions": versions,
              "cpu_count": os.cpu_count(), "data": str(src), "batch": args.batch, "size": args.size,
              "workers": args.workers, "results": results}
    out = Path(args.out) if args.out else RESULTS / f"data_{record['device']}.json"
    history = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(history + [record], indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
