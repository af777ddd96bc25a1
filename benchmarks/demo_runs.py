"""The demo's kNN top-1 per method, recorded: for each method X it runs the README's command
``fastssl train --config configs/demo.yaml method.name=X train.threads=1`` (``--jobs`` at a time,
one thread each) and keeps the final line ``kNN top-1: X=NN.N% random-init=NN.N%`` and the
random-init score with batch-norm statistics of the training images (the line before it).

    python benchmarks/demo_runs.py byol simsiam dino moco_v3 [--seeds 0 1] [--jobs 2] [-- key=value ...]

Writes benchmarks/results/methods_demo_<device>.json: the command of every run, its kNN line and
its numbers (and the kNN monitor's, per epoch, under eval.knn_every_epochs), the mean of each
training statistic over the last epoch's log lines, its wall time (not the demo's time alone
when runs share the cores), and the method and optimiser settings it resolved (from the run's
config.yaml, so per-method sections show).
A run that fails is recorded with the tail of its log, and the script exits non-zero.
"""
import argparse
import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

import loss as loss_benchmark   # benchmarks/loss.py, beside this file: device name and git sha

ROOT = Path(__file__).resolve().parents[1]
KNN_LINE = re.compile(r"kNN top-1: (\w+)=([\d.]+)% random-init=([\d.]+)%")
BN_LINE = re.compile(r"random-init with batch-norm statistics of the training images: ([\d.]+)%")


def run_one(method: str, seed: int, run_root: Path, extra: list) -> dict:
    run_dir = run_root / f"{method}_seed{seed}"
    command = ["fastssl", "train", "--config", "configs/demo.yaml", f"method.name={method}",
               "train.threads=1", f"train.seed={seed}", f"run.dir={run_dir}", *extra]
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "fastssl", *command[1:]], cwd=ROOT,
                          capture_output=True, text=True)
    record = {"method": method, "seed": seed, "command": " ".join(command),
              "wall_seconds": round(time.time() - start)}
    output = proc.stdout + proc.stderr
    match = KNN_LINE.search(output)
    if proc.returncode != 0 or not match:
        record["error"] = output[-2000:]
        return record
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    record.update(knn_line=match.group(0), knn_top1=float(match.group(2)),
                  knn_top1_random_init=float(match.group(3)),
                  settings=cfg["method"].get(method, {}), optim=cfg["optim"], epochs=cfg["train"]["epochs"])
    bn = BN_LINE.search(output)          # absent under eval.random_init_bn=false
    if bn:
        record["knn_top1_random_init_bn"] = float(bn.group(1))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_start = max(i for i, r in enumerate(metrics) if r["event"] == "start")   # the file appends runs
    this_run = metrics[last_start:]
    monitor = {r["epoch"]: r["knn_top1"] for r in this_run if r["event"] == "knn"}
    if monitor:                          # eval.knn_every_epochs: the kNN monitor's score after those epochs
        record["knn_top1_by_epoch"] = monitor
    record["last_epoch_train_stats"] = last_epoch_means([r for r in this_run if r["event"] == "train"])
    return record


def last_epoch_means(train_events: list) -> dict:
    """The mean of each number the method logged over the train events of the last epoch (the
    loss and its statistics, less noisy than the last step alone)."""
    last = [r for r in train_events if r["epoch"] == train_events[-1]["epoch"]]
    keys = [k for k, v in last[0].items() if isinstance(v, (int, float)) and k not in ("epoch", "step")]
    return {k: sum(r[k] for r in last) / len(last) for k in keys}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("methods", nargs="+", help="method names (method.name values)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed values, one run each")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each takes one thread)")
    p.add_argument("--run-root", default=str(ROOT / "runs" / "demo_runs"), help="where the runs write")
    p.add_argument("--out", help="the JSON file (default benchmarks/results/methods_demo_<device>.json)")
    argv = sys.argv[1:] if argv is None else argv
    ours, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = p.parse_args(ours)   # after "--": key=value overrides for every run
    jobs = [(m, s) for m in args.methods for s in args.seeds]
    sha = loss_benchmark.git_sha()       # the code the runs start from (a commit during the runs moves HEAD)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, m, s, Path(args.run_root), extra) for m, s in jobs]
        records = []
        for future in futures:
            rec = future.result()
            print(rec.get("knn_line") or f"{rec['method']} seed {rec['seed']}: FAILED\n{rec['error']}", flush=True)
            records.append(rec)
    device = loss_benchmark.device_slug("cpu")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"methods_demo_{device}.json"
    out.write_text(json.dumps({
        "benchmark": "methods_demo", "device": device, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "git_sha": sha, "command": " ".join(["python", "benchmarks/demo_runs.py", *argv]),
        "note": f"{args.jobs} runs at a time, one thread each", "runs": records}, indent=1) + "\n")
    print(f"wrote {out}")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
