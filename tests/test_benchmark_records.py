"""benchmarks/loss.py and augment.py write their JSON after every record, so that a sweep stopped
midway (a GPU lease's time limit) keeps what it measured."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import augment as augment_benchmark  # noqa: E402
import loss as loss_benchmark  # noqa: E402


def test_record_writer_keeps_every_finished_record(tmp_path):
    out = tmp_path / "results" / "x.json"
    records, add = loss_benchmark.record_writer(str(out), {"command": "test"})
    add({"impl": "a"})
    assert json.loads(out.read_text()) == {"meta": {"command": "test"}, "records": [{"impl": "a"}]}
    add({"impl": "b"})
    assert json.loads(out.read_text())["records"] == records == [{"impl": "a"}, {"impl": "b"}]
    assert not Path(str(out) + ".partial").exists()


def test_an_augment_sweep_stopped_after_its_first_implementation_keeps_it(tmp_path, monkeypatch):
    out = tmp_path / "augment.json"
    timed = []

    def time_fn(fn, device, reps, warmup):
        if timed:                                    # the sweep is stopped during the second one
            raise KeyboardInterrupt
        timed.append(fn)
        return {"median": 0.5, "p20": 0.5, "p80": 0.5, "n": 1}

    monkeypatch.setattr(augment_benchmark, "time_fn", time_fn)
    argv = ["--device", "cpu", "--batch", "2", "--size", "8", "--height", "12", "--width", "16",
            "--impls", "kornia", "torchvision", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        augment_benchmark.main(argv)
    (record,) = json.loads(out.read_text())["records"]
    assert record["impl"] == "kornia" and record["images_per_s"] == 4.0


def test_history_appender_keeps_the_earlier_records_and_rewrites_its_own(tmp_path):
    out = tmp_path / "history.json"
    out.write_text(json.dumps([{"run": 1}]))
    save = loss_benchmark.history_appender(out)
    save({"run": 2, "stages": ["data"]})
    save({"run": 2, "stages": ["data", "train"]})
    assert json.loads(out.read_text()) == [{"run": 1}, {"run": 2, "stages": ["data", "train"]}]
    assert not (tmp_path / "history.json.partial").exists()
