"""Two gloo processes on the global batch train the same model as one process on that batch."""
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fastssl.config import flatten, load_config, to_dict
from fastssl.methods import build_method
from fastssl.train import train
from fastssl.train.checkpoint import load_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, values: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train(load_config(None, values))


def _losses(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["event"] == "train"]


def _spawn(cfg) -> None:
    values = flatten(to_dict(cfg))
    mp.spawn(_worker, args=(2, _free_port(), values), nprocs=2, join=True)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_match_one_process(tiny_config, tmp_path):
    overrides = {"train.stop_after_steps": 3, "train.threads": 1, "train.sync_bn": True, "optim.lr": 0.2}
    single = tiny_config(**overrides, **{"run.dir": str(tmp_path / "single")})
    threads = torch.get_num_threads()
    try:
        train(single)
    finally:
        torch.set_num_threads(threads)
    _spawn(tiny_config(**overrides, **{"run.dir": str(tmp_path / "ddp")}))

    a = load_checkpoint(tmp_path / "single" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    assert (b["epoch"], b["batch"], b["step"]) == (a["epoch"], a["batch"], a["step"]) == (0, 3, 3)
    # Not bitwise: fp32 sums in another order (per-rank partial sums, all_reduce, DDP's gradient
    # average). At lr 0.2 these 3 steps are well-conditioned: the losses agree to float32 rounding,
    # and every parameter's update (its change from the initial weights) agrees within 2%
    # (measured on an Intel Xeon), so each must agree within 10%; a wrong shard, gradient average or
    # batch-norm synchronisation changes it wholesale. (At lr 2 the batch-norm biases' plain SGD
    # steps make this tiny setting chaotic: the weights' updates differed by 13% between the runs.)
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "ddp")), torch.tensor(_losses(tmp_path / "single")),
                               rtol=1e-4, atol=1e-4)
    init = build_method(single).state_dict()
    for key, value in a["model"].items():
        if not value.is_floating_point():
            assert torch.equal(b["model"][key], value), key
        elif key.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-4,
                                       msg=lambda m, key=key: f"{key}: {m}")
        else:
            spread, update = (b["model"][key] - value).norm().item(), (value - init[key]).norm().item()
            assert spread <= 0.1 * update, (key, spread, update)
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "start" and records[0]["world_size"] == 2
    assert len([r for r in records if r["event"] == "train"]) == 3          # rank 0 alone writes metrics


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_resume_mid_epoch_exactly(tiny_config, tmp_path):
    """2 gloo ranks: stopped after 3 steps and resumed equals the uninterrupted 2-rank run, bit for bit;
    the checkpoint holds both ranks' RNG states."""
    base = {"train.threads": 1, "train.sync_bn": True, "eval.knn_k": 5}
    _spawn(tiny_config(**base, **{"run.dir": str(tmp_path / "full")}))
    _spawn(tiny_config(**base, **{"run.dir": str(tmp_path / "part"), "train.stop_after_steps": 3}))
    state = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (0, 3, 3) and len(state["rng"]) == 2
    _spawn(tiny_config(**base, **{"run.dir": str(tmp_path / "part"), "train.resume": True}))
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_global_batch_must_divide_by_the_processes(tiny_config, monkeypatch):
    import fastssl.train.trainer as trainer
    from fastssl.train.distributed import DistInfo
    monkeypatch.setattr(trainer, "init_distributed", lambda device: DistInfo(0, 3, 0))
    with pytest.raises(ValueError, match=r"train.batch_size=32 is the global batch and must be divisible by "
                                         r"the number of processes \(3\)"):
        train(tiny_config())


def test_all_reduce_batchnorm_is_plain_batchnorm_in_one_process():
    from fastssl.train.distributed import AllReduceBatchNorm, convert_sync_batchnorm
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.BatchNorm1d(64))
    converted = convert_sync_batchnorm(net, torch.device("cpu"))
    assert sum(isinstance(m, AllReduceBatchNorm) for m in converted.modules()) == 2
    assert converted.state_dict().keys() == net.state_dict().keys()


def _nan_worker(rank: int, world: int, port: int, values: dict) -> None:
    """Rank 1's second loss is NaN: every rank must skip that step together (no hang, no update)."""
    from fastssl.methods import simclr
    real, calls = simclr.SimCLR.forward, []

    def forward(self, views):
        loss, stats = real(self, views)
        calls.append(1)
        return (loss * float("nan"), stats) if rank == 1 and len(calls) == 2 else (loss, stats)

    simclr.SimCLR.forward = forward
    _worker(rank, world, port, values)


def test_a_non_finite_loss_on_one_rank_is_skipped_on_all(tiny_config, tmp_path):
    import time
    cfg = tiny_config(**{"train.stop_after_steps": 3, "run.dir": str(tmp_path / "nan")})
    values = flatten(to_dict(cfg))
    context = mp.spawn(_nan_worker, args=(2, _free_port(), values), nprocs=2, join=False)
    deadline = time.time() + 120
    while not context.join(timeout=1):
        if time.time() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the ranks hung on a non-finite step")
    records = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["in_a_row"]) for r in records if r["event"] == "nonfinite"] == [(1, 1)]
    assert load_checkpoint(tmp_path / "nan" / "checkpoints" / "last.pt")["step"] == 3
