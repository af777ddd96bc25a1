"""The methods' cross-rank state under torch.distributed (2 gloo CPU processes).

- MoCo v2's queue: every rank enqueues the keys of the global batch (rank order, view 1 then view 2),
  so the queue and its pointer stay identical on every rank, through the wrap-around.
- MoCo v2 / v3's loss on 2 ranks equals the single-process loss on the concatenated batch.
- DINO's centre is the EMA of the teacher's mean output over the GLOBAL batch, the same on every rank.
- OBoW's vocabularies: every rank writes the global batch's words (rank order) and the bias-corrected
  EMA of the global batch's mean minimum distance, so they stay identical.
- End to end: `train` with moco_v2 on 2 processes keeps a consistent queue in its checkpoint, and
  refuses train.sync_bn=false.

Starting a process pair costs ~10 s of imports on a small CPU, so the module-level checks share one
spawn (`method_results`: the workers join a gloo group themselves and run every target, each
result or traceback coming back through a file) and the trainer checks share another
(`train_results`: `train` called several times per worker, each on its own port). Every spawn has
a deadline, so a hang fails instead of blocking.
"""
import copy
import json
import math
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fastssl.config import ConfigError, flatten, load_config, to_dict
from fastssl.methods import build_method
from fastssl.train import train
from fastssl.train.checkpoint import load_checkpoint

requires_dist = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

WORLD = 2
N = 4                 # local batch of the module-level checks
SIZE = 16             # global views' side
DEADLINE_S = 180


# ------------------------------------------------------------------------------------------ helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, args, nprocs=WORLD, deadline_s=DEADLINE_S) -> bool:
    """mp.spawn `fn(rank, *args)` on `nprocs` processes; False (the processes killed) past the deadline."""
    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.time() + deadline_s
    while not context.join(timeout=1):
        if time.time() > deadline:
            for p in context.processes:
                p.kill()
            return False
    return True


def _rank_results(out: Path, name: str, finished: bool) -> list:
    """The result file `name` of every rank (a test failure when one is missing)."""
    results = []
    for r in range(WORLD):
        path = out / f"{name}.rank{r}.pt"
        if not path.exists():
            pytest.fail(f"no result of {name} from rank {r}" + ("" if finished else " (the ranks hung)"))
        results.append(torch.load(path, weights_only=False))
    return results


def _config(**overrides):
    """The module-level checks' config: tiny heads (no data is read)."""
    return load_config(None, {"model.backbone": "resnet18", "model.proj_hidden_dim": 64, "model.proj_dim": 32,
                              "method.moco_v3.pred_hidden_dim": 64, "train.device": "cpu", **overrides})


def _views(rank: int, step: int, shapes):
    """Rank `rank`'s views at `step`: different data on every rank and step."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(shape, generator=g) for shape in shapes]


def _local_views(rank: int, world: int, step: int, shapes):
    """This rank's views; in one process (world 1), the 2 ranks' views concatenated per view (the global batch)."""
    if world > 1:
        return _views(rank, step, shapes)
    per_rank = [_views(r, step, shapes) for r in range(WORLD)]
    return [torch.cat([v[i] for v in per_rank]) for i in range(len(shapes))]


def _gather(t: torch.Tensor):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


# ---------------------------------------------------------------------- the module-level targets
QUEUE = 72            # 16 keys a step: steps write [0,16) [16,32) [32,48) [48,64) [64,72)+[0,8) [8,24)
QUEUE_STEPS = 6
LOSS_STEPS = 2
DINO_SHAPES = [(N, 3, SIZE, SIZE)] * 2 + [(N, 3, 8, 8)] * 2


def _moco_queue_target(rank, world, cfg):
    method = build_method(cfg)
    records = []
    for step in range(QUEUE_STEPS):
        views = _views(rank, step, [(N, 3, SIZE, SIZE)] * 2)
        queue_before, ptr_before = method.queue.clone(), int(method.queue_ptr)
        method.before_step(step)
        loss, _ = method(views)
        loss.backward()
        with torch.no_grad():      # this rank's own keys, as the key encoder gives them (train-mode BN, same batch)
            k = F.normalize(method.key_projector(method.key_backbone(torch.cat(views))).float(), dim=1)
        method.after_step()
        records.append({"keys": k, "queue_before": queue_before, "ptr_before": ptr_before,
                        "queues": _gather(method.queue), "ptrs": _gather(method.queue_ptr.view(1))})
    return records


def _moco_loss_target(rank, world, cfg):
    """The losses of LOSS_STEPS forwards (after_step between them, no optimiser step): on 2 ranks with
    batch-norm statistics over the global batch, or in one process on the concatenated batch."""
    from fastssl.train.distributed import convert_sync_batchnorm
    method = build_method(cfg)
    if world > 1:
        method = convert_sync_batchnorm(method, torch.device("cpu"))
    method.set_schedule(10, 10)
    losses = []
    for step in range(LOSS_STEPS):
        method.before_step(step)
        loss, _ = method(_local_views(rank, world, step, [(N, 3, SIZE, SIZE)] * 2))
        losses.append(loss.item())
        method.after_step()
    return losses


def _dino_center_target(rank, world, cfg):
    method = build_method(cfg)
    method.set_schedule(10, 10)
    out = []
    for step in range(2):
        views = _views(rank, step, DINO_SHAPES)
        method.before_step(step)
        loss, _ = method(views)
        loss.backward()
        with torch.no_grad():      # this rank's teacher outputs (train-mode BN over the same batch as forward's)
            t = method.teacher_head(method.teacher_backbone(torch.cat(views[:2]))).float()
        method.after_step()
        out.append({"teacher": t, "centers": _gather(method.center)})
    return out


OBOW_SHAPES = [(N, 3, SIZE, SIZE)] + [(N, 3, 12, 12)] * 2 + [(N, 3, 8, 8)] * 2
OBOW_WORDS = 24       # 8 words a step: steps write [0,8) [8,16) [16,24)


def _obow_vocabulary_target(rank, world, cfg):
    """Per step: this rank's own batch mean minimum distance and sampled words per level (computed
    on a copy of the teacher, as forward does), and every rank's vocabulary state after the step."""
    from fastssl.methods.obow import drop_border, sample_words, stage_maps, word_distances
    method = build_method(cfg)
    method.set_schedule(10, 10)
    out = []
    for step in range(3):
        views = _views(rank, step, OBOW_SHAPES)
        method.before_step(step)
        own = {}
        with torch.no_grad():
            maps = stage_maps(copy.deepcopy(method.teacher_backbone), views[0], method.levels)
        for level, fmap in zip(method.levels, maps):
            fmap = drop_border(fmap)
            d = word_distances(fmap, method.vocabularies[level].words)
            own[level] = (d.min(-1).values.mean(), sample_words(fmap, cfg.method.obow.word_pool_size,
                                                                 method.word_generator_for_step()))
        loss, _ = method(views)
        loss.backward()
        method.after_step()
        state = {level: {name: _gather(buf.reshape(-1)) for name, buf in v.named_buffers()}
                 for level, v in method.vocabularies.items()}
        out.append({"own": own, "state": state})
    return out


TARGETS = {
    "queue": (_moco_queue_target, {"method.name": "moco_v2", "method.moco_v2.queue_size": QUEUE}),
    "loss_moco_v2": (_moco_loss_target, {"method.name": "moco_v2", "method.moco_v2.queue_size": QUEUE}),
    "loss_moco_v3": (_moco_loss_target, {"method.name": "moco_v3"}),
    "dino": (_dino_center_target, {"method.name": "dino", "method.dino.out_dim": 256, "method.dino.local_size": 8,
                                   "method.dino.local_crops": 2}),
    "obow": (_obow_vocabulary_target, {"method.name": "obow", "augment.size": SIZE,
                                       "method.obow.levels": ["layer2", "layer3"],
                                       "method.obow.vocabulary_size": OBOW_WORDS,
                                       "method.obow.generator_hidden_dim": 32, "method.obow.student_size": 12,
                                       "method.obow.local_size": 8, "method.obow.local_crops": 2}),
}


def _method_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Join a gloo group and run every target; out_dir/<name>.rank<r>.pt holds its result or traceback."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for name, (target, overrides) in TARGETS.items():
            try:
                result = {"ok": target(rank, world, _config(**overrides))}
            except Exception:      # reported by the test that reads it; a collective left half-done would hang
                result = {"error": traceback.format_exc()}
            torch.save(result, Path(out_dir) / f"{name}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def method_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("methods")
    finished = _spawn(_method_worker, (WORLD, _free_port(), str(out)))

    def get(name):
        results = []
        for r, result in enumerate(_rank_results(out, name, finished)):
            if "error" in result:
                pytest.fail(f"{name} raised on rank {r}:\n{result['error']}")
            results.append(result["ok"])
        return results
    return get


# ------------------------------------------------------------------------------ 1. MoCo v2's queue
@requires_dist
def test_moco_v2_queue_holds_the_global_keys_in_rank_order_on_every_rank(method_results):
    res = method_results("queue")
    per_step = 2 * WORLD * N
    expected_queue = res[0][0]["queue_before"].clone()
    assert torch.equal(res[1][0]["queue_before"], expected_queue)     # same seed, same initial queue
    expected_ptr, wrapped = 0, False
    for step in range(QUEUE_STEPS):
        r0, r1 = res[0][step], res[1][step]
        # (a) identical on both ranks (all_gathered on each rank)
        for r in (r0, r1):
            assert torch.equal(r["queues"][0], r["queues"][1]), f"step {step}: the queues differ across ranks"
            assert int(r["ptrs"][0]) == int(r["ptrs"][1]), f"step {step}: queue_ptr differs across ranks"
        assert r0["ptr_before"] == r1["ptr_before"] == expected_ptr
        # (b) rank 0's then rank 1's keys of view 1, then those of view 2, written from queue_ptr on
        (k1_0, k2_0), (k1_1, k2_1) = r0["keys"].chunk(2), r1["keys"].chunk(2)
        keys = torch.cat([k1_0, k1_1, k2_0, k2_1])
        rows = (expected_ptr + torch.arange(per_step)) % QUEUE
        wrapped = wrapped or bool((rows[1:] < rows[:-1]).any())
        torch.testing.assert_close(r0["queue_before"], expected_queue, rtol=0, atol=0)
        expected_queue[rows] = keys
        expected_ptr = (expected_ptr + per_step) % QUEUE
        assert int(r0["ptrs"][0]) == expected_ptr, f"step {step}: queue_ptr not advanced by {per_step}"
        # every row: the written ones are the global keys, the others untouched
        torch.testing.assert_close(r0["queues"][0], expected_queue, rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"step {step}: {m}")
    assert wrapped, "the steps must cover the queue's wrap-around"     # (c)
    # the keys differ per rank (else the rank order would not be tested)
    assert not torch.allclose(res[0][0]["keys"], res[1][0]["keys"], atol=1e-3)


# -------------------------------------------------------------- 2. MoCo v2 / v3 loss = global batch
@requires_dist
@pytest.mark.parametrize("name", ["moco_v2", "moco_v3"])
def test_moco_loss_on_two_ranks_equals_one_process_on_the_global_batch(name, method_results, one_cpu_thread):
    res = method_results(f"loss_{name}")
    target, overrides = TARGETS[f"loss_{name}"]
    single = torch.tensor(target(0, 1, _config(**overrides)))
    # Each rank's loss is the mean over its rows; with equal local batches the global loss is their mean.
    # (Step 2 of moco_v2 also uses the queue after step 1's enqueue of the global keys.)
    torch.testing.assert_close(torch.tensor(res).mean(dim=0), single, rtol=1e-5, atol=1e-5)
    # The ranks' own losses differ (different rows), so the comparison involves both ranks' positives.
    assert abs(res[0][0] - res[1][0]) > 1e-4


# ------------------------------------------------------------------------------------ 3. DINO centre
@requires_dist
def test_dino_center_is_the_ema_of_the_global_batch_mean_on_every_rank(method_results):
    res = method_results("dino")
    m = _config(**TARGETS["dino"][1]).method.dino.center_momentum
    center = torch.zeros(1, 256)
    for step in range(2):
        for r in range(WORLD):
            c = res[r][step]["centers"]
            assert torch.equal(c[0], c[1]), f"step {step}: the centre differs across ranks"
        teacher = torch.cat([res[r][step]["teacher"] for r in range(WORLD)])
        center = center * m + (1 - m) * teacher.mean(dim=0, keepdim=True)
        torch.testing.assert_close(res[0][step]["centers"][0], center, rtol=1e-5, atol=1e-6,
                                   msg=lambda msg: f"step {step}: {msg}")
        # the ranks' local means differ: a per-rank centre would not pass the check above
        local = [res[r][step]["teacher"].mean(dim=0) for r in range(WORLD)]
        assert not torch.allclose(local[0], local[1], atol=1e-4)


# ---------------------------------------------------------------------------- 4. OBoW's vocabularies
@requires_dist
def test_obow_vocabularies_are_the_same_on_every_rank_and_hold_the_global_words(method_results):
    res = method_results("obow")
    m = _config(**TARGETS["obow"][1]).method.obow.min_distance_momentum
    levels = list(res[0][0]["own"])
    mean_min = {}
    for step in range(3):
        for level in levels:
            state = res[0][step]["state"][level]
            for name, per_rank in state.items():          # (a) identical on both ranks
                assert torch.equal(per_rank[0], per_rank[1]), f"step {step}: {level} {name} differs across ranks"
            # (b) the bias-corrected EMA of the global batch's mean minimum distance (the ranks' mean)
            batch = sum(res[r][step]["own"][level][0] for r in range(WORLD)) / WORLD
            mean_min[level] = batch if step == 0 else mean_min[level] + (1 - m) / (1 - m ** (step + 1)) * (
                batch - mean_min[level])
            torch.testing.assert_close(state["mean_min_distance"][0], mean_min[level].reshape(1))
            assert int(state["batches"][0]) == step + 1
            # (c) the words written this step: rank 0's, then rank 1's
            rows = slice(step * WORLD * N, (step + 1) * WORLD * N)
            words = state["words"][0].view(OBOW_WORDS, -1)
            expected = torch.cat([res[r][step]["own"][level][1] for r in range(WORLD)])
            torch.testing.assert_close(words[rows], expected)
            assert int(state["ptr"][0]) == (step + 1) * WORLD * N % OBOW_WORDS
    # the ranks' own distances and words differ, so a per-rank vocabulary would not pass (a)-(c)
    own = [res[r][0]["own"][levels[0]] for r in range(WORLD)]
    assert own[0][0] != own[1][0] and not torch.allclose(own[0][1], own[1][1])


# ------------------------------------------------------------------------------ 5. end to end: train
E2E_QUEUE, E2E_BATCH, E2E_STEPS = 96, 16, 2
# stage -> (overrides, work around the convert_sync_batchnorm bug); run in this order
STAGES = {
    "no_sync_bn": {"train.sync_bn": False, "train.stop_after_steps": 1},
    "sync_bn": {"train.sync_bn": True},
    # a pretext method under DDP: one task per step leaves the other head idle, which DDP refuses
    # unless every parameter takes part in the backward
    "multitask_alternate": {"method.name": "multitask", "method.multitask.mode": "alternate",
                            "method.multitask.tasks": ["rotation", "colorization"], "method.colorization.grid": 20},
    # the training set's features computed in shares and gathered, then one clustering for all ranks
    "deepcluster": {"method.name": "deepcluster", "method.deepcluster.clusters": 8, "method.deepcluster.pca_dim": 16},
}


def _train_worker(rank: int, world: int, ports: dict, stage_values: dict, out_dir: str) -> None:
    """`train` as torchrun would start it, once per stage (each on its own port); records MoCo v2's
    queue after every after_step, DeepCluster's features and assignment at every clustering, a
    ConfigError's message or another exception's traceback."""
    from fastssl.methods import deepcluster, moco
    torch.set_num_threads(1)
    real_after_step, real_before_epoch = moco.MoCoV2.after_step, deepcluster.DeepCluster.before_epoch
    seen, clustered = [], []

    def after_step(self):
        real_after_step(self)
        seen.append((self.queue.clone(), int(self.queue_ptr)))

    def before_epoch(self, epoch, training_features):
        features = []
        reset = real_before_epoch(self, epoch, lambda net: features.append(training_features(net)) or features[0])
        clustered.append({"features": features[0], "assignments": self.assignments.clone()})
        return reset

    moco.MoCoV2.after_step = after_step
    deepcluster.DeepCluster.before_epoch = before_epoch
    for stage, values in stage_values.items():
        seen.clear()
        clustered.clear()
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[stage]))
        try:
            train(load_config(None, values))
            result = {"ok": list(seen), "clustered": list(clustered)}
        except ConfigError as exc:
            result = {"config_error": str(exc)}
        except Exception:
            result = {"error": traceback.format_exc()}
        torch.save(result, Path(out_dir) / f"{stage}.rank{rank}.pt")


@pytest.fixture(scope="module")
def train_results(tiny_cache, tmp_path_factory):
    from conftest import TINY_DATA
    out = tmp_path_factory.mktemp("train")
    base = {"data.cache_dir": str(tiny_cache), "data.workers": 0, **{f"data.{k}": v for k, v in TINY_DATA.items()},
            "augment.size": 16, "augment.crop_scale": [0.3, 1.0], "augment.blur_p": 0.0,
            "augment.jitter_strength": 0.5, "optim.lr": 2.0, "optim.lr_scaling": "none", "optim.warmup_epochs": 0.5,
            "train.epochs": 2, "train.log_every": 1, "train.threads": 1, "eval.knn_k": 20,
            "train.batch_size": E2E_BATCH, "train.stop_after_steps": E2E_STEPS,
            "method.moco_v2.queue_size": E2E_QUEUE}
    cfgs = {stage: _config(**{**base, "method.name": "moco_v2", "run.dir": str(out / stage), **overrides})
            for stage, overrides in STAGES.items()}
    ports = {stage: _free_port() for stage in STAGES}
    finished = _spawn(_train_worker, (WORLD, ports, {s: flatten(to_dict(c)) for s, c in cfgs.items()}, str(out)))

    def get(stage):
        return _rank_results(out, stage, finished), cfgs[stage]
    return get


def _check_queue_of_the_run(results, cfg):
    for r, result in enumerate(results):
        assert "ok" in result, f"rank {r}: train raised:\n{result.get('error') or result.get('config_error')}"
    state = load_checkpoint(Path(cfg.run.dir) / "checkpoints" / "last.pt")
    assert state["step"] == E2E_STEPS
    queue, ptr = state["model"]["queue"], int(state["model"]["queue_ptr"])
    written = E2E_STEPS * 2 * E2E_BATCH                  # 2 views of the global batch a step
    assert written < E2E_QUEUE and ptr == written % E2E_QUEUE
    initial = build_method(cfg).queue
    # the rows written differ from the initial random keys (each one), the others are untouched
    assert (queue[:written] - initial[:written]).abs().amax(dim=1).min() > 1e-3
    assert torch.equal(queue[written:], initial[written:])
    torch.testing.assert_close(queue[:written].norm(dim=1), torch.ones(written), rtol=1e-5, atol=1e-5)
    # every rank's queue after every step: the same, and the last one is the checkpoint's
    seen = [result["ok"] for result in results]
    assert [p for _, p in seen[0]] == [p for _, p in seen[1]] == [2 * E2E_BATCH * (s + 1) % E2E_QUEUE
                                                                  for s in range(E2E_STEPS)]
    for (q0, _), (q1, _) in zip(*seen):
        assert torch.equal(q0, q1)
    assert torch.equal(seen[0][-1][0], queue)


@requires_dist
def test_train_moco_v2_on_two_processes_without_sync_bn_is_refused(train_results):
    results, cfg = train_results("no_sync_bn")
    for r, result in enumerate(results):
        assert "config_error" in result, f"rank {r}: train.sync_bn=false was not refused with a ConfigError: {result}"
        assert "train.sync_bn" in result["config_error"]
    assert not (Path(cfg.run.dir) / "checkpoints").exists()


@requires_dist
def test_train_moco_v2_on_two_processes_keeps_a_consistent_queue(train_results):
    _check_queue_of_the_run(*train_results("sync_bn"))


@requires_dist
def test_train_multitask_alternating_on_two_processes(train_results):
    results, cfg = train_results("multitask_alternate")
    for r, result in enumerate(results):
        assert "ok" in result, f"rank {r}: train raised:\n{result.get('error') or result.get('config_error')}"
    state = load_checkpoint(Path(cfg.run.dir) / "checkpoints" / "last.pt")
    assert state["step"] == E2E_STEPS and len(state["rng"]) == WORLD
    lines = (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line) for line in lines if '"train"' in line]
    assert [sorted(k for k in r if k.endswith("_loss")) for r in losses] == [["rotation_loss"], ["colorization_loss"]]
    assert all(math.isfinite(r["loss"]) for r in losses)


def test_sync_bn_conversion_keeps_the_momentum_teacher_frozen():
    from fastssl.train.distributed import convert_sync_batchnorm
    method = build_method(_config(**{"method.name": "moco_v2", "method.moco_v2.queue_size": QUEUE}))
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("key_") for n in trainable)
    converted = convert_sync_batchnorm(method, torch.device("cpu"))
    assert {n for n, p in converted.named_parameters() if p.requires_grad} == trainable


# ---------------------------------------------------------------- 6. DeepCluster's gathered features
@requires_dist
def test_deepcluster_gathers_the_features_and_every_rank_clusters_alike(train_results, one_cpu_thread):
    from fastssl.data import resolve_paths
    from fastssl.train.distributed import DistInfo
    from fastssl.train.trainer import training_features
    results, cfg = train_results("deepcluster")
    for r, result in enumerate(results):
        assert "ok" in result, f"rank {r}: train raised:\n{result.get('error') or result.get('config_error')}"
    (f0, a0), (f1, a1) = [(res["clustered"][0]["features"], res["clustered"][0]["assignments"]) for res in results]
    assert torch.equal(f0, f1) and torch.equal(a0, a1)
    assert f0.shape == (160, 512) and (f0.abs().sum(dim=1) > 0).all()      # every image's row, from one rank or the other
    train_dir, _ = resolve_paths(cfg.data, log=lambda *_: None)
    single = training_features(cfg, train_dir, torch.device("cpu"), DistInfo())(build_method(cfg).eval_backbone())
    torch.testing.assert_close(f0, single, rtol=1e-4, atol=1e-4)            # the same rows as one process computes
    assert len(a0.unique()) == 8
