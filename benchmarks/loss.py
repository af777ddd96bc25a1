"""Benchmark of the InfoNCE / NT-Xent backends (forward, backward, forward+backward; memory).

GPU (``--device cuda``): sweep the global batch 2N (default 1,024 .. 262,144) and D (128, 256)
in bf16 and fp32 for: fastssl "triton" and "chunked", the eager reference ("torch"), the
torch.compile'd reference ("torch_compile"), lightly's NTXentLoss and Inf-CL when importable.
Times are CUDA-event medians with p20/p80; memory is the peak allocated above the inputs;
TFLOP/s counts the useful FLOPs (fwd 2*R*C*D, bwd 4*R*C*D, no recomputation) and is compared
with a cuBLAS bf16 8192^3 matmul timed in the same run.

CPU (``--device cpu``): "chunked" against the eager reference, fp32. Each configuration runs in
a fresh subprocess, so the peak resident set (VmHWM) belongs to that configuration alone; the
reference gets an address-space limit (``--ref-mem-limit-gb``) so that sizes it cannot hold
fail cleanly instead of swapping the machine.

Results: JSON under benchmarks/results/loss_<device-slug>.json (with the command line), rewritten
after each record (``record_writer``): a sweep stopped midway keeps what it measured.
``run(args, add)`` hands each record to ``add``; ``main(argv)`` is the CLI (also used by
throughput.py) and returns the records.
"""
import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: str) -> str:
    if device.startswith("cuda"):
        import torch
        return _slug(torch.cuda.get_device_name(0))
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1] for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu-{_slug(model)}-{os.cpu_count()}c"


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _summary(xs):
    return {"median": statistics.median(xs), "p20": _pct(xs, 0.2), "p80": _pct(xs, 0.8), "n": len(xs)}


def _vm_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _flops(n2: int, d: int):
    base = 2.0 * n2 * n2 * d
    return {"fwd": base, "bwd": 2 * base, "fwdbwd": 3 * base}


# ------------------------------------------------------------------------------ loss factories
def make_loss(impl: str, temperature: float):
    """A callable (z1, z2) -> scalar loss, or raise ImportError for a peer that is not installed."""
    import torch
    from fastssl.losses import info_nce, nt_xent_reference
    if impl in ("triton", "chunked"):
        return lambda a, b: info_nce(a, b, temperature, backend=impl)
    if impl == "torch":
        return lambda a, b: nt_xent_reference(a, b, temperature)
    if impl == "torch_compile":
        # The backward is timed alone by replaying one graph (retain_graph=True), which the
        # compiled backward refuses while it donates its saved buffers.
        import torch._functorch.config
        torch._functorch.config.donated_buffer = False
        return torch.compile(lambda a, b: nt_xent_reference(a, b, temperature))
    if impl == "lightly":
        from lightly.loss import NTXentLoss
        m = NTXentLoss(temperature=temperature)
        return lambda a, b: m(a, b)
    if impl == "infcl":
        # Inf-CL computes a CLIP-style q->k InfoNCE (not SimCLR's 2N x 2N); timed for scale only.
        from inf_cl import cal_inf_loss
        return lambda a, b: cal_inf_loss(torch.nn.functional.normalize(a, dim=1),
                                         torch.nn.functional.normalize(b, dim=1),
                                         scale=torch.tensor(1.0 / temperature, device=a.device)).mean()
    raise ValueError(f"unknown impl {impl!r}")


# ------------------------------------------------------------------------------------- CPU path
def cpu_worker(impl: str, n2: int, d: int, reps: int, warmup: int, temperature: float, mem_limit_gb):
    """One configuration in this (fresh) process; prints one JSON record."""
    if mem_limit_gb:
        lim = int(mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    import torch
    torch.manual_seed(0)
    z1 = torch.randn(n2 // 2, d, requires_grad=True)
    z2 = torch.randn(n2 // 2, d, requires_grad=True)
    loss_fn = make_loss(impl, temperature)
    base_kb = _vm_kb("VmRSS")
    rec = {"impl": impl, "n2": n2, "d": d, "dtype": "float32", "device": "cpu",
           "threads": torch.get_num_threads(), "base_rss_mb": base_kb / 1024}
    fwd, bwd, tot = [], [], []
    try:
        for i in range(warmup + reps):
            z1.grad = z2.grad = None
            t0 = time.perf_counter()
            loss = loss_fn(z1, z2)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            del loss
            if i >= warmup:
                fwd.append((t1 - t0) * 1e3)
                bwd.append((t2 - t1) * 1e3)
                tot.append((t2 - t0) * 1e3)
    except (RuntimeError, MemoryError) as e:
        rec.update(status="oom" if ("alloc" in str(e).lower() or isinstance(e, MemoryError)) else "error",
                   error=str(e).splitlines()[0][:300], mem_limit_gb=mem_limit_gb,
                   peak_rss_mb=_vm_kb("VmHWM") / 1024)
        print(json.dumps(rec))
        return
    peak_kb = _vm_kb("VmHWM")
    fl = _flops(n2, d)
    rec.update(status="ok", fwd_ms=_summary(fwd), bwd_ms=_summary(bwd), fwdbwd_ms=_summary(tot),
               peak_rss_mb=peak_kb / 1024, extra_rss_mb=(peak_kb - base_kb) / 1024,
               gflops_fwdbwd=fl["fwdbwd"] / (statistics.median(tot) * 1e-3) / 1e9,
               mem_limit_gb=mem_limit_gb)
    print(json.dumps(rec))


def run_cpu(args, add):
    for n2 in args.sizes:
        for impl in args.impls:
            reps = args.reps if n2 <= args.big else 1
            warm = 1 if n2 <= args.big // 2 else 0
            limit = args.ref_mem_limit_gb if impl in ("torch", "torch_compile") else None
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--impl", impl, "--sizes", str(n2),
                   "--dims", str(args.dims[0]), "--reps", str(reps), "--warmup", str(warm),
                   "--temperature", str(args.temperature)]
            if limit:
                cmd += ["--ref-mem-limit-gb", str(limit)]
            t0 = time.time()
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if out.returncode != 0 or not lines:
                rec = {"impl": impl, "n2": n2, "d": args.dims[0], "status": "error",
                       "error": (out.stderr.strip().splitlines() or ["?"])[-1][:300]}
            else:
                rec = json.loads(lines[-1])
            rec["wall_s"] = round(time.time() - t0, 1)
            add(rec)
            _print_record(rec)


# ------------------------------------------------------------------------------------- GPU path
def _cuda_time(fn, reps, warmup):
    import torch
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return ts


def cublas_reference_tflops(reps=20):
    import torch
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ts = _cuda_time(lambda: a @ b, reps, 3)
    return 2.0 * m ** 3 / (statistics.median(ts) * 1e-3) / 1e12


def _gpu_one(impl, n2, d, dtype_name, args):
    import torch
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    rec = {"impl": impl, "n2": n2, "d": d, "dtype": dtype_name, "device": "cuda"}
    elt = 4
    if impl in ("torch", "torch_compile", "lightly") and 5 * n2 * n2 * elt > args.gpu_mem_bytes:
        rec.update(status="skipped", note="the 2N x 2N logits do not fit")
        return rec
    try:
        loss_fn = make_loss(impl, args.temperature)
    except ImportError as e:
        rec.update(status="skipped", note=f"not installed ({e})")
        return rec
    g = torch.Generator(device="cuda").manual_seed(0)
    z1 = torch.randn(n2 // 2, d, device="cuda", dtype=dtype, generator=g).requires_grad_()
    z2 = torch.randn(n2 // 2, d, device="cuda", dtype=dtype, generator=g).requires_grad_()
    try:
        state = {}

        def fwd():
            state["loss"] = loss_fn(z1, z2)

        def bwd():
            state["loss"].backward(retain_graph=True)

        def both():
            z1.grad = z2.grad = None
            loss_fn(z1, z2).backward()

        reps = args.reps if n2 <= args.big else max(3, args.reps // 4)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t_both = _cuda_time(both, reps, 2)
        peak = torch.cuda.max_memory_allocated() - base
        t_fwd = _cuda_time(fwd, reps, 1)
        t_bwd = _cuda_time(bwd, reps, 1)
        state.clear()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        rec.update(status="oom")
        return rec
    except Exception as e:  # noqa: BLE001 - a peer's failure is a result, not a crash
        rec.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        return rec
    fl = _flops(n2, d)
    tf = {k: fl[k] / (statistics.median(t) * 1e-3) / 1e12
          for k, t in (("fwd", t_fwd), ("bwd", t_bwd), ("fwdbwd", t_both))}
    rec.update(status="ok", fwd_ms=_summary(t_fwd), bwd_ms=_summary(t_bwd), fwdbwd_ms=_summary(t_both),
               peak_extra_mem_mb=peak / 2**20, tflops=tf,
               share_of_cublas_bf16=tf["fwdbwd"] / args.cublas_tflops)
    del z1, z2
    torch.cuda.empty_cache()
    return rec


def run_gpu(args, add):
    import torch
    args.gpu_mem_bytes = torch.cuda.get_device_properties(0).total_memory
    args.cublas_tflops = cublas_reference_tflops()
    print(f"cuBLAS bf16 8192^3: {args.cublas_tflops:.1f} TFLOP/s")
    add({"impl": "cublas_bf16_8192", "status": "ok", "tflops": args.cublas_tflops})
    for dtype_name in args.dtypes:
        for d in args.dims:
            for n2 in args.sizes:
                for impl in args.impls:
                    rec = _gpu_one(impl, n2, d, dtype_name, args)
                    add(rec)
                    _print_record(rec)


# ---------------------------------------------------------------------------------------- CLI
def _print_record(rec):
    if rec.get("status") != "ok":
        print(f"{rec.get('impl'):>14} 2N={rec.get('n2'):>7} D={rec.get('d')} {rec.get('dtype', '')}: "
              f"{rec.get('status')} {rec.get('note', rec.get('error', ''))}", flush=True)
        return
    mem = rec.get("extra_rss_mb", rec.get("peak_extra_mem_mb"))
    print(f"{rec['impl']:>14} 2N={rec['n2']:>7} D={rec['d']} {rec['dtype']}: "
          f"fwd {rec['fwd_ms']['median']:.2f} ms, bwd {rec['bwd_ms']['median']:.2f} ms, "
          f"fwd+bwd {rec['fwdbwd_ms']['median']:.2f} ms, extra memory {mem:.0f} MiB", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="global batch sizes 2N")
    p.add_argument("--dims", type=int, nargs="+", default=None)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--impls", nargs="+", default=None)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--big", type=int, default=None, help="above this 2N, fewer repetitions")
    p.add_argument("--ref-mem-limit-gb", type=float, default=None,
                   help="CPU: address-space limit for the reference's subprocess")
    p.add_argument("--timeout-s", type=float, default=1800)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/loss_<device>.json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cpu = a.device == "cpu"
    a.sizes = a.sizes or ([4096, 8192, 16384, 32768] if cpu else [2 ** k for k in range(10, 19)])
    a.dims = a.dims or ([128] if cpu else [128, 256])
    a.impls = a.impls or (["torch", "chunked"] if cpu else
                          ["triton", "chunked", "torch", "torch_compile", "lightly", "infcl"])
    a.reps = a.reps or (3 if cpu else 20)
    a.big = a.big or (16384 if cpu else 65536)
    if cpu:
        a.dtypes = ["float32"]
        if a.ref_mem_limit_gb is None:
            avail_gb = _meminfo_gb("MemAvailable")
            a.ref_mem_limit_gb = round(min(12.0, 0.5 * avail_gb), 1) if avail_gb else 12.0
    return a


def _meminfo_gb(field):
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def run(args, add):
    """Run the sweep described by parsed ``args``, handing each result record to ``add``."""
    return run_cpu(args, add) if args.device == "cpu" else run_gpu(args, add)


def write_json(path, obj) -> None:
    """`obj` as JSON in `path` (its folder made first), through a renamed .partial file: the file
    is never found half-written, even when the run is stopped while it writes. The benchmarks
    write their records with it as they go, so a run stopped midway (a lease's time limit) keeps
    what it measured."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        f.write(json.dumps(obj, indent=1) + "\n")
    os.replace(partial, path)


def history_appender(path):
    """save(record): `record` appended to the JSON list of records in `path` (read once, here) and
    written again in its place at every later call, as the record grows (`write_json`)."""
    history = json.loads(Path(path).read_text()) if os.path.exists(path) else []
    return lambda record: write_json(path, history + [record])


def record_writer(out: str, meta: dict):
    """(records, add): add(record) appends to `records` and rewrites `out` as {"meta", "records"}
    (`write_json`)."""
    records = []

    def add(record):
        records.append(record)
        write_json(out, {"meta": meta, "records": records})

    return records, add


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        cpu_worker(args.impl, args.sizes[0], args.dims[0], args.reps, args.warmup, args.temperature,
                   args.ref_mem_limit_gb)
        return None
    import torch
    out = args.out or os.path.join(RESULTS, f"loss_{device_slug(args.device)}.json")
    meta = {"command": " ".join(["python", "benchmarks/loss.py"] + argv),
            "device": args.device, "device_slug": device_slug(args.device),
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "temperature": args.temperature,
            "flops_convention": "useful FLOPs: fwd 2*R*C*D, bwd 4*R*C*D, fwd+bwd 6*R*C*D (R = C = 2N)"}
    if args.device == "cpu":
        meta["ref_mem_limit_gb"] = args.ref_mem_limit_gb
        meta["mem_available_gb"] = _meminfo_gb("MemAvailable")
    records, add = record_writer(out, meta)
    run(args, add)
    print(f"wrote {out}")
    return records


if __name__ == "__main__":
    main()
