"""benchmarks/demo_runs.py: the demo's kNN line per method and seed, recorded as JSON."""
import json
import sys
from pathlib import Path

import pytest

from conftest import TINY_DATA

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import demo_runs  # noqa: E402


def test_demo_runs_records_each_run_and_fails_loudly(tiny_cache, tmp_path):
    tiny = [f"data.cache_dir={tiny_cache}", "data.workers=0", *(f"data.{k}={v}" for k, v in TINY_DATA.items()),
            "augment.size=16", "model.proj_hidden_dim=64", "model.proj_dim=32", "train.epochs=1",
            "train.batch_size=32", "eval.knn_k=20"]
    out, runs_root = tmp_path / "demo.json", tmp_path / "runs"
    assert demo_runs.main(["simclr", "byol", "--seeds", "3", "--run-root", str(runs_root), "--out", str(out),
                           "--", *tiny]) == 0
    runs = {r["method"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"simclr", "byol"}
    for method, r in runs.items():
        assert r["knn_line"] == f"kNN top-1: {method}={r['knn_top1']:.1f}% random-init={r['knn_top1_random_init']:.1f}%"
        assert "train.seed=3" in r["command"] and r["epochs"] == 1
        assert 0 <= r["knn_top1_random_init_bn"] <= 100
    # The settings come from the run's own config: the demo file's per_method section reached BYOL only.
    assert (runs["byol"]["optim"]["name"], runs["simclr"]["optim"]["name"]) == ("sgd", "lars")
    # The last epoch's training statistics: the method's own (BYOL logs its EMA momentum).
    stats = {method: r["last_epoch_train_stats"] for method, r in runs.items()}
    assert "momentum" in stats["byol"] and "momentum" not in stats["simclr"]
    assert all(0 < s["loss"] < 10 for s in stats.values())

    assert all("knn_top1_by_epoch" not in r for r in runs.values())     # no kNN monitor in these runs

    # With the kNN monitor on, its score after each monitored epoch is recorded too: this run's only,
    # though the run folder's metrics.jsonl still holds the earlier runs' (epochs 1 and 2 of 3).
    for epochs, monitored_epochs in ((3, ["1", "2"]), (2, ["1"])):
        assert demo_runs.main(["simclr", "--run-root", str(runs_root), "--out", str(out), "--", *tiny,
                               f"train.epochs={epochs}", "eval.knn_every_epochs=1"]) == 0
        (monitored,) = json.loads(out.read_text())["runs"]
        assert list(monitored["knn_top1_by_epoch"]) == monitored_epochs
        assert all(0 <= v <= 100 for v in monitored["knn_top1_by_epoch"].values())

    # A run that fails is recorded with the end of its output, and the script exits non-zero.
    assert demo_runs.main(["simclr", "--run-root", str(runs_root), "--out", str(out), "--", "train.epoch=1"]) == 1
    (failed,) = json.loads(out.read_text())["runs"]
    assert "unknown config key 'train.epoch'" in failed["error"] and "knn_top1" not in failed


def test_last_epoch_means_average_the_last_epochs_numbers_only():
    events = [{"event": "train", "epoch": 1, "step": 5, "loss": 9.0},
              {"event": "train", "epoch": 2, "step": 10, "loss": 3.0, "momentum": 0.5},
              {"event": "train", "epoch": 2, "step": 12, "loss": 2.0, "momentum": 0.7}]
    assert demo_runs.last_epoch_means(events) == pytest.approx({"loss": 2.5, "momentum": 0.6})
