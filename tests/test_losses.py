"""InfoNCE / NT-Xent backends against the reference (fastssl/losses/reference.py).

Tolerances are derived, never hand-set: for every compared quantity (loss, each gradient),
    err(backend, oracle) <= 2 * err(same-precision reference, oracle) + FLOOR
where err is the max abs difference relative to the oracle's max abs value and FLOOR is a small
fp32 noise floor. The oracle is the reference evaluated in fp64 on exactly the same
(dtype-rounded) input values, so that fp32 backends are held to the fp32 reference's own error
too (an fp32 oracle would leave an fp32 backend only the floor, and summation order alone
differs by more than that where the loss is ill-conditioned).

On a machine without CUDA the Triton kernels run in Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 before anything imports triton); with CUDA the same tests run the compiled kernels on
the GPU, and the GPU-only tests at the bottom run too.
"""
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from conftest import compile_in_fresh_process
from fastssl.losses import (InfoNCELoss, info_nce, info_nce_rows_cols, info_nce_rows_cols_reference,
                            nt_xent_reference, simclr_indices)
from fastssl.losses import contrastive

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("one_cpu_thread")
FLOOR = 1e-5            # ~80 fp32 ulps: summation-order differences between exact algorithms
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TEMPS = [0.03, 0.1, 0.5, 1.0]
SMALL_TILES = (16, 16, 16)   # interpreter: small tiles so sizes straddle tile edges


def _triton_ok() -> bool:
    try:
        from fastssl.kernels import info_nce as kernels
    except Exception:  # noqa: BLE001
        return False
    return DEVICE == "cuda" or kernels.INTERPRETED


def rel_err(x: torch.Tensor, ref: torch.Tensor, scale_floor: float = 1e-30) -> float:
    """max |x - ref| over max |ref|, or over `scale_floor` where ref is smaller (1 for a loss)."""
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1.0 if ref.dim() == 0 else scale_floor))


def _loss_and_grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), [g.detach() for g in grads]


def check_against_reference(backend_fn, reference_fn, tensors, dtype):
    """backend_fn(*tensors) vs reference_fn(*tensors, upcast); see the module docstring."""
    x = [t.to(dtype) for t in tensors]
    ref32 = _loss_and_grads(lambda *a: reference_fn(*a, upcast=False), [t.double() for t in x])
    refdt = _loss_and_grads(lambda *a: reference_fn(*a, upcast=False), x)
    got = _loss_and_grads(backend_fn, x)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0, got[0].dtype
    assert torch.isfinite(got[0])
    for g, t in zip(got[1], x):
        assert g.dtype == t.dtype and g.shape == t.shape
    names = ["loss"] + [f"grad[{i}]" for i in range(len(x))]
    # A gradient that is exactly zero (one pair: no negatives) has no relative error: it is
    # measured against 1 / max|z|, the size of the gradient that a unit change of a logit makes.
    # (On a GPU the kernels' exp2 leaves ~1e-7 there; the fp32 reference gets exactly 0.)
    floors = [1.0] + [1.0 / float(t.detach().abs().max()) for t in x]
    for name, k, r, o, floor in zip(names, [got[0]] + got[1], [refdt[0]] + refdt[1], [ref32[0]] + ref32[1], floors):
        e_kernel, e_ref = rel_err(k, o, floor), rel_err(r, o, floor)
        assert e_kernel <= 2 * e_ref + FLOOR, (
            f"{name}: backend error {e_kernel:.3g} > 2 x same-precision reference error {e_ref:.3g} + {FLOOR}")


def simclr_case(n, d, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    # non-unit, varied norms so the fused normalisation and its backward are exercised
    z1 = torch.randn(n, d, generator=g) * (1 + 3 * torch.rand(n, 1, generator=g))
    # positives about as similar as the closest negatives: an O(1) loss at every temperature
    z2 = z1 + 3.0 * torch.randn(n, d, generator=g)
    return z1.to(device), z2.to(device)


def queue_case(r, c, d, seed=0, with_self=False, device=DEVICE):
    """MoCo-style: rows = queries, cols = [keys; queue], positive[i] = i (keys first)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(r, d, generator=g) * (1 + torch.rand(r, 1, generator=g))
    cols = torch.randn(c, d, generator=g)
    cols[:r] = rows + 3.0 * torch.randn(r, d, generator=g)
    positive = torch.arange(r)
    self_index = None
    if with_self:      # some rows mask one queue column, some (-1) nothing
        self_index = torch.where(torch.arange(r) % 2 == 0, torch.arange(r) + r, torch.full((r,), -1))
        self_index = self_index.clamp(max=c - 1)
        self_index[self_index == positive] = -1
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return rows.to(device), cols.to(device), positive.to(device), to(self_index)


def nt_xent_fn(backend, t, blocks=(0, 0, 0)):
    return lambda z1, z2: info_nce(z1, z2, t, backend=backend, blocks=blocks)


def nt_xent_ref_fn(t):
    return lambda z1, z2, upcast: nt_xent_reference(z1, z2, t, upcast=upcast)


# ------------------------------------------------------------------------ reference self-checks
def test_rows_cols_reference_equals_nt_xent_reference():
    z1, z2 = simclr_case(7, 16, device="cpu")
    z = torch.cat([z1, z2])
    positive, self_index = simclr_indices(7)
    a = info_nce_rows_cols_reference(z, z, positive, 0.1, self_index=self_index)
    b = nt_xent_reference(z1, z2, 0.1)
    assert torch.allclose(a, b, rtol=1e-6, atol=0)


def test_reference_matches_naive_formula():
    """The spec itself, against the textbook formula written out with loops (tiny N)."""
    z1, z2 = simclr_case(3, 5, device="cpu")
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n2, t, total = 6, 0.5, 0.0
    for i in range(n2):
        pos = (i + 3) % n2
        den = sum(torch.exp(z[i] @ z[k] / t) for k in range(n2) if k != i)
        total += -torch.log(torch.exp(z[i] @ z[pos] / t) / den)
    assert abs(float(nt_xent_reference(z1, z2, t)) - float(total / n2)) < 1e-5


# ---------------------------------------------------------------------------- chunked backend
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", TEMPS)
@pytest.mark.parametrize("n,d", [(1, 16), (7, 40), (33, 16), (67, 40)])
def test_chunked_simclr(n, d, t, dtype):
    z1, z2 = simclr_case(n, d, seed=n * d)
    check_against_reference(nt_xent_fn("chunked", t, (16, 32, 0)), nt_xent_ref_fn(t), [z1, z2], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r,c,d,with_self", [(7, 33, 16, False), (33, 67, 40, True), (1, 5, 16, False),
                                             (67, 7 + 67 + 13, 24, True)])
def test_chunked_rows_cols(r, c, d, with_self, dtype):
    c = max(c, r)
    rows, cols, positive, self_index = queue_case(r, c, d, seed=r + c, with_self=with_self)
    check_against_reference(
        lambda a, b: info_nce_rows_cols(a, b, positive, 0.1, self_index=self_index, backend="chunked",
                                        blocks=(16, 16, 0)),
        lambda a, b, upcast: info_nce_rows_cols_reference(a, b, positive, 0.1, self_index=self_index,
                                                          upcast=upcast),
        [rows, cols], dtype)


@pytest.mark.parametrize("blocks", [(5, 7, 0), (1024, 4096, 0)])
def test_chunked_large_d_and_block_shapes(blocks):
    z1, z2 = simclr_case(21, 1024, seed=3)
    check_against_reference(nt_xent_fn("chunked", 0.05, blocks), nt_xent_ref_fn(0.05), [z1, z2], torch.float32)


# ----------------------------------------------------------------------------- Triton kernels
triton_only = pytest.mark.skipif(not _triton_ok(), reason="Triton kernels need CUDA or TRITON_INTERPRET=1")

# The interpreter is slow: a small grid that still covers every dtype and temperature, N = 1,
# sizes off the tile edges, D looped over several D tiles (40 with BLOCK_D 16; 1024) and not.
TRITON_SIMCLR = [
    (1, 16, torch.float32, 0.1, SMALL_TILES),
    (7, 40, torch.float32, 0.03, SMALL_TILES),
    (33, 16, torch.float32, 1.0, SMALL_TILES),
    (67, 40, torch.float32, 0.5, (32, 16, 64)),
    (7, 16, torch.bfloat16, 0.03, SMALL_TILES),
    (33, 40, torch.bfloat16, 0.1, SMALL_TILES),
    (1, 40, torch.bfloat16, 1.0, SMALL_TILES),
    (7, 40, torch.float16, 0.03, SMALL_TILES),
    (33, 16, torch.float16, 0.5, (16, 32, 16)),
    (5, 1024, torch.float32, 0.1, (16, 16, 0)),
]


@triton_only
@pytest.mark.parametrize("n,d,dtype,t,tiles", TRITON_SIMCLR, ids=lambda v: str(v).replace("torch.", ""))
def test_triton_simclr(n, d, dtype, t, tiles):
    z1, z2 = simclr_case(n, d, seed=n + d)
    check_against_reference(nt_xent_fn("triton", t, tiles), nt_xent_ref_fn(t), [z1, z2], dtype)


TRITON_ROWS_COLS = [
    (7, 33, 16, False, torch.float32, 0.03),
    (33, 67, 40, True, torch.float32, 0.1),
    (1, 5, 16, False, torch.bfloat16, 0.5),
    (17, 7 + 17 + 13, 24, True, torch.float16, 1.0),
]


@triton_only
@pytest.mark.parametrize("r,c,d,with_self,dtype,t", TRITON_ROWS_COLS, ids=lambda v: str(v).replace("torch.", ""))
def test_triton_rows_cols(r, c, d, with_self, dtype, t):
    rows, cols, positive, self_index = queue_case(r, c, d, seed=r * c, with_self=with_self)
    check_against_reference(
        lambda a, b: info_nce_rows_cols(a, b, positive, t, self_index=self_index, backend="triton",
                                        blocks=SMALL_TILES),
        lambda a, b, upcast: info_nce_rows_cols_reference(a, b, positive, t, self_index=self_index,
                                                          upcast=upcast),
        [rows, cols], dtype)


@triton_only
def test_triton_weighted_upstream_gradient():
    """The kernels take a per-row upstream gradient (any reduction of the per-row losses)."""
    from fastssl.losses import ops
    rows, cols, positive, _ = queue_case(9, 20, 16, seed=1)
    w = torch.linspace(-2, 3, 9, device=DEVICE)
    for backend in ("triton", "chunked"):
        a, b = rows.clone().requires_grad_(), cols.clone().requires_grad_()
        (ops.per_row_loss(backend, a, b, positive, None, 0.2, SMALL_TILES) * w).sum().backward()
        a2, b2 = rows.clone().requires_grad_(), cols.clone().requires_grad_()
        logits = F.normalize(a2, dim=1) @ F.normalize(b2, dim=1).T / 0.2
        (F.cross_entropy(logits, positive, reduction="none") * w).sum().backward()
        assert rel_err(a.grad, a2.grad) < FLOOR and rel_err(b.grad, b2.grad) < FLOOR, backend


SPILL_SCRIPT = """
import inspect, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastssl.kernels import info_nce as K
assert not K.INTERPRETED
dtype = getattr(torch, sys.argv[1])
meta = dict(K._config(int(sys.argv[2]), dtype), HAS_SELF=True)
options = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
ptr = {torch.float32: "*fp32", torch.bfloat16: "*bf16"}[dtype]
for fn in (K._fwd_kernel, K._bwd_rows_kernel, K._bwd_cols_kernel):
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: "constexpr" if n in meta else ptr if n in ("R_ptr", "C_ptr", "DR_ptr", "DC_ptr")
           else "*i64" if n in ("POS_ptr", "SELF_ptr") else "*fp32" if n.endswith("_ptr")
           else "fp32" if n == "inv_t" else "i32" for n in names}
    kernel = triton.compile(ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in meta.items()}),
                            target=GPUTarget("cuda", 90, 32), options=options)
    print("compiled", fn.__name__, "shared", kernel.metadata.shared, flush=True)
"""
H100_SHARED_BYTES = 232_448     # the most shared memory one block may have on sm_90


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the other tests run the compiled kernels")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("dim", [128, 256])
def test_kernels_compile_for_sm90_within_shared_memory_and_few_spills(dtype, dim, tmp_path):
    """The launcher's configuration compiled to an sm_90 cubin in a fresh process (no interpreter,
    fresh cache), with ptxas's register report. Every kernel fits an H100 block's shared memory:
    fp32 tiles in three pipeline stages needed 233,472 bytes in the column backward at D = 128,
    and the kernel did not launch on the H100. At D = 128 the forward spills nothing and each
    backward kernel at most 4 KB: the exact fp32 dot (input_precision="ieee") spilled 29 and 42 KB
    in the backward and ran 110x slower than eager PyTorch on an H100; tf32x3 spills 1.5 and 2.2
    KB there, bf16 0.1 and 0.6 KB (Triton 3.8)."""
    import re
    run = compile_in_fresh_process(SPILL_SCRIPT, tmp_path, dtype, str(dim), TRITON_DUMP_PTXAS_LOG="1")
    compiled = re.findall(r"^compiled (\w+) shared (\d+)", run.stdout, re.M)
    assert [name for name, _ in compiled] == ["_fwd_kernel", "_bwd_rows_kernel", "_bwd_cols_kernel"], run.stdout[-3000:]
    shared = {name: int(size) for name, size in compiled}
    assert max(shared.values()) <= H100_SHARED_BYTES, shared
    # ptxas prints each kernel's report before the script's "compiled" line for it.
    spills = dict(zip(shared, map(int, re.findall(r"(\d+) bytes spill stores", run.stdout))))
    if dim == 128:
        assert spills["_fwd_kernel"] == 0, spills
        assert max(spills.values()) <= 4096, spills


def test_module_and_backends_agree():
    z1, z2 = simclr_case(9, 16)
    ref = nt_xent_reference(z1, z2, 0.2)
    assert torch.allclose(InfoNCELoss(0.2, backend="chunked")(z1, z2), ref, rtol=1e-5)
    assert torch.allclose(InfoNCELoss(0.2)(z1, z2), ref, rtol=1e-5)
    rows, cols, positive, self_index = queue_case(5, 11, 16, with_self=True)
    m = InfoNCELoss(0.2, backend="chunked", rows_cols=True)
    assert torch.allclose(m(rows, cols, positive, self_index),
                          info_nce_rows_cols_reference(rows, cols, positive, 0.2, self_index=self_index),
                          rtol=1e-5)
    assert "temperature=0.2" in repr(m)
    backends = ["chunked"] + (["triton"] if _triton_ok() else [])
    for backend in backends:     # int32 indices are accepted too
        got = info_nce_rows_cols(rows, cols, positive.int(), 0.2, self_index=self_index.int(),
                                 backend=backend, blocks=SMALL_TILES)
        assert torch.allclose(got, m(rows, cols, positive, self_index), rtol=1e-5), backend


def test_auto_logs_its_choice_once(caplog, monkeypatch):
    monkeypatch.setattr(contrastive, "_announced", set())
    z1, z2 = simclr_case(4, 16, device="cpu")
    with caplog.at_level("INFO", logger="fastssl.losses"):
        info_nce(z1, z2)
        info_nce(z1, z2)
    msgs = [r.getMessage() for r in caplog.records if r.name == "fastssl.losses"]
    assert len(msgs) == 1 and "'torch'" in msgs[0]
    monkeypatch.setattr(contrastive, "AUTO_REFERENCE_MAX_ELEMENTS", 10)
    assert contrastive.resolve_backend("auto", z1, 8, 8) == "chunked"


def test_explicit_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    pytest.importorskip("triton")
    from fastssl.kernels import info_nce as kernels
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    z1, z2 = simclr_case(4, 16, device="cpu")
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        info_nce(z1, z2, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="before the first import"):
        info_nce(z1, z2, backend="triton")


def _bad(msg, exc, fn):
    with pytest.raises(exc, match=msg):
        fn()


def test_bad_input_errors():
    z = torch.randn(4, 8)
    q, k = torch.randn(3, 8), torch.randn(6, 8)
    pos = torch.tensor([0, 1, 2])
    for backend in ("torch", "chunked", "auto"):
        f = lambda *a, **kw: info_nce(*a, backend=backend, **kw)  # noqa: E731
        _bad("same shape", ValueError, lambda: f(z, torch.randn(5, 8)))
        _bad("same dtype", TypeError, lambda: f(z, z.double()))
        _bad("2-D", ValueError, lambda: f(z[0], z[0]))
        _bad("floating", TypeError, lambda: f(z.long(), z.long()))
        _bad("temperature", ValueError, lambda: f(z, z, 0.0))
        _bad("temperature", ValueError, lambda: f(z, z, -0.1))
        _bad("empty batch", ValueError, lambda: f(z[:0], z[:0]))
        g = lambda *a, **kw: info_nce_rows_cols(*a, backend=backend, **kw)  # noqa: E731
        _bad("positive index out of range", IndexError, lambda: g(q, k, torch.tensor([0, 1, 6])))
        _bad("positive index out of range", IndexError, lambda: g(q, k, torch.tensor([0, -1, 2])))
        _bad("self_index out of range", IndexError, lambda: g(q, k, pos, self_index=torch.tensor([0, 1, 9])))
        _bad("equals its masked self", ValueError, lambda: g(q, k, pos, self_index=torch.tensor([3, 1, -1])))
        _bad(r"shape \(3,\)", ValueError, lambda: g(q, k, torch.tensor([0, 1])))
        _bad("int64", TypeError, lambda: g(q, k, pos.float()))
        _bad("embedding dim", ValueError, lambda: g(q, torch.randn(6, 7), pos))
        _bad("same dtype", TypeError, lambda: g(q, k.half(), pos))
        _bad("empty batch", ValueError, lambda: g(q, k[:0], pos))
        _bad("temperature", ValueError, lambda: g(q, k, pos, 0))
    _bad("unknown loss backend", ValueError, lambda: info_nce(z, z, backend="cuda"))
    _bad("gather", ValueError, lambda: info_nce(z, z, gather="yes"))
    _bad("initialised", RuntimeError, lambda: info_nce(z, z, gather=True))
    _bad("temperature", ValueError, lambda: InfoNCELoss(0))


def test_autocast_cpu_bf16():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 32)
    x1, x2 = torch.randn(9, 16), torch.randn(9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2 = head(x1), head(x2)
        assert z1.dtype == torch.bfloat16
        loss = info_nce(z1, z2, 0.1, backend="chunked")
    assert loss.dtype == torch.float32
    loss.backward()
    ref = nt_xent_reference(z1.detach().float(), z2.detach().float(), 0.1)
    # the tiled backends compute in fp32 even under autocast (their matmuls are not autocast)
    assert rel_err(loss, ref) < FLOOR and torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize("backend", ["chunked", "torch"])
def test_torch_compile_fullgraph(backend):
    """The tiled backends are torch.library custom ops: no graph break, autograd through them."""
    torch._dynamo.reset()
    head = torch.nn.Linear(16, 16)
    x1, x2 = torch.randn(7, 16), torch.randn(7, 16)

    def step(a, b):
        return info_nce(head(a), head(b), 0.1, backend=backend)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss_c = compiled(x1, x2)
    gc = torch.autograd.grad(loss_c, head.weight)[0]
    loss_e = step(x1, x2)
    ge = torch.autograd.grad(loss_e, head.weight)[0]
    assert torch.allclose(loss_c, loss_e, rtol=1e-6) and torch.allclose(gc, ge, rtol=1e-5, atol=1e-7)


def test_custom_ops_pass_opcheck():
    from fastssl.losses import ops
    rows, cols, positive, self_index = queue_case(5, 11, 16, with_self=True, device="cpu")
    torch.library.opcheck(ops.info_nce_chunked_fwd, (rows.requires_grad_(), cols.requires_grad_(),
                                                     positive, self_index, 0.1, 4, 4),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# -------------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(world, n, d):
    g = torch.Generator().manual_seed(1234)
    return torch.randn(world * n, d, generator=g), torch.randn(world * n, d, generator=g)


def _dist_worker(rank, world, port, n, d, backend, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        z1g, z2g = _global_batch(world, n, d)
        sl = slice(rank * n, (rank + 1) * n)
        z1, z2 = z1g[sl].clone().requires_grad_(), z2g[sl].clone().requires_grad_()
        loss = info_nce(z1, z2, 0.1, backend=backend, blocks=(4, 8, 0))     # gather="auto"
        loss.backward()
        torch.manual_seed(7)
        head = torch.nn.Linear(d, 6)
        model = DDP(head)
        out_h = model(torch.cat([z1g[sl], z2g[sl]]))
        info_nce(out_h[:n], out_h[n:], 0.1, backend=backend, blocks=(4, 8, 0)).backward()
        torch.save({"loss": loss.detach(), "g1": z1.grad, "g2": z2.grad,
                    "w": head.weight.grad, "b": head.bias.grad}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,backend", [(2, "chunked"), (3, "torch")])
def test_distributed_gather_equals_single_process(world, backend, tmp_path):
    import torch.multiprocessing as mp
    n, d = 5, 16
    mp.spawn(_dist_worker, args=(world, _free_port(), n, d, backend, str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    z1g, z2g = _global_batch(world, n, d)
    a, b = z1g.clone().requires_grad_(), z2g.clone().requires_grad_()
    ref = nt_xent_reference(a, b, 0.1)
    ref.backward()
    # convention: mean over ranks of the per-rank losses == the global loss
    assert abs(float(torch.stack([r["loss"] for r in res]).mean()) - float(ref.detach())) < 1e-5
    # each rank's embedding gradient == W x the global gradient of its slice (DDP divides by W)
    for rank, r in enumerate(res):
        sl = slice(rank * n, (rank + 1) * n)
        assert rel_err(r["g1"] / world, a.grad[sl]) < FLOOR and rel_err(r["g2"] / world, b.grad[sl]) < FLOOR
    # with DDP: parameter gradients == single-process gradients on the concatenated batch
    torch.manual_seed(7)
    head = torch.nn.Linear(d, 6)
    nt_xent_reference(head(z1g), head(z2g), 0.1).backward()
    for r in res:
        assert rel_err(r["w"], head.weight.grad) < FLOOR and rel_err(r["b"], head.bias.grad) < FLOOR


# ------------------------------------------------------------------------------- GPU-only checks
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_triton_vs_chunked_beyond_reference(dtype):
    """At a size whose logits the reference could not hold cheaply, the two tiled backends agree."""
    n, d = 20_011, 128
    z1, z2 = simclr_case(n, d, seed=5)
    z1, z2 = z1.to(dtype), z2.to(dtype)
    out = {}
    for backend in ("triton", "chunked"):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = info_nce(a, b, 0.07, backend=backend)
        loss.backward()
        out[backend] = (loss.detach(), a.grad.float(), b.grad.float())
    tol = 2e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert rel_err(out["triton"][0], out["chunked"][0]) < 1e-5
    for i in (1, 2):
        assert rel_err(out["triton"][i], out["chunked"][i]) < tol + FLOOR * 10


@gpu_only
def test_gpu_no_quadratic_memory():
    n, d = 65_536, 128    # 2N = 131072: the 2N x 2N fp32 logits alone would be 64 GiB
    z1, z2 = (t.bfloat16().requires_grad_() for t in simclr_case(n, d, seed=6))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    info_nce(z1, z2, 0.1, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 64 * (2 * n) * d * 4, extra    # O((R + C) D), far below R x C


@gpu_only
def test_gpu_inductor_compile_and_autocast():
    torch._dynamo.reset()
    head = torch.nn.Linear(64, 128).cuda()
    x1, x2 = torch.randn(257, 64, device="cuda"), torch.randn(257, 64, device="cuda")

    def step(a, b):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return info_nce(head(a), head(b), 0.1, backend="triton")

    loss_c = torch.compile(step, fullgraph=True)(x1, x2)
    gc = torch.autograd.grad(loss_c, head.weight)[0]
    loss_e = step(x1, x2)
    ge = torch.autograd.grad(loss_e, head.weight)[0]
    assert torch.allclose(loss_c, loss_e, rtol=1e-3) and rel_err(gc, ge) < 2e-2


@gpu_only
def test_gpu_cuda_graph_capture():
    z1, z2 = simclr_case(300, 128, seed=8)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):          # warm-up (compiles the kernels) off the capture
        for _ in range(2):
            a.grad = b.grad = None
            info_nce(a, b, 0.1, backend="triton").backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    a.grad = b.grad = None
    with torch.cuda.graph(graph):
        loss = info_nce(a, b, 0.1, backend="triton")
        loss.backward()
    with torch.no_grad():
        a.copy_(z1 * 2.0)
    graph.replay()
    torch.cuda.synchronize()
    ref_a = (z1 * 2.0).requires_grad_()
    ref = nt_xent_reference(ref_a, z2, 0.1)
    ref.backward()
    assert abs(float(loss) - float(ref)) < 1e-4 and rel_err(a.grad, ref_a.grad) < 1e-4
