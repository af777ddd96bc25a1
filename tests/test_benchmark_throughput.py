"""benchmarks/throughput.py: the loader-fed stages timed as the trainer runs them, and the share
of the training step the host spends in the loader."""
import json
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import throughput  # noqa: E402
from fastssl.config import load_config  # noqa: E402

DEMO = Path(__file__).parent.parent / "configs" / "demo.yaml"


@pytest.mark.parametrize("pipelined", [False, True])
def test_timed_returns_one_interval_per_step_summing_to_the_span(pipelined):
    calls = []
    start = time.perf_counter()
    times = throughput.timed(lambda: calls.append(time.sleep(0.01)), 4, 2, throughput.torch.device("cpu"),
                             pipelined=pipelined)
    span = time.perf_counter() - start
    assert len(calls) == 6 and len(times) == 4
    assert all(t >= 0.01 for t in times) and sum(times) <= span


class SlowLoader:
    """The loader, each batch taking `delay` seconds longer to come."""

    def __init__(self, loader, delay: float):
        self.loader, self.delay = loader, delay

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.delay)
            yield batch


def test_train_reports_the_hosts_time_in_the_loader(monkeypatch):
    delay, steps = 0.3, 3
    build = throughput.build_loader
    monkeypatch.setattr(throughput, "build_loader", lambda *a, **k: SlowLoader(build(*a, **k), delay))
    cfg = load_config(str(DEMO), ["train.device=cpu", "train.batch_size=8", "data.workers=0"])
    _, results = throughput.run(cfg, ("train", "train-premade"), steps=steps, warmup=1)
    train = results["train"]
    # Every timed step waited `delay` in the loader at least: that much of train's span is the loader's.
    assert train["data_wait_share"] * train["mean_s"] * steps >= delay * steps
    assert train["data_wait_share"] <= 1.0
    assert 0 < results["pipeline_efficiency"] < 1.0


def test_a_sweep_stage_exits_zero_and_writes_its_records(tmp_path):
    # `--stage loss-backends -- ARGS` runs benchmarks/loss.py, whose main returns its records: the
    # command's exit status is still 0 (sys.exit of a list would print it and exit 1).
    out = tmp_path / "loss.json"
    argv = ["--stage", "loss-backends", "--", "--device", "cpu", "--sizes", "256", "--impls", "torch",
            "--out", str(out)]
    assert throughput.main(argv) == 0
    assert [r["impl"] for r in json.loads(out.read_text())["records"]] == ["torch"]


def test_a_run_stopped_after_its_first_stage_keeps_it(tmp_path, monkeypatch):
    out = tmp_path / "throughput.json"
    summarise = throughput.summarise

    def stopped_at_second(times, n):
        if stopped_at_second.calls:
            raise KeyboardInterrupt
        stopped_at_second.calls += 1
        return summarise(times, n)

    stopped_at_second.calls = 0
    monkeypatch.setattr(throughput, "summarise", stopped_at_second)
    argv = ["--steps", "1", "--warmup", "0", "--out", str(out), "train.device=cpu", "train.batch_size=8",
            "data.workers=0"]
    with pytest.raises(KeyboardInterrupt):
        throughput.main(argv)
    (record,) = json.loads(out.read_text())
    assert list(record["stages"]) == ["data"] and record["stages"]["data"]["images_per_s"] > 0
    assert record["command"].endswith(" ".join(argv)) and not (tmp_path / "throughput.json.partial").exists()
