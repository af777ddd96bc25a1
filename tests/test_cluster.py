"""fastssl.cluster: k-means, PCA whitening and NMI.

- k-means against a plain reference: Lloyd's algorithm one point and one cluster at a time in
  Python floats (`reference_kmeans`, with the same empty-cluster split), on the same initial
  centroids: identical assignments and restart, close centroids and inertia.
- Planted blobs are found, empty clusters are split as specified, the result depends on the seed
  only, chunking changes nothing, the lowest-inertia restart wins, bad arguments are refused.
- Two gloo processes whose data differ slightly (as floating point may) end with rank 0's result.
- PCA whitening against an SVD reference with the same sign rule; NMI against a hand computation.
"""
import math
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastssl.cluster import initial_centroids, kmeans, nmi, pca_whiten
from fastssl.cluster.kmeans import SPLIT_EPS

# Small tensors: extra intra-op threads only add spin-wait contention on a busy CPU (10x slower here).
pytestmark = pytest.mark.usefixtures("one_cpu_thread")

requires_dist = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# An odd n and prime k and d, so no size lines up with another.
N, K, D = 97, 7, 5


def random_data(seed: int, n: int = N, d: int = D) -> torch.Tensor:
    """Unstructured data, offset from the origin so a split's (1 +- eps) perturbation is not lost in rounding."""
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + 3.0


def seeded_init(x: torch.Tensor, k: int, restarts: int, seed: int) -> torch.Tensor:
    return initial_centroids(x, k, restarts, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------- the reference
def reference_kmeans(x: torch.Tensor, init: torch.Tensor, iterations: int):
    """(centroids, assignments, inertia, restart) of Lloyd's algorithm in plain Python floats, each
    restart of `init` (R, k, d) in turn; the first restart of lowest inertia wins."""
    points = x.double().tolist()
    best = None
    for restart, start in enumerate(init.double().tolist()):
        centroids = start
        for _ in range(iterations):
            labels = [nearest(p, centroids)[0] for p in points]
            centroids = reference_update(points, labels, centroids)
        labels, distances = zip(*(nearest(p, centroids) for p in points))
        if best is None or sum(distances) < best[2]:
            best = (centroids, list(labels), sum(distances), restart)
    centroids, labels, inertia, restart = best
    return torch.tensor(centroids), torch.tensor(labels), inertia, restart


def nearest(point, centroids):
    """(index, squared distance) of the nearest centroid; the first one on ties."""
    distances = [sum((a - b) ** 2 for a, b in zip(point, c)) for c in centroids]
    j = min(range(len(centroids)), key=lambda i: distances[i])
    return j, distances[j]


def reference_update(points, labels, old_centroids):
    """Each centroid the mean of its points; then each empty cluster, in index order, splits the then
    largest one (first on ties): (1 + eps) / (1 - eps) on even / odd dimensions, and its count halves."""
    k, d = len(old_centroids), len(points[0])
    counts, sums = [0] * k, [[0.0] * d for _ in range(k)]
    for p, label in zip(points, labels):
        counts[label] += 1
        for i in range(d):
            sums[label][i] += p[i]
    centroids = [[s / counts[j] for s in sums[j]] if counts[j] else None for j in range(k)]
    for j in range(k):
        if counts[j] == 0:
            big = max(range(k), key=lambda i: counts[i])
            source = centroids[big]
            centroids[j] = [v * (1 + SPLIT_EPS if i % 2 == 0 else 1 - SPLIT_EPS) for i, v in enumerate(source)]
            centroids[big] = [v * (1 - SPLIT_EPS if i % 2 == 0 else 1 + SPLIT_EPS) for i, v in enumerate(source)]
            counts[j] = counts[big] // 2
            counts[big] -= counts[j]
    return centroids


def assert_matches_reference(x, init, iterations):
    result = kmeans(x, init.shape[1], iterations=iterations, restarts=init.shape[0], init=init)
    centroids, assignments, inertia, restart = reference_kmeans(x, init, iterations)
    assert result.restart == restart
    assert torch.equal(result.assignments, assignments)
    torch.testing.assert_close(result.centroids, centroids.float(), rtol=1e-5, atol=1e-5)
    assert result.inertia == pytest.approx(inertia, rel=1e-5)
    return result


# ------------------------------------------------------------------------------------- k-means
def test_kmeans_finds_planted_blobs():
    g = torch.Generator().manual_seed(0)
    centres = 10 * torch.randn(5, 8, generator=g)
    truth = torch.arange(5).repeat_interleave(60)
    x = centres[truth] + 0.3 * torch.randn(300, 8, generator=g)
    # Random-row starts put two centroids in one blob most of the time (1 - 5!/5^5 = 96%): the
    # 100 restarts, one batched run, make a start with one row per blob all but certain.
    result = kmeans(x, 5, iterations=10, restarts=100, seed=0)
    assert nmi(result.assignments, truth) == pytest.approx(1.0, abs=1e-12)
    cluster_of_blob = result.assignments[::60]
    assert sorted(cluster_of_blob.tolist()) == list(range(5))
    assert torch.equal(result.assignments, cluster_of_blob[truth])
    for blob in range(5):
        centroid = result.centroids[cluster_of_blob[blob]]
        torch.testing.assert_close(centroid, x[truth == blob].mean(dim=0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(centroid, centres[blob], rtol=0, atol=0.2)   # 0.3 / sqrt(60) a coordinate


@pytest.mark.parametrize("restarts", [1, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_matches_the_reference_loop(seed, restarts):
    x = random_data(seed)
    init = seeded_init(x, K, restarts, seed)
    result = assert_matches_reference(x, init, iterations=15)
    # the reference ran with the initial centroids kmeans draws itself from this seed
    assert torch.equal(kmeans(x, K, iterations=15, restarts=restarts, seed=seed).assignments, result.assignments)


def test_empty_clusters_split_the_then_largest_cluster():
    # Four copies of one centroid: all 9 rows go to cluster 0 (the first on ties), 1..3 are empty.
    x = random_data(0, n=9)
    result = kmeans(x, 4, iterations=1, init=x[:1].expand(1, 4, D))
    mean = x.double().mean(dim=0)
    up = 1 + SPLIT_EPS * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    down = 2 - up
    # 1 splits 0 (counts 9 -> 5 + 4), 2 splits 0 (5 -> 3 + 2), 3 splits the now larger 1 (4 -> 2 + 2).
    expected = torch.stack([mean * down * down, mean * up * down, mean * down * up, mean * up * up])
    torch.testing.assert_close(result.centroids, expected.float(), rtol=1e-6, atol=0)
    assert (expected[3] - mean * down * up).abs().min() > 1e-4     # another split order would show


@pytest.mark.parametrize("case", ["duplicate_pair", "far_away"])
def test_empty_clusters_are_split_as_the_reference_does(case):
    x = random_data(3)
    init = seeded_init(x, K, 1, 0)
    if case == "duplicate_pair":
        init[0, 3] = init[0, 1]                          # cluster 3 loses every tie to cluster 1
    else:
        init[0, 2] = 1e3                                 # cluster 2 gets no row
    labels = [nearest(p, init[0].double().tolist())[0] for p in x.double().tolist()]
    assert labels.count(3 if case == "duplicate_pair" else 2) == 0, "the first assignment must leave one empty"
    assert_matches_reference(x, init, iterations=1)      # the split itself, and the assignment to its result
    result = assert_matches_reference(x, init, iterations=10)
    assert torch.bincount(result.assignments, minlength=K).min() > 0


def test_all_duplicate_initial_centroids_end_in_k_clusters():
    # Every cluster but the first starts empty; the splits of splits make some centroids equal in
    # exact arithmetic (c * (1 + eps) * (1 - eps) twice), ties that rounding breaks either way, so
    # the float64 reference is no oracle past the first iteration (which the hand-computed test covers).
    x = random_data(3)
    result = kmeans(x, K, iterations=10, init=x[:1].expand(1, K, D))
    assert torch.bincount(result.assignments, minlength=K).min() > 0
    assert torch.isfinite(result.centroids).all()


def test_kmeans_depends_on_its_seed_only():
    x = random_data(0)
    torch.manual_seed(1)
    first = kmeans(x, K, iterations=5, restarts=2, seed=7)
    torch.manual_seed(2)
    torch.rand(10)
    second = kmeans(x, K, iterations=5, restarts=2, seed=7)
    assert torch.equal(first.centroids, second.centroids) and torch.equal(first.assignments, second.assignments)
    assert (first.inertia, first.restart) == (second.inertia, second.restart)
    assert not torch.equal(seeded_init(x, K, 2, 7), seeded_init(x, K, 2, 8))


def test_initial_centroids_are_distinct_rows_of_x():
    x = random_data(0)
    init = seeded_init(x, K, 3, 0)
    assert init.shape == (3, K, D) and init.dtype == torch.float32
    for restart in init:
        rows = [int((x == c).all(dim=1).nonzero()) for c in restart]     # each is exactly one row of x
        assert len(set(rows)) == K
    assert not torch.equal(init[0], init[1])            # each restart draws its own rows


def test_chunking_does_not_change_the_result():
    x = random_data(1)
    whole = kmeans(x, K, iterations=10, restarts=3, seed=1)
    chunked = kmeans(x, K, iterations=10, restarts=3, seed=1, chunk_size=7)     # 13 full chunks and one of 6
    assert torch.equal(whole.assignments, chunked.assignments) and whole.restart == chunked.restart
    torch.testing.assert_close(whole.centroids, chunked.centroids, rtol=1e-6, atol=1e-6)
    assert whole.inertia == pytest.approx(chunked.inertia, rel=1e-6)


def test_the_lowest_inertia_restart_wins():
    x = random_data(4)
    init = seeded_init(x, K, 4, 4)
    batched = kmeans(x, K, iterations=10, restarts=4, init=init)
    alone = [kmeans(x, K, iterations=10, init=init[r:r + 1]) for r in range(4)]
    inertias = [r.inertia for r in alone]
    assert len({round(i, 3) for i in inertias}) > 1, "the restarts must end differently to test the choice"
    best = min(range(4), key=lambda r: inertias[r])
    assert best != 0, "the first restart must not win, else taking it would pass"
    assert batched.restart == best
    assert batched.inertia == pytest.approx(inertias[best], rel=1e-6)
    assert torch.equal(batched.assignments, alone[best].assignments)
    torch.testing.assert_close(batched.centroids, alone[best].centroids, rtol=1e-6, atol=1e-6)


def test_kmeans_computes_in_float32_whatever_the_input_dtype():
    x = random_data(0)
    from_double = kmeans(x.double(), K, iterations=5)
    from_float = kmeans(x, K, iterations=5)
    assert from_double.centroids.dtype == torch.float32 and from_double.assignments.dtype == torch.int64
    assert torch.equal(from_double.assignments, from_float.assignments)
    assert kmeans(x.bfloat16(), K, iterations=5).centroids.dtype == torch.float32


@pytest.mark.parametrize("x_fn, kwargs, message", [
    (lambda x: x[0], {}, r"x must be 2-D .* got shape \(5,\)"),
    (lambda x: x[None], {}, r"x must be 2-D .* got shape \(1, 10, 5\)"),
    (lambda x: x.long(), {}, "x must be a floating-point tensor"),
    (lambda x: x, {"k": 0}, "k=0"),
    (lambda x: x, {"k": 11}, r"number of rows of x \(10\), got k=11"),
    (lambda x: x, {"iterations": 0}, "iterations=0"),
    (lambda x: x, {"restarts": 0}, "restarts=0"),
    (lambda x: x, {"chunk_size": 0}, "chunk_size=0"),
    (lambda x: torch.cat([x, torch.tensor([[float("nan")] * D])]), {}, "x has non-finite"),
    (lambda x: torch.cat([x, torch.tensor([[float("inf")] * D])]), {}, "x has non-finite"),
    (lambda x: x, {"init": torch.zeros(2, 3, D)}, r"init must have shape .* \(1, 3, 5\), got \(2, 3, 5\)"),
    (lambda x: x, {"init": torch.full((1, 3, D), float("nan"))}, "init has non-finite"),
])
def test_kmeans_rejects_bad_arguments(x_fn, kwargs, message):
    kwargs = {"k": 3, **kwargs}
    x = x_fn(random_data(0, n=10))
    with pytest.raises(ValueError, match=message):
        kmeans(x, kwargs.pop("k"), **kwargs)


@requires_cuda
def test_kmeans_on_cuda_matches_cpu():
    x = random_data(4, n=1001, d=13)
    init = seeded_init(x, 11, 3, 0)
    init[1, 4] = 1e3                                     # an empty cluster on the GPU path too
    cpu = kmeans(x, 11, iterations=10, restarts=3, init=init)
    cuda = kmeans(x.cuda(), 11, iterations=10, restarts=3, init=init.cuda(), chunk_size=100)
    assert cuda.assignments.device.type == "cuda" and cuda.restart == cpu.restart
    assert torch.equal(cuda.assignments.cpu(), cpu.assignments)
    torch.testing.assert_close(cuda.centroids.cpu(), cpu.centroids, rtol=1e-5, atol=1e-5)
    assert torch.equal(seeded_init(x.cuda(), 11, 3, 5).cpu(), seeded_init(x, 11, 3, 5))


# ------------------------------------------------------------------------------ 2 gloo processes
WORLD, DEADLINE_S = 2, 120
DIST_ARGS = dict(k=6, iterations=10, restarts=2, seed=3)


def _rank_data(rank: int) -> torch.Tensor:
    """The same data on every rank, except that rank 1's is perturbed: a (much enlarged) stand-in for
    floating point that differs across ranks, so that only the broadcast makes the results agree."""
    x = torch.rand(120, 4, generator=torch.Generator().manual_seed(0))
    return x + 0.02 * torch.randn(120, 4, generator=torch.Generator().manual_seed(1)) if rank else x


def _kmeans_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Join a gloo group, cluster with and without sync_ranks; out_dir/rank<r>.pt holds the results or a traceback."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)        # a different global RNG state on each rank must not matter
        x = _rank_data(rank)
        result = {"synced": kmeans(x, sync_ranks=True, **DIST_ARGS)._asdict(),
                  "local": kmeans(x, sync_ranks=False, **DIST_ARGS)._asdict()}
    except Exception:      # reported by the test; the other rank then hangs in the broadcast until the deadline
        result = {"error": traceback.format_exc()}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@requires_dist
def test_two_ranks_hold_rank_0s_result(tmp_path):
    context = mp.spawn(_kmeans_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.time() + DEADLINE_S
    while not context.join(timeout=1):
        if time.time() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the ranks did not finish within {DEADLINE_S} s")
    results = []
    for r in range(WORLD):
        result = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert "error" not in result, f"rank {r} raised:\n{result['error']}"
        results.append(result)
    single = kmeans(_rank_data(0), **DIST_ARGS)        # one process: no group, nothing to sync
    for r in range(WORLD):
        synced = results[r]["synced"]
        assert torch.equal(synced["assignments"], single.assignments), f"rank {r}"
        assert torch.equal(synced["centroids"], single.centroids), f"rank {r}"
        assert (synced["inertia"], synced["restart"]) == (single.inertia, single.restart), f"rank {r}"
    # Without the broadcast rank 1 keeps its own result, which differs: the check above can fail.
    assert torch.equal(results[0]["local"]["assignments"], single.assignments)
    assert not torch.equal(results[1]["local"]["assignments"], single.assignments)


# ---------------------------------------------------------------------------------- PCA whitening
def correlated_data(n: int = 400, d: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -1, d)                   # variances from 100 to 0.01
    return (torch.randn(n, d, generator=g) * scales) @ torch.randn(d, d, generator=g) + 5.0


def test_pca_whitening_gives_an_identity_covariance():
    x = correlated_data()
    w = pca_whiten(x, 6)
    assert w.shape == (400, 6) and w.dtype == torch.float32
    torch.testing.assert_close(w.mean(dim=0), torch.zeros(6), rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.cov(w.T.double()).float(), torch.eye(6), rtol=0, atol=1e-3)
    assert torch.cov(x.T).diagonal().max() > 10        # the input was far from white


def test_pca_whitening_matches_an_svd_reference_with_the_sign_rule():
    x, dim, eps = correlated_data(seed=1).double(), 7, 1e-5
    centred = x - x.mean(dim=0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)      # an independent decomposition
    components = vh[:dim]
    largest = components.abs().argmax(dim=1)
    components = components * components[torch.arange(dim), largest].sign()[:, None]
    expected = centred @ components.T / (s[:dim] ** 2 / (x.shape[0] - 1) + eps).sqrt()
    torch.testing.assert_close(pca_whiten(x, dim, eps), expected, rtol=1e-8, atol=1e-8)
    assert torch.equal(pca_whiten(x, dim, eps), pca_whiten(x, dim, eps))


def test_pca_whitening_gives_fewer_components_when_the_data_has_fewer():
    assert pca_whiten(correlated_data(d=4), 10).shape == (400, 4)            # d = 4
    few_rows = pca_whiten(correlated_data(n=3, d=8), 5)                        # n - 1 = 2
    assert few_rows.shape == (3, 2) and torch.isfinite(few_rows).all()


@pytest.mark.parametrize("x, kwargs, message", [
    (torch.randn(10), {}, r"x must be 2-D"),
    (torch.randn(1, 4), {}, "n=1"),
    (torch.randn(10, 4).long(), {}, "floating-point"),
    (torch.randn(10, 4), {"dim": 0}, "dim=0"),
    (torch.randn(10, 4), {"eps": -1.0}, "eps=-1.0"),
    (torch.full((10, 4), float("nan")), {}, "non-finite"),
])
def test_pca_whiten_rejects_bad_arguments(x, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pca_whiten(x, **{"dim": 2, **kwargs})


# ------------------------------------------------------------------------------------------ NMI
def test_nmi_is_1_for_the_same_partition_under_any_labels():
    a = torch.randint(0, 6, (500,), generator=torch.Generator().manual_seed(0))
    assert nmi(a, a) == pytest.approx(1.0, abs=1e-12)
    relabelled = torch.tensor([40, -3, 7, 0, 12, 5])[a]
    assert nmi(a, relabelled) == pytest.approx(1.0, abs=1e-12)
    merged = torch.where(a == 5, 0, a)                 # a coarser partition is not the same one
    assert nmi(a, merged) < 0.99


def test_nmi_of_independent_partitions_is_about_0():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 10, (100_000,), generator=g), torch.randint(0, 10, (100_000,), generator=g)
    assert 0 <= nmi(a, b) < 1e-3                        # sampling leaves about 81 / (2n) / ln 10 = 2e-4


def test_nmi_by_hand():
    a, b = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 1, 1])
    # Contingency [[2, 1], [0, 3]] over n = 6; marginals a: (1/2, 1/2), b: (1/3, 2/3).
    mutual = (2 / 6) * math.log((2 / 6) / (1 / 2 * 1 / 3)) + (1 / 6) * math.log((1 / 6) / (1 / 2 * 2 / 3)) \
        + (3 / 6) * math.log((3 / 6) / (1 / 2 * 2 / 3))
    h_a = math.log(2)
    h_b = -(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3)
    assert nmi(a, b) == pytest.approx(mutual / ((h_a + h_b) / 2), rel=1e-12)
    assert nmi(a, b) == pytest.approx(nmi(b, a), rel=1e-12)


def test_nmi_of_single_cluster_labelings():
    one = torch.zeros(8, dtype=torch.long)
    assert nmi(one, one + 3) == 1.0                     # both one cluster: defined as 1
    assert nmi(one, torch.arange(8) % 2) == 0.0        # only one of them: no information shared


@pytest.mark.parametrize("a, b, message", [
    (torch.zeros(4), torch.zeros(4, dtype=torch.long), "a must be a 1-D integer tensor"),
    (torch.zeros(4, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long), "b must be a 1-D integer tensor"),
    (torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long), "same non-zero length, got 4 and 5"),
    (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), "same non-zero length"),
])
def test_nmi_rejects_bad_arguments(a, b, message):
    with pytest.raises(ValueError, match=message):
        nmi(a, b)
