"""Images/s of every loader on the same real JPEGs, next to the PIL DataLoader baseline.

    python benchmarks/throughput.py --stage data --loader pil,torch,dali,dali-per_view,ffcv [key=value ...]
    python benchmarks/data.py [--loader ...] [--data DIR] [--batch 32] [--size 224] [--batches 40]

Every loader yields two RandomResizedCrop views (scale 0.08-1) of `--size` px per image, on the
training device (`train.device`, auto: the GPU when there is one), from `--data` (default
../shared/data/imagenet-sample, 200 ImageNet JPEGs, linked as often as one epoch needs to hold
every timed batch: `image_folder`). Each loader uses
every CPU core (`--workers`, default all: worker processes for pil and torch, threads for DALI
and FFCV), and its CPU use is measured over the timed batches (CPU seconds of the process and
its worker processes / wall seconds = the cores it kept busy).

Each loader runs in a process of its own (no worker, thread or CUDA state left over from the one
before), under `--loader-timeout` seconds: a loader that stalls is stopped, Python's stacks of
all its threads are printed shortly before, and the table marks it. The warm-up outlasts what a
loader holds in flight (`--warmup`, default 2 x workers + 3, ffcv 3: `in_flight_batches`):
otherwise the timed batches would include batches made while nothing was timed (16 workers on a
2-core CPU: 16,000 images/s over 4 batches). Batches from W workers arrive in bursts of up to W,
so the timed span covers many bursts (`--batches`, default max(40, 8 x workers), ffcv 40:
`burst_batches`). Each loader reads its own linked folder, sized for its batches. `dali-per_view` is DALI with
`data.dali_decode=per_view` (ROI decoding per view). `ffcv` reads a .beton converted from the
same folder first (`--max-side`, default 512, `--write-mode`, default jpg, `--compress-probability`
for `proportion`; JPEG quality 90; the conversion is timed apart), and its per-image costs are
broken down on one thread (`ffcv_costs`): the JPEG decode against the two crops' resizes.
`--rounds N` runs the whole list N times in turn and reports, per loader, the median of its ratios
to pil within each round: on a shared machine whose speed drifts by 10-20% over minutes (the 2-core
VM of CI), one pass can put the baseline and a loader in different moments.
A JSON record is appended to benchmarks/results/data_<device>.json and rewritten after each
loader, so that a run stopped midway keeps what it measured.
"""
import argparse
import faulthandler
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
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
    command = ["convert", str(folder), str(out), "--force",     # --force: the file of an earlier round
               "--max-side", str(args.max_side), "--write-mode", args.write_mode,
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


def in_flight_batches(kind: str, workers: int) -> int:
    """The most batches a loader holds, made or in the making, before they are asked for: pil,
    torch and dali read with DataLoader workers, which prefetch two batches each (dali then keeps
    two submitted to DALI); ffcv's threads make three ahead. A warm-up at least this long leaves
    none of them for the timed span."""
    return 3 if kind == "ffcv" else 2 * workers + 3


def burst_batches(kind: str, workers: int) -> int:
    """Timed batches that span 8 bursts: W DataLoader workers started together deliver their
    batches in bursts of up to W, and a span of a few bursts would over- or under-count one of
    them. ffcv's threads make one batch at a time together: no bursts."""
    return 0 if kind == "ffcv" else 8 * workers


def time_loader(loader, batches: int, warmup: int, device: torch.device, name: str) -> dict:
    """Images/s and busy cores over `batches` batches after `warmup`, cycling epochs; prints how
    long the first batch and the warm-up took, so that a slow start shows where it is."""
    def stream():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    it = stream()
    start = time.perf_counter()
    next(it)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        next(it)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"{name}: first batch after {first:.1f} s, {warmup} warm-up batches after "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    cpu0, t0, images = cpu_seconds(), time.perf_counter(), 0
    for _ in range(batches):
        views, _, _ = next(it)
        images += views[0].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return {"images_per_s": images / wall, "seconds": wall, "images": images, "cores_busy": cpu / wall,
            "first_batch_s": first, "warmup_batches": warmup, "timed_batches": batches}


def measure(name: str, folder: Path, distinct: int, work: Path, args, device: torch.device) -> dict:
    """One loader's record (run in a process of its own: `run_in_child`)."""
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
    start = time.perf_counter()
    loader = build_loader(data_cfg, str(root), size=args.size, batch_size=args.batch, device=device)
    print(f"{name}: loader built in {time.perf_counter() - start:.1f} s", flush=True)
    return {**time_loader(loader, args.batches, args.warmup, device, name), **extra}


def summary(measured: list, baseline: list) -> dict:
    """One loader's result from its records of the rounds so far: the round of median images/s (the
    lower middle one of an even count), with every round's images/s (`rounds_images_per_s`, None
    where it failed) and `vs_pil`, the median of its ratios to the pil baseline of the same round
    (the machine's speed may drift between rounds, as on a shared VM; within a round the loaders
    run minutes apart at most). A loader that failed in every round keeps its last status."""
    ok = [r for r in measured if r["status"] == "ok"]
    if not ok:
        return measured[-1]
    result = dict(sorted(ok, key=lambda r: r["images_per_s"])[(len(ok) - 1) // 2])
    result["rounds_images_per_s"] = [r["images_per_s"] if r["status"] == "ok" else None for r in measured]
    ratios = [r["images_per_s"] / b["images_per_s"] for r, b in zip(measured, baseline)
              if r["status"] == "ok" and b["status"] == "ok"]
    if ratios:
        result["vs_pil"] = statistics.median(ratios)
        result["vs_pil_rounds"] = ratios
    return result


def run_in_child(name: str, argv, folder: Path, distinct: int, work: Path, timeout: float) -> dict:
    """`measure(name)` in a child process (this script with --child), stopped after `timeout`
    seconds with its whole process group; 15 s before that it prints its threads' stacks."""
    result = work / f"{name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", name, "--child-folder", str(folder),
               "--child-distinct", str(distinct), "--child-work", str(work)]
    start = time.perf_counter()
    child = subprocess.Popen(command, start_new_session=True)
    try:
        child.wait(timeout)
        status = None
    except subprocess.TimeoutExpired:
        status = f"stopped after {timeout:.0f} s (--loader-timeout)"
    finally:                    # also on Ctrl-C: no worker of the child outlives it
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait()
    if status:
        return {"status": status, "wall_s": time.perf_counter() - start}
    if child.returncode != 0 or not result.exists():
        return {"status": f"failed (exit code {child.returncode}, output above)", "wall_s": time.perf_counter() - start}
    return {**json.loads(result.read_text()), "status": "ok", "wall_s": time.perf_counter() - start}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--loader", default=",".join(LOADERS), help="comma-separated, from " + ", ".join(LOADERS))
    parser.add_argument("--data", default=str(SAMPLE), help="a folder of JPEGs (flat, or an ImageFolder)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--batches", type=int, default=None,
                        help="timed batches per loader (default max(40, 8 x workers); ffcv: 40)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed batches per loader (default and least 2 x workers + 3; ffcv: 3)")
    parser.add_argument("--loader-timeout", type=float, default=600.0,
                        help="seconds a loader may take, conversion included (default 600)")
    parser.add_argument("--max-side", type=int, default=512, help="ffcv: the .beton's maximum side (default 512)")
    parser.add_argument("--write-mode", default="jpg", choices=("jpg", "raw", "smart", "proportion"),
                        help="ffcv: how the .beton stores images (default jpg)")
    parser.add_argument("--compress-probability", type=float, default=0.5,
                        help="ffcv, --write-mode proportion: the share stored as JPEG (default 0.5)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every loader this many times, in turn (pil, the others, then again): each "
                             "ratio to pil is taken within one round and the median is reported (default 1)")
    parser.add_argument("--out", default=None)
    # Internal: run one loader (run_in_child).
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-distinct", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.loader_timeout <= 0 or (args.batches is not None and args.batches < 1) or (args.warmup or 0) < 0 \
            or args.rounds < 1:
        parser.error("--loader-timeout must be > 0, --batches >= 1, --warmup >= 0 and --rounds >= 1")
    cfg = load_config(args.config, args.overrides)
    device = resolve_device(cfg.train.device)
    if args.child:                      # the parent passed this loader's --warmup and --batches
        faulthandler.dump_traceback_later(max(args.loader_timeout - 15, 1))
        record = measure(args.child, Path(args.child_folder), args.child_distinct, Path(args.child_work), args, device)
        (Path(args.child_work) / f"{args.child}.json").write_text(json.dumps(record))
        return 0

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
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for module in ("nvidia.dali", "ffcv", "torchvision", "PIL"):
        if installed(module):
            versions[module] = getattr(importlib.import_module(module), "__version__", "?")
    results = {}
    record = {"benchmark": "data", "device": loss_benchmark.device_slug(str(device)),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(["python"] + sys.argv),
              "git_sha": loss_benchmark.git_sha(), "versions": versions,
              "cpu_count": os.cpu_count(), "data": str(src), "batch": args.batch, "size": args.size,
              "workers": args.workers, "loaders": names, "rounds": args.rounds, "results": results}
    out = Path(args.out) if args.out else RESULTS / f"data_{record['device']}.json"
    append = loss_benchmark.history_appender(out)

    runs = {name: [] for name in names}     # each loader's record per round

    def save():
        """The record as it stands, written after every loader: a run stopped midway (a lease's
        time limit) keeps the loaders it measured; `loaders` says which were planned."""
        for name, measured in runs.items():
            if measured:
                results[name] = summary(measured, runs["pil"])
        append(record)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"{len(names)} loaders, each in its own process: batch {args.batch}, {args.workers} workers, {device}",
              flush=True)
        plans = {}
        for name in names:
            kind = name.partition("-")[0]
            warmup = max(args.warmup or 0, in_flight_batches(kind, args.workers))
            batches = args.batches or max(40, burst_batches(kind, args.workers))
            if args.warmup is not None and args.warmup < warmup:
                print(f"{name}: --warmup {args.warmup} raised to {warmup}, the batches it holds in flight")
            folder, distinct = image_folder(src, work / name, args.batch * (warmup + batches))
            plans[name] = (argv + ["--warmup", str(warmup), "--batches", str(batches)], folder, distinct)
        for round_ in range(args.rounds):
            if args.rounds > 1:
                print(f"round {round_ + 1} of {args.rounds}", flush=True)
            for name, (child_argv, folder, distinct) in plans.items():
                r = run_in_child(name, child_argv, folder, distinct, work, args.loader_timeout)
                runs[name].append(r)
                if r["status"] == "ok":
                    print(f"{name:14s}{r['images_per_s']:9.1f} images/s  {r['cores_busy']:5.2f} cores busy",
                          flush=True)
                else:
                    print(f"{name:14s} {r['status']}", flush=True)
                save()
    print(f"wrote {out}")
    if results["pil"]["status"] != "ok":
        print(f"the pil baseline {results['pil']['status']}: no comparison", file=sys.stderr)
        return 1
    print("\nimages/s, two views of %d px, batch %d, %d workers, %s%s:" % (
        args.size, args.batch, args.workers, device,
        f", the median of {args.rounds} rounds (ratios: within a round)" if args.rounds > 1 else ""))
    for name, r in results.items():
        if r["status"] != "ok":
            print(f"  {name:14s} {r['status']}")
            continue
        ratio = f"{r['vs_pil']:5.2f}x pil" if "vs_pil" in r else "  (no pil round to compare)"
        print(f"  {name:14s}{r['images_per_s']:9.1f}  {ratio}  {r['cores_busy']:5.2f} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
