"""DALI's JPEG decoder alone on real photos, at several shares of hardware decoding.

    python benchmarks/dali_decoder.py [--data DIR] [--batch 256] [--threads N] [--loads 0 0.65 1] [--seconds 6]

The `dali` loader decodes with DALI's `mixed` decoder, which sends a share of the JPEGs
(`hw_decoder_load`) to the GPU's hardware JPEG decoder where there is one (A100, H100) and the rest
to nvJPEG's CUDA decoder, whose Huffman decoding runs on the CPU. This times that decoder without
the rest of the loader: DALI's own file reader over `--data` (default
../shared/data/imagenet-sample), the decoder at each `--loads` value, one 224-px antialiased resize
of the whole image, for `--seconds` each, and prints images/s and the CPU cores the process kept
busy. The same numbers at every load mean that no hardware decoder is in use; fewer busy cores at
a higher load, that it is. Without a GPU it times DALI's CPU decoder once (the loads do not apply).
A JSON record is appended to benchmarks/results/dali_decoder_<device>.json.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

import data as data_benchmark          # benchmarks/data.py, beside this file: cpu_seconds, SAMPLE
import loss as loss_benchmark          # benchmarks/loss.py: device_slug, git_sha, history_appender

RESULTS = Path(__file__).parent / "results"
JPEG_SUFFIXES = (".jpg", ".jpeg")


def decoder_pipeline(files, batch: int, threads: int, device_id, load):
    """DALI: read `files`, decode (mixed at hardware share `load`, or the CPU decoder when
    device_id is None), resize to 224 x 224."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=device_id, prefetch_queue_depth=2)
    def graph():
        jpegs, _ = fn.readers.file(files=files, random_shuffle=False, name="reader")
        if device_id is None:
            images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        else:
            images = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=load)
        return fn.resize(images, size=[224, 224], interp_type=types.INTERP_LINEAR, antialias=True)

    return graph()


def time_decoder(files, batch: int, threads: int, device_id, load, seconds: float) -> dict:
    """images/s and busy cores of the pipeline over `seconds` (after 3 warm-up batches)."""
    pipe = decoder_pipeline(files, batch, threads, device_id, load)
    pipe.build()
    for _ in range(3):
        pipe.run()
    cpu0, start, images = data_benchmark.cpu_seconds(), time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        (out,) = pipe.run()
        images += len(out)
    wall = time.perf_counter() - start
    result = {"images_per_s": images / wall, "cores_busy": (data_benchmark.cpu_seconds() - cpu0) / wall,
              "images": images, "seconds": wall}
    del pipe
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(data_benchmark.SAMPLE), help="a folder of JPEGs (searched recursively)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--loads", type=float, nargs="+", default=[0.0, 0.65, 1.0],
                        help="hw_decoder_load values to time (GPU only)")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per load")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.threads < 1 or args.seconds <= 0 or not all(0.0 <= x <= 1.0 for x in args.loads):
        parser.error("--batch and --threads must be >= 1, --seconds > 0, every --loads value in [0, 1]")
    if not data_benchmark.installed("nvidia.dali"):
        parser.error("DALI is not installed (pip install -e '.[dali]')")
    files = sorted(str(p) for p in Path(args.data).rglob("*") if p.suffix.lower() in JPEG_SUFFIXES)
    if not files:
        parser.error(f"--data {args.data}: no JPEG files there")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    device = "cuda" if cuda else "cpu"
    runs = {f"hw_decoder_load={load:g}": load for load in args.loads} if cuda else {"cpu decoder": None}
    results = {}
    print(f"DALI decoder on {len(files)} JPEGs, batch {args.batch}, {args.threads} threads, {device}", flush=True)
    for name, load in runs.items():
        r = results[name] = time_decoder(files, args.batch, args.threads, torch.cuda.current_device() if cuda else None,
                                         load, args.seconds)
        print(f"  {name:22s}{r['images_per_s']:10.1f} images/s  {r['cores_busy']:5.2f} cores busy", flush=True)
    import nvidia.dali
    record = {"benchmark": "dali_decoder", "device": loss_benchmark.device_slug(device),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(["python"] + sys.argv),
              "git_sha": loss_benchmark.git_sha(), "versions": {"nvidia.dali": nvidia.dali.__version__,
                                                               "torch": torch.__version__},
              "data": args.data, "files": len(files), "batch": args.batch, "threads": args.threads,
              "size": 224, "results": results}
    out = Path(args.out) if args.out else RESULTS / f"dali_decoder_{record['device']}.json"
    loss_benchmark.history_appender(out)(record)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
