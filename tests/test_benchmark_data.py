"""benchmarks/data.py: each loader timed in a process of its own, past what it holds in flight; the
GPU kit's shell scripts."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import data as data_benchmark  # noqa: E402


def jpegs(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return folder


def test_a_loader_is_timed_past_its_prefetch_in_its_own_process(tmp_path):
    src, out = jpegs(tmp_path / "photos", 6), tmp_path / "data.json"
    argv = ["--loader", "pil", "--data", str(src), "--batch", "4", "--size", "16", "--workers", "1",
            "--batches", "3", "--warmup", "1", "--out", str(out), "train.device=cpu"]
    assert data_benchmark.main(argv) == 0
    (record,) = json.loads(out.read_text())
    pil = record["results"]["pil"]
    # One worker prefetches two batches: the warm-up is raised to 2 x 1 + 3 = 5 batches.
    assert pil["status"] == "ok" and pil["warmup_batches"] == data_benchmark.in_flight_batches("pil", 1) == 5
    assert pil["timed_batches"] == 3 and pil["images"] == 12 and pil["images_per_s"] > 0
    assert pil["vs_pil"] == 1.0


def test_a_stalled_or_failing_loader_is_stopped_and_marked(tmp_path):
    src = jpegs(tmp_path / "photos", 6)
    folder, distinct = data_benchmark.image_folder(src, tmp_path / "work", 8)
    assert distinct == 6 and len(list((folder / "images").iterdir())) == 12      # linked twice
    argv = ["--batch", "4", "--size", "16", "--workers", "0", "--warmup", "3", "--batches", "2", "train.device=cpu"]
    # Stopped while it still starts up (importing torch takes longer than 0.5 s).
    r = data_benchmark.run_in_child("pil", argv, folder, distinct, tmp_path, timeout=0.5)
    assert r["status"] == "stopped after 0 s (--loader-timeout)" and r["wall_s"] < 30
    # A loader that fails (here: a batch larger than the folder) is marked, not fatal.
    r = data_benchmark.run_in_child("pil", argv + ["--batch", "64"], folder, distinct, tmp_path, timeout=120)
    assert r["status"].startswith("failed (exit code 1")


def test_gpu_scripts_parse_and_the_lease_checks_its_call():
    """The GPU kit's shell scripts run only on a leased GPU, so their syntax is checked here, and
    gpu_lease.sh refuses a call it does not plan, and any call outside the GPU machine (no OUT),
    before it installs anything."""
    import os
    import subprocess
    scripts = sorted(BENCHMARKS.glob("*.sh"))
    assert {s.name for s in scripts} >= {"gpu_carry.sh", "gpu_env.sh", "gpu_lease.sh", "gpu_suite.sh"}
    for script in scripts:
        run = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert run.returncode == 0, (script.name, run.stderr)
    lease = str(BENCHMARKS / "gpu_lease.sh")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    wrong = subprocess.run(["bash", lease, "5"], capture_output=True, text=True, env=env)
    assert wrong.returncode == 2 and "CALL is 1, 2, 3 or 4, got '5'" in wrong.stderr
    here = subprocess.run(["bash", lease, "1"], capture_output=True, text=True, env=env)
    assert here.returncode != 0 and "runs on the GPU machine" in here.stderr


def test_the_record_is_written_after_each_loader(tmp_path, monkeypatch):
    """A run stopped after its first loader (a lease's time limit, Ctrl-C) keeps that loader's numbers."""
    src, out = jpegs(tmp_path / "photos", 6), tmp_path / "data.json"
    measured = {"images_per_s": 100.0, "cores_busy": 1.0, "status": "ok"}

    def run_in_child(name, *args):
        if name != "pil":
            raise KeyboardInterrupt
        return dict(measured)

    monkeypatch.setattr(data_benchmark, "run_in_child", run_in_child)
    monkeypatch.setattr(data_benchmark, "NEEDS", {})        # ffcv counts as installed here
    argv = ["--loader", "pil,ffcv", "--data", str(src), "--batch", "4", "--size", "16", "--workers", "1",
            "--out", str(out), "train.device=cpu"]
    try:
        data_benchmark.main(argv)
    except KeyboardInterrupt:
        pass
    (record,) = json.loads(out.read_text())
    assert record["loaders"] == ["pil", "ffcv"] and list(record["results"]) == ["pil"]
    assert record["results"]["pil"] == {**measured, "vs_pil": 1.0, "vs_pil_rounds": [1.0],
                                        "rounds_images_per_s": [100.0]}
    assert not (tmp_path / "data.json.partial").exists()


def test_rounds_take_each_ratio_within_a_round_and_report_the_median(tmp_path, monkeypatch):
    """The machine's speed drifts between rounds: a loader's ratio to pil is taken within each round."""
    src, out = jpegs(tmp_path / "photos", 6), tmp_path / "data.json"
    speeds = {"pil": iter([100.0, 200.0, 50.0]), "ffcv": iter([300.0, 500.0, None])}   # round 3: ffcv fails

    def run_in_child(name, *args):
        speed = next(speeds[name])
        if speed is None:
            return {"status": "failed (exit code 1, output above)"}
        return {"images_per_s": speed, "cores_busy": 1.0, "status": "ok"}

    monkeypatch.setattr(data_benchmark, "run_in_child", run_in_child)
    monkeypatch.setattr(data_benchmark, "NEEDS", {})
    argv = ["--loader", "pil,ffcv", "--data", str(src), "--batch", "4", "--size", "16", "--workers", "1",
            "--rounds", "3", "--out", str(out), "train.device=cpu"]
    assert data_benchmark.main(argv) == 0
    (record,) = json.loads(out.read_text())
    pil, ffcv = record["results"]["pil"], record["results"]["ffcv"]
    assert record["rounds"] == 3 and pil["rounds_images_per_s"] == [100.0, 200.0, 50.0]
    assert pil["images_per_s"] == 100.0 and pil["vs_pil"] == 1.0                 # the median round
    assert ffcv["rounds_images_per_s"] == [300.0, 500.0, None] and ffcv["vs_pil_rounds"] == [3.0, 2.5]
    assert ffcv["vs_pil"] == 2.75 and ffcv["images_per_s"] == 300.0             # not 300 / 100 of one pass
    with pytest.raises(SystemExit):
        data_benchmark.main(argv[:-3] + ["--rounds", "0", "train.device=cpu"])


def test_the_dali_decoder_benchmark_times_the_cpu_decoder_without_a_gpu(tmp_path):
    pytest.importorskip("nvidia.dali")
    import dali_decoder
    src, out = jpegs(tmp_path / "photos", 6), tmp_path / "dali_decoder.json"
    argv = ["--data", str(src), "--batch", "4", "--threads", "1", "--seconds", "0.2", "--device", "cpu",
            "--out", str(out)]
    assert dali_decoder.main(argv) == 0
    (record,) = json.loads(out.read_text())
    (name, result), = record["results"].items()
    assert name == "cpu decoder" and record["files"] == 6 and result["images"] % 4 == 0 and result["images_per_s"] > 0
    with pytest.raises(SystemExit):                       # a load outside [0, 1]
        dali_decoder.main(argv + ["--loads", "1.5"])
