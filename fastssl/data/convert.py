"""`fastssl convert SRC OUT.beton`: an ImageFolder as an FFCV dataset for data.loader=ffcv.

The .beton holds two fields, `image` (FFCV's RGBImageField: JPEG or raw pixels, longer side at
most `max_side`) and `label` (IntField: the class folder's index in sorted order, as in
scan_image_folder). Next to it, `OUT.beton.json` (the sidecar) lists what the .beton cannot:

    {"format": "fastssl-ffcv", "version": 1,
     "source": "/abs/path/SRC", "classes": ["cat", "dog", ...],
     "samples": [["cat/001.jpg", 0], ...],       # stored index i: file relative to source, label
     "skipped": [["cat/bad.jpg", "empty file"], ...],
     "options": {"max_side": 512, "write_mode": "jpg", ...}, "command": "fastssl convert ...",
     "images": 1281167, "bytes": ..., "seconds": ..., "ffcv": "1.0.2"}   # "seconds": check + write

so FfcvLoader.samples and .classes read like the folder loaders'.

Two passes over the files: every image is first decoded with `load_rgb` (grayscale, CMYK,
palette and alpha images become RGB), which finds the unreadable ones before anything is written
(FFCV's writer cannot leave a sample out once it has started); `on_bad_image=error` stops there
naming the file, `skip` leaves them out and reports them. FFCV's writer processes then decode,
resize and encode the readable ones. The .beton and its sidecar are written to temporary files in
the destination folder and renamed only when complete, so an interrupted or failed conversion
leaves neither a half file nor a temporary one.
"""
import importlib.metadata
import json
import multiprocessing
import os
import queue
import shlex
import time
import traceback
from pathlib import Path

import numpy as np
import torch

_threads = torch.get_num_threads()      # importing FFCV sets torch's threads to 1 (Compiler.set_num_threads)
try:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("fastssl convert needs FFCV: pip install -e '.[ffcv]' (and its build packages, "
                      "see scripts/install.sh)") from exc
finally:
    torch.set_num_threads(_threads)
from tqdm import tqdm

from fastssl.data.badimages import ON_BAD_IMAGE, BadImage
from fastssl.data.imagefolder import load_rgb, scan_image_folder

WRITE_MODES = ("jpg", "raw", "smart", "proportion")
# write_mode=smart: raw pixels up to this many bytes (256 x 256 x 3), JPEG above. Small images
# decode faster raw than JPEG and cost little space; FFCV's own default (none) would store all raw.
SMART_THRESHOLD = 256 * 256 * 3
MAX_SIDE_LIMIT = 65535              # FFCV stores height and width as uint16
SIDECAR_FORMAT, SIDECAR_VERSION = "fastssl-ffcv", 1


class ConvertError(RuntimeError):
    """A conversion that cannot complete (an unreadable image under on_bad_image=error, a failed
    writer process); the message says which file or process."""


def sidecar_path(beton) -> Path:
    return Path(str(beton) + ".json")


def read_sidecar(beton: Path) -> dict:
    """The sidecar of the .beton at `beton` (see the module docstring)."""
    sidecar = sidecar_path(beton)
    if not sidecar.is_file():
        raise FileNotFoundError(f"{sidecar} not found: data.loader=ffcv reads the .beton's sidecar (classes, "
                                f"files), written next to it by fastssl convert; convert the folder again")
    info = json.loads(sidecar.read_text(encoding="utf-8"))
    if info.get("format") != SIDECAR_FORMAT or info.get("version") != SIDECAR_VERSION:
        raise ValueError(f"{sidecar} is not a version-{SIDECAR_VERSION} fastssl sidecar; convert the folder again")
    return info


def stored_size(height: int, width: int, max_side: int):
    """(height, width) of an image once FFCV's writer has downscaled it to `max_side` (0: kept)."""
    if not max_side or max(height, width) <= max_side:
        return height, width
    ratio = max_side / max(height, width)
    return int(ratio * height), int(ratio * width)        # FFCV's resizer truncates


def check_image(path: str):
    """(height, width, None) of a readable image, (0, 0, reason) of an unreadable one."""
    try:
        img = load_rgb(path)
    except BadImage as exc:
        return 0, 0, exc.reason
    return img.height, img.width, None


class FolderImages:
    """What the writer's processes read: sample i -> (H x W x 3 uint8 RGB array, label)."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return np.asarray(load_rgb(path)), label


def _writer_process(work_fn, errors, *args):
    """A writer process: one OpenCV thread (the processes are the parallelism), its error sent back."""
    import cv2
    cv2.setNumThreads(1)
    try:
        work_fn(*args)
    except BaseException:
        errors.put(traceback.format_exc())
        raise


class Writer(DatasetWriter):
    """FFCV's DatasetWriter whose main loop also watches its processes: FFCV's waits forever when
    one dies (an image that fails to encode, a full disk); this one stops them all and raises."""

    def __init__(self, *args, progress: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress

    def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
        ctx = multiprocessing.get_context("fork")    # the dataset reaches the processes unpickled
        self.num_samples = num_samples
        self.prepare()
        workqueue, allocations, errors = ctx.Queue(), ctx.Queue(), ctx.Queue()
        for todo in queue_content:
            workqueue.put(todo)
        for _ in range(self.num_workers):
            workqueue.put(None)                      # one end token per process
        done = ctx.Value("Q", 0)
        allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
        args = (workqueue, self.metadata_sm, self.metadata_type, self.fields, allocator, done, allocations,
                *extra_worker_args)
        processes = [ctx.Process(target=_writer_process, args=(work_fn, errors, *args))
                     for _ in range(self.num_workers)]

        def check():
            failed = [p for p in processes if p.exitcode not in (None, 0)]
            if failed:
                try:
                    reason = errors.get(timeout=1).strip().splitlines()[-1]
                except queue.Empty:
                    reason = f"exit code {failed[0].exitcode}"
                raise ConvertError(f"a writer process failed: {reason}")

        try:
            for p in processes:
                p.start()
            with tqdm(total=num_samples, desc="writing", unit="img", disable=not self.progress) as bar:
                written = 0
                while written < num_samples:
                    check()
                    now = done.value
                    bar.update(now - written)
                    written = now
                    time.sleep(0.1)
            allocation_list = []
            while len(allocation_list) < len(processes):    # each process sends its table when done
                try:
                    allocation_list.append(allocations.get(timeout=0.5))
                except queue.Empty:
                    check()
            for p in processes:
                p.join()
            self.finalize([a for table in allocation_list for a in table])
        finally:
            for p in processes:
                if p.is_alive():
                    p.terminate()
                    p.join()
            self.metadata_sm.close()
            self.metadata_sm.unlink()


def find_unreadable(samples, workers: int, on_bad_image: str, progress: bool):
    """[(height, width)] of every image, (0, 0) for the unreadable ones, and [(index, reason)] of
    those; under `error` the first unreadable one raises ConvertError naming the file."""
    paths = [path for path, _ in samples]
    sizes, bad = [], []
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(check_image, paths, chunksize=max(1, min(64, len(paths) // (8 * workers)))) \
            if pool else map(check_image, paths)
        for i, (height, width, reason) in enumerate(tqdm(results, total=len(paths), desc="checking", unit="img",
                                                         disable=not progress)):
            if reason is not None:
                if on_bad_image != "skip":
                    raise ConvertError(f"cannot decode image {paths[i]}: {reason} (convert with "
                                       "--on-bad-image skip to leave such files out)")
                bad.append((i, reason))
            sizes.append((height, width))
    finally:
        if pool:
            pool.terminate()
            pool.join()
    return sizes, bad


def convert(src, out, *, max_side: int = 512, write_mode: str = "jpg", jpeg_quality: int = 90,
            compress_probability: float = 0.5, workers: int = None, on_bad_image: str = "error",
            force: bool = False, log=print, progress: bool = True) -> dict:
    """Write the ImageFolder `src` as the FFCV dataset `out` and its sidecar; return the report
    (images, skipped, bytes, seconds). `workers`: processes (default: every core)."""
    start = time.perf_counter()
    out = Path(os.path.expanduser(str(out)))
    workers = workers or os.cpu_count() or 1
    options = dict(max_side=max_side, write_mode=write_mode, jpeg_quality=jpeg_quality,
                   compress_probability=compress_probability, on_bad_image=on_bad_image)
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write mode {write_mode!r} is not one of {', '.join(WRITE_MODES)}")
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image {on_bad_image!r} is not one of {', '.join(ON_BAD_IMAGE)}")
    if not 0 <= max_side <= MAX_SIDE_LIMIT:
        raise ValueError(f"max side {max_side} must be in [0, {MAX_SIDE_LIMIT}] (0 keeps the sizes)")
    if not 1 <= jpeg_quality <= 100 or not 0 <= compress_probability <= 1:
        raise ValueError(f"JPEG quality {jpeg_quality} must be in [1, 100] and compress probability "
                         f"{compress_probability} in [0, 1]")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder {out.parent} does not exist")
    if out.is_dir():
        raise ValueError(f"output {out} is a folder; name the .beton file to write")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")

    samples, classes = scan_image_folder(src)
    root = Path(os.path.expanduser(str(src))).resolve()
    log(f"converting {len(samples)} images in {len(classes)} classes from {root} to {out}")
    sizes, bad = find_unreadable(samples, workers, on_bad_image, progress)
    unreadable = {i for i, _ in bad}
    keep = [i for i in range(len(samples)) if i not in unreadable]
    if not keep:
        raise ValueError(f"no readable image in {root} ({len(bad)} unreadable, e.g. {samples[bad[0][0]][0]}: "
                         f"{bad[0][1]})")
    stored = [stored_size(*sizes[i], max_side) for i in keep]
    too_big = [samples[i][0] for i, (h, w) in zip(keep, stored) if max(h, w) > MAX_SIDE_LIMIT]
    if too_big:
        raise ValueError(f"{too_big[0]} is larger than FFCV's {MAX_SIDE_LIMIT} pixels a side; set --max-side")
    # A sample must fit in one page: twice its raw size covers a JPEG of noise at quality 100.
    largest = max(3 * h * w for h, w in stored)
    page_size = max(4 * MIN_PAGE_SIZE, 1 << int(2 * largest + 4096).bit_length())

    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    tmp_sidecar = out.parent / f".{out.name}.json.{os.getpid()}.tmp"
    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_side or None,
                                     smart_threshold=SMART_THRESHOLD, jpeg_quality=jpeg_quality,
                                     compress_probability=compress_probability),
              "label": IntField()}
    kept = [samples[i] for i in keep]
    try:
        writer = Writer(str(tmp), fields, page_size=page_size, num_workers=min(workers, len(kept)),
                        progress=progress)
        writer.from_indexed_dataset(FolderImages(kept), chunksize=max(1, min(100, len(kept) // (4 * workers))))
        seconds = time.perf_counter() - start
        report = {"images": len(kept), "skipped": [[os.path.relpath(samples[i][0], root), reason] for i, reason in bad],
                  "bytes": tmp.stat().st_size, "seconds": round(seconds, 2)}
        info = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "source": str(root), "classes": classes,
                "samples": [[os.path.relpath(path, root), label] for path, label in kept],
                "options": options, "command": command_line(src, out, options, workers), "ffcv": importlib.metadata.version("ffcv"),
                **report}
        tmp_sidecar.write_text(json.dumps(info, indent=None, separators=(",", ":")), encoding="utf-8")
        os.replace(tmp_sidecar, sidecar_path(out))     # the sidecar first: a .beton always has one
        os.replace(tmp, out)
    finally:
        for path in (tmp, tmp_sidecar):
            if path.exists():
                path.unlink()
    log(f"wrote {out}: {len(kept)} images, {report['bytes'] / 2**20:.1f} MiB, {seconds:.1f} s "
        f"({len(kept) / seconds:.0f} images/s); sidecar {sidecar_path(out).name}")
    if bad:
        log(f"skipped {len(bad)} unreadable file(s) (listed in the sidecar):")
        for rel, reason in report["skipped"][:20]:
            log(f"  {rel}: {reason}")
        if len(bad) > 20:
            log(f"  ... and {len(bad) - 20} more")
    return report


def command_line(src, out, options: dict, workers: int) -> str:
    """The `fastssl convert` command that makes this conversion (recorded in the sidecar)."""
    args = ["fastssl", "convert", str(src), str(out)]
    for key, value in {**options, "workers": workers}.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(args)
